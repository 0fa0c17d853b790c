"""Tier 1: the canonical format and the CPU prepacked layout, bit-exact against int4kit.reference."""
import pytest
import torch

from int4kit import ops
from int4kit import reference as R

from conftest import random_codes, random_weight


def ref_unpack(qweight, K):
    # reference.unpack cannot reshape an empty [0, ceil(K/2)] tensor (see
    # test_reference_handles_empty_rows); the answer for N = 0 is simply an empty [0, K].
    if qweight.shape[0] == 0:
        return torch.empty((0, K), dtype=torch.uint8)
    return R.unpack(qweight, K)


def ref_dequantize(qweight, scales, zeros, group_size, K, dtype=torch.float64):
    if qweight.shape[0] == 0:
        return torch.empty((0, K), dtype=dtype)
    return R.dequantize(qweight, scales, zeros, group_size, K, dtype)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

PACK_SHAPES = [(1, 1), (3, 1), (1, 2), (4, 7), (5, 8), (17, 129), (64, 256), (0, 5), (0, 6), (2, 999)]


def _shape_id(shape):
    return "x".join(str(s) for s in shape)


# ------------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", PACK_SHAPES, ids=_shape_id)
def test_pack_matches_reference_and_round_trips(shape):
    N, K = shape
    codes = random_codes(N, K)
    packed = ops.pack(codes)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (N, (K + 1) // 2)
    assert torch.equal(packed, R.pack(codes))
    unpacked = ops.unpack(packed, K)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("K", [1, 3, 7, 129])
def test_pack_odd_k_leaves_last_high_nibble_zero(K):
    codes = torch.full((3, K), 15, dtype=torch.uint8)
    packed = ops.pack(codes)
    assert torch.equal(packed[:, -1], torch.full((3,), 0x0F, dtype=torch.uint8))
    assert torch.equal(packed[:, :-1], torch.full((3, K // 2), 0xFF, dtype=torch.uint8))


def test_pack_nibble_order():
    # k = 2j in the low nibble, k = 2j + 1 in the high nibble
    codes = torch.tensor([[1, 2, 3, 4, 15]], dtype=torch.uint8)
    assert ops.pack(codes).tolist() == [[0x21, 0x43, 0x0F]]
    assert ops.unpack(torch.tensor([[0x21, 0x43, 0xFF]], dtype=torch.uint8), 5).tolist() == [
        [1, 2, 3, 4, 15]]


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=_shape_id)
def test_unpack_arbitrary_bytes_matches_reference(shape):
    N, K = shape
    qweight = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8)
    assert torch.equal(ops.unpack(qweight, K), ref_unpack(qweight, K))


def test_reference_handles_empty_rows():
    # The oracle itself must accept N = 0 like the ops do (ops.unpack/dequantize return [0, K]).
    qweight = torch.empty((0, 3), dtype=torch.uint8)
    assert tuple(R.unpack(qweight, 5).shape) == (0, 5)
    assert tuple(R.dequantize(qweight, torch.empty(0, 1), None, -1, 5).shape) == (0, 5)


def test_pack_unpack_non_contiguous_inputs():
    codes_t = random_codes(40, 30).t()  # [30, 40], a transposed view
    assert not codes_t.is_contiguous()
    assert torch.equal(ops.pack(codes_t), R.pack(codes_t.contiguous()))
    qweight = torch.randint(0, 256, (10, 64), dtype=torch.uint8)[:, ::2]  # [10, 32] strided view
    assert torch.equal(ops.unpack(qweight, 64), R.unpack(qweight.contiguous(), 64))


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------

QUANT_CASES = [
    (24, 256, 32),
    (24, 256, 64),
    (24, 256, 128),
    (24, 256, -1),
    (5, 100, 32),   # K not a multiple of G: last group has 4 columns
    (7, 256, -1),   # per channel
    (9, 130, 6),    # tiny groups, last group partial (130 = 21 * 6 + 4)
    (3, 2, 2),      # smallest group
    (2, 1, -1),     # K = 1
]


def _quant_id(case):
    N, K, G = case
    return f"N{N}-K{K}-G{G}"


def _assert_same_quantization(weight, group_size, symmetric):
    qweight, scales, zeros = ops.quantize(weight, group_size, symmetric)
    rq, rs, rz = R.quantize(weight, group_size, symmetric)
    N, K = weight.shape
    groups = -(-K // (K if group_size == -1 else group_size))
    assert qweight.dtype == torch.uint8 and tuple(qweight.shape) == (N, (K + 1) // 2)
    assert scales.dtype == weight.dtype and tuple(scales.shape) == (N, groups)
    assert zeros.dtype == weight.dtype and tuple(zeros.shape) == (N, groups)
    if not torch.equal(qweight, rq):
        codes, rcodes = ops.unpack(qweight, K), R.unpack(rq, K)
        bad = (codes != rcodes).nonzero()
        pytest.fail(f"{bad.shape[0]} codes differ from the reference, first at {bad[0].tolist()}: "
                    f"{codes[tuple(bad[0])]} vs {rcodes[tuple(bad[0])]}")
    assert torch.equal(scales, rs), "scales differ from the reference"
    assert torch.equal(zeros, rz), "zeros differ from the reference"
    assert torch.equal(torch.signbit(zeros), torch.signbit(rz)), "zeros differ in the sign of 0"
    return qweight, scales, zeros


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=_quant_id)
def test_quantize_matches_reference(case, dtype, symmetric):
    N, K, G = case
    _assert_same_quantization(random_weight(N, K, dtype), G, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 100.0])
def test_quantize_magnitudes_match_reference(magnitude, dtype, symmetric):
    # tiny magnitudes give subnormal fp16 scales; big ones stress the rounding of the scale
    weight = random_weight(12, 96, torch.float32, scale=magnitude).to(dtype)
    _assert_same_quantization(weight, 32, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_one_sided_groups(symmetric):
    # all-positive and all-negative groups: the range is still taken to include 0
    w = torch.rand(8, 64) + 0.5
    w[4:] *= -1
    _, _, zeros = _assert_same_quantization(w, 16, symmetric)
    # no negative weight: the zero point is +0, bit for bit the same on every device (not -0)
    assert not torch.signbit(zeros[:4]).any()


def test_quantize_ties_round_half_to_even():
    # codes computed from exact ties w / s = k + 0.5: both sides must round the same way
    s = 0.25
    w = torch.tensor([[7.5 * s, 0.5 * s, 1.5 * s, 2.5 * s, -0.5 * s, -1.5 * s, -2.5 * s, -7.5 * s]])
    _assert_same_quantization(w, -1, True)
    _assert_same_quantization(w, -1, False)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_non_contiguous_weight(dtype, symmetric):
    weight = random_weight(64, 40, dtype).t()  # [40, 64] view
    assert not weight.is_contiguous()
    qweight, scales, zeros = ops.quantize(weight, 32, symmetric)
    rq, rs, rz = R.quantize(weight.contiguous(), 32, symmetric)
    assert torch.equal(qweight, rq) and torch.equal(scales, rs) and torch.equal(zeros, rz)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_error_is_bounded_by_the_scale(dtype, symmetric):
    # round-to-nearest: every weight is within half a step (symmetric) or one step (asymmetric,
    # where the zero point itself is rounded) of its dequantized value
    N, K, G = 16, 130, 6
    weight = random_weight(N, K, dtype)
    qweight, scales, zeros = ops.quantize(weight, G, symmetric)
    w_hat = R.dequantize(qweight, scales, None if symmetric else zeros, G, K, torch.float64)
    step = scales.double().repeat_interleave(G, dim=1)[:, :K]
    # the stored scale is rounded to the weight's dtype, so the extreme codes may be off by up to
    # 7.5 (or 15) half-ulps of the scale beyond the ideal half step
    eps = torch.finfo(dtype).eps
    bound = ((0.5 + 8 * eps) if symmetric else (1.0 + 16 * eps)) * step + 1e-12
    assert ((w_hat - weight.double()).abs() <= bound).all()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_zero_groups_have_finite_scales_and_dequantize_to_zero(dtype, symmetric):
    N, K, G = 6, 96, 32
    weight = random_weight(N, K, torch.float32)
    weight[0] = 0            # a whole row
    weight[2, 32:64] = 0     # one group
    weight[5, 64:] = 0       # the last group
    weight = weight.to(dtype)
    qweight, scales, zeros = _assert_same_quantization(weight, G, symmetric)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert torch.isfinite(zeros).all()
    for out_dtype in DTYPES:
        w_hat = ops.dequantize(qweight, scales, None if symmetric else zeros, G, K, out_dtype)
        assert torch.isfinite(w_hat).all()
        for rows, cols in [(0, slice(None)), (2, slice(32, 64)), (5, slice(64, None))]:
            assert torch.equal(w_hat[rows, cols], torch.zeros_like(w_hat[rows, cols]))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_all_zero_weight(symmetric):
    weight = torch.zeros(4, 64)
    qweight, scales, zeros = _assert_same_quantization(weight, -1, symmetric)
    assert torch.isfinite(scales).all()
    w_hat = ops.dequantize(qweight, scales, None if symmetric else zeros, -1, 64)
    assert torch.equal(w_hat, torch.zeros(4, 64))


def test_quantize_empty_rows():
    qweight, scales, zeros = ops.quantize(torch.empty(0, 64), 32, False)
    assert tuple(qweight.shape) == (0, 32) and tuple(scales.shape) == (0, 2)
    assert tuple(zeros.shape) == (0, 2)


# ------------------------------------------------------------------------------------------------
# dequantize
# ------------------------------------------------------------------------------------------------

DEQ_CASES = [(8, 128, 32), (5, 100, 32), (7, 256, -1), (9, 130, 6), (17, 1, -1), (0, 64, 32)]


def random_canonical(N, K, G, scale_dtype, zeros_kind):
    """A random canonical trio: zeros_kind in {"none", "int", "frac"}."""
    groups = -(-K // (K if G == -1 else G))
    qweight = R.pack(random_codes(N, K))
    scales = (torch.rand(N, groups) * 0.05 + 0.001).to(scale_dtype)
    if zeros_kind == "none":
        zeros = None
    elif zeros_kind == "int":
        zeros = torch.randint(0, 16, (N, groups)).to(scale_dtype)
    else:
        zeros = (torch.rand(N, groups) * 15).to(scale_dtype)
    return qweight, scales, zeros


@pytest.mark.parametrize("zeros_kind", ["none", "int"])
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DEQ_CASES, ids=_quant_id)
def test_dequantize_fp32_is_exact(case, scale_dtype, zeros_kind):
    # (q - z) is a small integer, so (q - z) * s is exact in float32 for every scale dtype
    N, K, G = case
    qweight, scales, zeros = random_canonical(N, K, G, scale_dtype, zeros_kind)
    w = ops.dequantize(qweight, scales, zeros, G, K, torch.float32)
    assert w.dtype == torch.float32 and tuple(w.shape) == (N, K)
    assert torch.equal(w, ref_dequantize(qweight, scales, zeros, G, K, torch.float32))


def test_dequantize_default_dtype_is_float32():
    qweight, scales, zeros = random_canonical(4, 64, 32, torch.bfloat16, "int")
    w = ops.dequantize(qweight, scales, zeros, 32, 64)
    assert w.dtype == torch.float32
    assert torch.equal(w, R.dequantize(qweight, scales, zeros, 32, 64, torch.float32))


@pytest.mark.parametrize("zeros_kind", ["none", "int"])
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", DEQ_CASES, ids=_quant_id)
def test_dequantize_low_precision_within_rounding(case, out_dtype, scale_dtype, zeros_kind):
    N, K, G = case
    qweight, scales, zeros = random_canonical(N, K, G, scale_dtype, zeros_kind)
    w = ops.dequantize(qweight, scales, zeros, G, K, out_dtype)
    assert w.dtype == out_dtype and tuple(w.shape) == (N, K)
    ref = ref_dequantize(qweight, scales, zeros, G, K, torch.float64)
    eps = torch.finfo(out_dtype).eps  # one ulp of the output at most
    torch.testing.assert_close(w.double(), ref, rtol=eps, atol=0)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
def test_dequantize_fractional_zeros(out_dtype):
    # HQQ-style fractional zero points: (q - z) is no longer exact in float32
    N, K, G = 9, 130, 6
    qweight, scales, zeros = random_canonical(N, K, G, torch.float32, "frac")
    w = ops.dequantize(qweight, scales, zeros, G, K, out_dtype)
    ref = R.dequantize(qweight, scales, zeros, G, K, torch.float64)
    eps = torch.finfo(out_dtype).eps
    atol = 4 * torch.finfo(torch.float32).eps * 16 * scales.max().item()
    torch.testing.assert_close(w.double(), ref, rtol=eps, atol=atol)


def test_dequantize_non_contiguous_inputs():
    N, K, G = 8, 128, 32
    qweight, scales, zeros = random_canonical(2 * N, K, G, torch.float32, "int")
    view = slice(None, None, 2)
    w = ops.dequantize(qweight[view], scales[view], zeros[view], G, K, torch.float32)
    ref = R.dequantize(qweight[view], scales[view], zeros[view], G, K, torch.float32)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_then_dequantize_matches_reference_pipeline(dtype, symmetric):
    N, K, G = 10, 200, 40
    weight = random_weight(N, K, dtype)
    qweight, scales, zeros = ops.quantize(weight, G, symmetric)
    z = None if symmetric else zeros
    rq, rs, rz = R.quantize(weight, G, symmetric)
    assert torch.equal(ops.dequantize(qweight, scales, z, G, K, torch.float32),
                       R.dequantize(rq, rs, None if symmetric else rz, G, K, torch.float32))


# ------------------------------------------------------------------------------------------------
# prepack / unprepack
# ------------------------------------------------------------------------------------------------

PREPACK_CASES = [(1, 1, -1), (3, 100, 32), (16, 64, 64), (17, 130, 6), (33, 256, -1), (40, 99, 32),
                 (5, 2, 2), (0, 64, 32)]


@pytest.mark.parametrize("zeros_kind", ["none", "int", "frac"])
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", PREPACK_CASES, ids=_quant_id)
def test_prepack_unprepack_round_trip(case, scale_dtype, zeros_kind):
    N, K, G = case
    qweight, scales, zeros = random_canonical(N, K, G, scale_dtype, zeros_kind)
    packed = ops.prepack(qweight, scales, zeros, G, K)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == ops.prepacked_bytes(N, K, G, scale_dtype, "cpu")
    q2, s2, z2 = ops.unprepack(packed, N, K, G, scale_dtype)
    assert q2.dtype == torch.uint8 and s2.dtype == scale_dtype and z2.dtype == scale_dtype
    assert torch.equal(q2, qweight)
    assert torch.equal(s2, scales)
    if zeros is None:
        assert torch.equal(z2, torch.full_like(scales, R.SYMMETRIC_ZERO))
    else:
        assert torch.equal(z2, zeros)


@pytest.mark.parametrize("case", PREPACK_CASES, ids=_quant_id)
def test_cpu_prepacked_size_holds_the_scale_dtype(case):
    # docs/FORMAT.md: records of 16 codes words per 8 columns, then 16 scales and 16 zeros in the
    # scale dtype; a footer of 0 / 8 / 24 bytes so the three sizes always differ
    N, K, G = case
    groups = -(-K // (K if G == -1 else G))
    Gp = -(-(K if G == -1 else G) // 8) * 8
    blocks = -(-N // 16)
    sizes = {}
    for dtype, param_bytes, footer in [(torch.float32, 4, 0), (torch.bfloat16, 2, 8),
                                       (torch.float16, 2, 24)]:
        sizes[dtype] = blocks * groups * (Gp * 8 + 32 * param_bytes) + footer
        assert ops.prepacked_bytes(N, K, G, dtype, "cpu") == sizes[dtype]
    assert len(set(sizes.values())) == 3


def test_no_cpu_prepacked_size_is_a_cuda_one():
    # a buffer moved to the other device must be refused by its ops, never read as another layout
    for N in (1, 16, 17, 100, 4096):
        for K in (1, 64, 100, 4096, 11008):
            for G in (-1, 2, 9, 32, 64, 128):
                if G > K:
                    continue
                cpu = {ops.prepacked_bytes(N, K, G, d, "cpu") for d in DTYPES}
                cuda = {ops.prepacked_bytes(N, K, G, d, "cuda") for d in DTYPES}
                assert len(cpu) == 3 and not cpu & cuda, (N, K, G, cpu, cuda)


@pytest.mark.parametrize("stored,asked", [(torch.bfloat16, torch.float32),
                                          (torch.float16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16)])
def test_unprepack_rejects_another_scale_dtype(stored, asked):
    # the records hold the canonical scales in their dtype (read off the buffer's size): asking
    # for another is refused, as on CUDA, rather than rounded or widened behind the caller's back
    N, K, G = 33, 256, 64
    qweight, scales, zeros = random_canonical(N, K, G, stored, "frac")
    packed = ops.prepack(qweight, scales, zeros, G, K)
    with pytest.raises(RuntimeError, match="scale_dtype is .* but packed holds .* scales"):
        ops.unprepack(packed, N, K, G, asked)


def test_prepack_round_trip_of_quantized_weight():
    weight = random_weight(50, 300, torch.bfloat16)
    qweight, scales, zeros = ops.quantize(weight, 60, False)
    q2, s2, z2 = ops.unprepack(ops.prepack(qweight, scales, zeros, 60, 300), 50, 300, 60,
                               torch.bfloat16)
    assert torch.equal(q2, qweight) and torch.equal(s2, scales) and torch.equal(z2, zeros)


def test_quantize_across_its_row_chunks():
    """The CPU op quantizes in chunks of ~64 MiB of fp32 rows: a transposed (non-contiguous)
    4100 x 4096 weight spans two, and matches the reference bit for bit."""
    w = (torch.randn(4096, 4100) * 0.05).t()
    q, s, z = ops.quantize(w, 128, False)
    rq, rs, rz = R.quantize(w.contiguous(), 128, False)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)
