"""Tier 2: the fused linear (prepacked layout) against "dequantize in float64, then matmul"
(int4kit.reference.linear), for every CPU path this machine supports."""
import functools
import zlib

import pytest
import torch

from int4kit import ops
from int4kit import reference as R

from conftest import random_weight, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

M_SWEEP = [1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 128]

# (N, K, group_size): N not a multiple of the 16-row block, K at and off group boundaries
SHAPES = [
    (3, 100, 32),     # last group partial (4 columns)
    (7, 256, -1),     # per channel
    (37, 384, 128),
    (64, 1000, 64),   # last group partial (40 columns)
    (17, 130, 6),     # groups not a multiple of 8 columns, last group partial
    (16, 99, 32),     # odd K
    (5, 1, -1),       # K = 1
]


def _shape_id(shape):
    N, K, G = shape
    return f"N{N}-K{K}-G{G}"


@functools.lru_cache(maxsize=None)
def make_layer(N, K, G, symmetric, with_bias, dtype):
    """Quantized weights (canonical and prepacked) and a bias, all from a fixed seed."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(zlib.crc32(repr((N, K, G, symmetric, with_bias, dtype)).encode()))
    try:
        weight = random_weight(N, K, dtype)
        bias = (torch.randn(N) * 0.1).to(dtype) if with_bias else None
    finally:
        torch.random.set_rng_state(gen_state)
    qweight, scales, zeros = ops.quantize(weight, G, symmetric)
    zeros = None if symmetric else zeros
    packed = ops.prepack(qweight, scales, zeros, G, K)
    return qweight, scales, zeros, packed, bias


def check_linear(x, N, K, G, symmetric, with_bias, weight_dtype=None):
    dtype = x.dtype
    qweight, scales, zeros, packed, bias = make_layer(N, K, G, symmetric, with_bias,
                                                      weight_dtype or dtype)
    y = ops.linear(x, packed, N, K, G, bias)
    assert y.dtype == dtype
    assert tuple(y.shape) == (*x.shape[:-1], N)
    ref = R.linear(x, qweight, scales, zeros, G, bias)
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("M", M_SWEEP)
def test_linear_matches_reference(cpu_isa, M, shape, with_bias, symmetric, dtype):
    N, K, G = shape
    x = torch.randn(M, K).to(dtype)
    check_linear(x, N, K, G, symmetric, with_bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gemm_min_rows_forces_either_path(cpu_isa, monkeypatch, dtype):
    # INT4KIT_GEMM_MIN_ROWS moves the switch between the GEMV and the GEMM (bench_crossover.py):
    # both match the reference at the same M, and for fp32 x they are different arithmetic
    # (fixed-point or float GEMV against fp32 FMAs on dequantized tiles)
    if cpu_isa == "scalar":
        pytest.skip("the scalar path has one kernel at every M")
    N, K, G, M = 37, 384, 128, 16
    x = torch.randn(M, K).to(dtype)
    outputs = {}
    for rows in ("1", "100000"):
        monkeypatch.setenv("INT4KIT_GEMM_MIN_ROWS", rows)
        outputs[rows] = check_linear(x, N, K, G, False, True)
    if dtype == torch.float32 and cpu_isa != "amx":  # AMX runs its tiles at this M either way
        assert not torch.equal(outputs["1"], outputs["100000"])


def test_gemm_min_rows_bad_value(monkeypatch):
    monkeypatch.setenv("INT4KIT_GEMM_MIN_ROWS", "eight")
    with pytest.raises(RuntimeError, match="INT4KIT_GEMM_MIN_ROWS=eight is not auto or a positive"):
        check_linear(torch.randn(8, 64), 16, 64, 32, False, False)
    monkeypatch.setenv("INT4KIT_GEMM_MIN_ROWS", "auto")
    check_linear(torch.randn(8, 64), 16, 64, 32, False, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 9, 33])
def test_linear_low_precision_x_with_fp32_scales(cpu_isa, M, dtype):
    # a float32 checkpoint run with bf16/fp16 activations (Int4Linear.to(bf16) keeps fp32 scales)
    N, K, G = 37, 384, 128
    x = torch.randn(M, K).to(dtype)
    check_linear(x, N, K, G, False, True, weight_dtype=torch.float32)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M", [1, 3, 9, 33, 1200])
def test_linear_fp32_x_with_16_bit_scales(cpu_isa, M, scale_dtype):
    # a bf16 / fp16 checkpoint run in fp32: the prepacked records keep 16-bit scales and zeros
    # (GEMV, AMX planes, GEMM, and the library GEMM's dequantized weight from M = 1024)
    N, K, G = 37, 384, 128
    x = torch.randn(M, K)
    check_linear(x, N, K, G, False, True, weight_dtype=scale_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 33])
def test_linear_model_sized_shape(cpu_isa, M, dtype):
    N, K, G = 4096, 512, 128
    x = torch.randn(M, K).to(dtype)
    check_linear(x, N, K, G, False, True)


# x larger than the AMX path's K chunk (1 MiB of x as its tiles read it: rows padded to 16, bf16
# planes): the output rows carry fp32 partial sums from chunk to chunk. 3 row blocks (an odd
# leftover block), a group count the chunks do not divide (101 groups), rows not a multiple of 16.
LONG_K_CASES = [
    (33, 12928, torch.bfloat16),  # per-group tiles, 2 chunks of 51 and 50 groups
    (70, 10240, torch.bfloat16),  # dequantized tiles (bf16 from 64 rows), 2 chunks
    (40, 6400, torch.float16),    # two bf16 planes
    (20, 8192, torch.float32),    # three bf16 planes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [31, 32, 70, 300])
def test_linear_per_channel_groups_longer_than_a_chunk(cpu_isa, M, dtype):
    # the avx512bf16 GEMM (from 32 rows; bf16 x on bf16 weights from 64) takes K in chunks of 256
    # columns: a per-channel group (G = K) is cut into pieces and its zero-point term added once;
    # 300 rows: more than one 256-row pass per weight tile
    x = torch.randn(M, 1100).to(dtype)
    check_linear(x, 35, 1100, -1, False, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_gemm_passes(cpu_isa, dtype):
    # the GEMMs take several row blocks per pass over a row chunk of x (avx512bf16: 8 tiles of 3
    # blocks over 256 rows; linear_simd.h's FMA GEMM, the AVX2 path's from 8 rows: 8 blocks over
    # 192): 60 row blocks, 30 per thread (full passes, then a partial one ending in a partial
    # tile; the last block 6 rows), 272 rows (a full row chunk and a partial one), 16 chunks of K
    x = torch.randn(272, 4000).to(dtype)
    check_linear(x, 950, 4000, 128, False, True)


@pytest.mark.parametrize("M,K,dtype", LONG_K_CASES, ids=[f"M{m}-K{k}-{str(d)[6:]}" for m, k, d in LONG_K_CASES])
def test_linear_long_k_in_chunks(cpu_isa, two_threads, M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    check_linear(x, 48, K, 128, False, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 5), (4,), ()], ids=["2x3", "1x1x5", "4", "1d"])
def test_linear_leading_dims(cpu_isa, lead, dtype):
    N, K, G = 37, 384, 128
    x = torch.randn(*lead, K).to(dtype)
    check_linear(x, N, K, G, False, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=["0", "2x0", "0x3"])
def test_linear_empty_batch(cpu_isa, lead, dtype):
    N, K, G = 17, 130, 6
    _, _, _, packed, bias = make_layer(N, K, G, False, True, dtype)
    x = torch.randn(*lead, K).to(dtype)
    y = ops.linear(x, packed, N, K, G, bias)
    assert tuple(y.shape) == (*lead, N)
    assert y.dtype == dtype


def test_linear_zero_output_features(cpu_isa):
    K, G = 64, 32
    qweight, scales, zeros = ops.quantize(torch.empty(0, K), G, True)
    packed = ops.prepack(qweight, scales, None, G, K)
    y = ops.linear(torch.randn(3, K), packed, 0, K, G, None)
    assert tuple(y.shape) == (3, 0)


def _views(M, K, dtype=torch.float32):
    """(name, non-contiguous view of an [.., K] activation)."""
    def randn(*shape):
        return torch.randn(*shape).to(dtype)
    return [
        ("transposed", randn(K, M + 1).t()[:M]),
        ("every_other_column", randn(M, 2 * K)[:, ::2]),
        ("row_stride_gt_K", randn(M + 1, K + 5)[:M, 2:K + 2]),
        ("every_other_row", randn(2 * M, K)[::2]),
        ("batch_transposed", randn(M, 3, K).transpose(0, 1)),
    ]


VIEW_NAMES = [name for name, _ in _views(1, 2)]
# a single row taken with a row stride or from a transposed batch is still contiguous
VIEW_CASES = [(M, i) for M in (1, 5, 33) for i in range(len(VIEW_NAMES))
              if M > 1 or VIEW_NAMES[i] in ("transposed", "every_other_column", "row_stride_gt_K")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,view", VIEW_CASES, ids=[f"M{M}-{VIEW_NAMES[i]}" for M, i in VIEW_CASES])
def test_linear_non_contiguous_x(cpu_isa, M, view, dtype):
    N, K, G = 37, 384, 128
    _, x = _views(M, K, dtype)[view]
    assert not x.is_contiguous() or x.storage_offset() != 0  # a one-row slice is "contiguous"
    _, _, _, packed, bias = make_layer(N, K, G, False, True, dtype)
    y = check_linear(x, N, K, G, False, True)
    y_contig = ops.linear(x.contiguous(), packed, N, K, G, bias)
    assert torch.equal(y, y_contig)


def test_linear_non_contiguous_bias(cpu_isa):
    N, K, G = 37, 384, 128
    qweight, scales, zeros, packed, _ = make_layer(N, K, G, False, False, torch.float32)
    bias = torch.randn(2 * N)[::2]
    x = torch.randn(9, K)
    y = ops.linear(x, packed, N, K, G, bias)
    assert rel_err(y, R.linear(x, qweight, scales, zeros, G, bias)) <= 1e-5


@pytest.mark.parametrize("bias_dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_bias_dtype_differs_from_x(cpu_isa, bias_dtype):
    N, K, G = 17, 130, 6
    qweight, scales, zeros, packed, _ = make_layer(N, K, G, True, False, torch.float32)
    bias = torch.randn(N).to(bias_dtype)
    x = torch.randn(7, K)
    y = ops.linear(x, packed, N, K, G, bias)
    assert y.dtype == torch.float32
    assert rel_err(y, R.linear(x, qweight, scales, None, G, bias)) <= 1e-5


def test_linear_large_activations(cpu_isa):
    # per-group sums of x feed the zero-point term: large, offset activations must not lose it
    N, K, G = 33, 256, 32
    qweight, scales, zeros, packed, bias = make_layer(N, K, G, False, True, torch.float32)
    x = torch.randn(8, K) * 50 + 100
    y = ops.linear(x, packed, N, K, G, bias)
    assert rel_err(y, R.linear(x, qweight, scales, zeros, G, bias)) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(37, 384, 128), (16, 99, 32), (7, 256, -1)], ids=_shape_id)
def test_linear_large_m(cpu_isa, shape, with_bias, dtype):
    # from M = 1024 bf16 and fp32 x go to torch's GEMM on the dequantized weight (ops_cpu.cpp;
    # the avx512bf16 path keeps its own kernels)
    N, K, G = shape
    torch.manual_seed(3)
    check_linear(torch.randn(2, 600, K).to(dtype), N, K, G, False, with_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 3, 9])
def test_linear_non_finite_rows(cpu_isa, M, dtype):
    # a row with an Inf gives non-finite outputs, one with a NaN NaN outputs, on every path (the
    # vector GEMVs run those rows on floats instead of their int16 grid); the other rows are exact
    N, K, G = 37, 384, 128
    qweight, scales, zeros, packed, bias = make_layer(N, K, G, False, False, dtype)
    x = torch.randn(M, K).to(dtype)
    ref = R.linear(x, qweight, scales, zeros, G, None)
    x[0, -1] = float("inf")
    if M > 2:
        x[2, 0] = float("nan")
    y = ops.linear(x, packed, N, K, G, None)
    assert not torch.isfinite(y[0]).any()
    if M > 2:
        assert torch.isnan(y[2]).all()
    rest = [m for m in range(M) if m not in (0, 2)]
    if rest:
        assert rel_err(y[rest], ref[rest]) <= TOL[dtype]


@pytest.mark.parametrize("value", ["auto", ""])
def test_linear_default_path(monkeypatch, value):
    monkeypatch.setenv("INT4KIT_CPU_ISA", value)
    assert ops.cpu_isa() in ops.cpu_isas()
    x = torch.randn(9, 130)
    check_linear(x, 17, 130, 6, False, True)


@pytest.mark.parametrize("op", ["linear", "linear_w4a8"])
def test_linear_from_several_python_threads(op):
    # concurrent calls (each then runs on its own thread while another is in flight) give exactly
    # the results of the same calls made one at a time
    import threading

    N, K, G = 37, 384, 128
    _, _, _, packed, bias = make_layer(N, K, G, False, True, torch.float32)
    xs = [torch.randn(m, K) for m in (1, 4, 9, 33, 64, 2, 17, 128)]
    fn = getattr(ops, op)
    expected = [fn(x, packed, N, K, G, bias) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = fn(xs[i], packed, N, K, G, bias)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_all_zero_weight_stays_within_the_fixed_point_bound(cpu_isa):
    """Found by tests/test_properties.py: an all-zero weight (codes and zero points 8, scale 1)
    with strided fp32 x gives about 2^-21 |x| on the fixed-point x grid rather than exact zeros;
    docs/FORMAT.md's bound (2^-23 of the group's largest |x| per term) holds it."""
    q, s, _ = ops.quantize(torch.zeros(1, 4), -1, True)
    packed = ops.prepack(q, s, None, -1, 4)
    x = torch.tensor([[1.5410, -0.2934, -2.1788, 0.5684],
                      [-1.0845, -1.3986, 0.4033, 0.8380]]).t().contiguous().t()
    y = ops.linear(x, packed, 1, 4, -1, None)
    assert (y.abs() <= 2.0 ** -18 * 16 * x.abs().sum(1, keepdim=True)).all()
