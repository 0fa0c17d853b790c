"""CUDA ops and Int4Linear on a GPU (every test skips without one; bench/gpu_check.sh runs them on
the device machine). Each op is checked against the float64 / CPU reference, never against itself;
the fused linear over dtypes x group sizes x sym/asym x odd shapes x every M range, the dense path,
bad input, torch.compile(fullgraph=True) and CUDA-graph capture."""
import copy

import pytest
import torch
import torch.nn as nn

from int4kit import Int4Linear, ops
from int4kit import reference as R

from conftest import make_linear, random_codes, random_weight, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
HALF_DTYPES = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def canonical(N, K, G, symmetric, scale_dtype=torch.float32, frac_zeros=False):
    groups = ops.num_groups(K, G)
    qweight = R.pack(random_codes(N, K))
    scales = (torch.rand(N, groups) * 0.05 + 0.001).to(scale_dtype)
    if symmetric:
        zeros = None
    elif frac_zeros:  # HQQ-style
        zeros = (torch.rand(N, groups) * 15).to(scale_dtype)
    else:
        zeros = torch.randint(0, 16, (N, groups)).to(scale_dtype)
    return qweight, scales, zeros


def to_cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def poisoned_allocator(numel):
    """Leaves a freed block of NaNs in the caching allocator, so an output that reuses it and is
    not fully written shows NaNs instead of stale zeros."""
    torch.full((numel,), float("nan"), device="cuda")
    torch.cuda.synchronize()


# ---- canonical-format ops -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (17, 129), (64, 4096), (0, 8)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack(shape):
    N, K = shape
    codes = random_codes(N, K)
    packed = ops.pack(codes.cuda())
    assert packed.is_cuda
    assert torch.equal(packed.cpu(), R.pack(codes))
    assert torch.equal(ops.unpack(packed, K).cpu(), codes)
    qweight = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8)
    expected = R.unpack(qweight, K) if N else torch.empty(0, K, dtype=torch.uint8)
    assert torch.equal(ops.unpack(qweight.cuda(), K).cpu(), expected)


def test_pack_rejects_large_codes():
    codes = random_codes(4, 9)
    codes[3, 8] = 16
    with pytest.raises(RuntimeError, match=r"codes must be in 0\.\.15"):
        ops.pack(codes.cuda())


@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(9, 130, 6), (7, 256, -1), (33, 4096, 128), (5, 100, 32)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_quantize_matches_cpu_bit_for_bit(shape, symmetric, w_dtype):
    N, K, G = shape
    weight = random_weight(N, K).to(w_dtype)
    got = ops.quantize(weight.cuda(), G, symmetric)
    want = ops.quantize(weight, G, symmetric)
    for name, g, w in zip(("qweight", "scales", "zeros"), got, want):
        assert g.is_cuda and g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), name


def test_quantize_rejects_non_finite():
    weight = random_weight(4, 64)
    weight[2, 5] = float("inf")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.quantize(weight.cuda(), 32, True)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("zeros_kind", ["none", "int", "frac"])
@pytest.mark.parametrize("shape", [(9, 130, 6), (7, 256, -1), (33, 4096, 128)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_dequantize(shape, zeros_kind, scale_dtype, out_dtype):
    N, K, G = shape
    qweight, scales, zeros = canonical(N, K, G, zeros_kind == "none", scale_dtype,
                                       frac_zeros=zeros_kind == "frac")
    w = ops.dequantize(*to_cuda(qweight, scales, zeros), G, K, out_dtype)
    assert w.is_cuda and w.dtype == out_dtype and tuple(w.shape) == (N, K)
    ref = R.dequantize(qweight, scales, zeros, G, K, torch.float64)
    if out_dtype == torch.float32 and zeros_kind != "frac":
        assert torch.equal(w.cpu(), ref.float())
    else:
        eps = torch.finfo(out_dtype).eps
        atol = 0 if zeros_kind != "frac" else 64 * torch.finfo(torch.float32).eps * scales.float().max().item()
        torch.testing.assert_close(w.cpu().double(), ref, rtol=eps, atol=atol)


# ---- the CUDA prepacked layout ------------------------------------------------------------------

@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(1, 2, -1), (16, 64, 64), (37, 130, 6), (100, 200, 32),
                                   (33, 4096, 128), (8, 100, -1)],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_prepack_round_trip_is_bit_exact(shape, symmetric, scale_dtype):
    N, K, G = shape
    qweight, scales, zeros = canonical(N, K, G, symmetric, scale_dtype, frac_zeros=True)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    assert packed.is_cuda and packed.dtype == torch.uint8
    assert packed.numel() == ops.prepacked_bytes(N, K, G, scale_dtype, "cuda")
    q2, s2, z2 = ops.unprepack(packed, N, K, G, scale_dtype)
    assert torch.equal(q2.cpu(), qweight)
    assert torch.equal(s2.cpu(), scales)
    expected_zeros = torch.full_like(scales, 8) if symmetric else zeros
    assert torch.equal(z2.cpu(), expected_zeros)


def test_unprepack_rejects_wrong_scale_dtype_and_foreign_buffers():
    qweight, scales, zeros = canonical(32, 128, 64, False, torch.bfloat16)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), 64, 128)
    with pytest.raises(RuntimeError, match="scale_dtype is Half but packed holds BFloat16"):
        ops.unprepack(packed, 32, 128, 64, torch.float16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # CPU layouts of each scale dtype
        cpu_packed = ops.prepack(qweight, scales.to(dtype), zeros.to(dtype), 64, 128).cuda()
        with pytest.raises(RuntimeError, match="no CUDA prepacked layout"):
            ops.unprepack(cpu_packed, 32, 128, 64, dtype)
    with pytest.raises(RuntimeError, match="no CUDA prepacked layout"):
        ops.linear(torch.randn(2, 128, device="cuda", dtype=torch.bfloat16), packed, 33, 128, 64)


# ---- fused linear -------------------------------------------------------------------------------

# (K, N, G); N = 272 is 17 row tiles: three blocks of the M > 16 kernels (8 tiles each), the last
# with one tile. M runs through every tile shape and token-block count, tails included.
LINEAR_SHAPES = [(64, 16, 64), (136, 40, 32), (256, 33, 128), (200, 24, -1), (4096, 48, 128),
                 (512, 100, 16), (320, 272, 64)]
LINEAR_MS = [1, 3, 8, 9, 16, 17, 32, 33, 64, 100, 200]


@pytest.mark.parametrize("x_dtype", HALF_DTYPES, ids=HALF_IDS)
@pytest.mark.parametrize("scale_dtype", [torch.float32, None], ids=["s-fp32", "s-x"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"K{s[0]}-N{s[1]}-G{s[2]}")
def test_linear_matches_float64_reference(shape, symmetric, scale_dtype, x_dtype):
    K, N, G = shape
    qweight, scales, zeros = canonical(N, K, G, symmetric, scale_dtype or x_dtype)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    bias = torch.randn(N) * 0.1
    for M in LINEAR_MS:
        x = torch.randn(M, K).to(x_dtype)
        poisoned_allocator(M * N)
        y = ops.linear(x.cuda(), packed, N, K, G, bias.to(x_dtype).cuda())
        assert y.is_cuda and y.dtype == x_dtype and tuple(y.shape) == (M, N)
        assert not torch.isnan(y).any(), f"M={M}: unwritten outputs"
        ref = R.linear(x, qweight, scales, zeros, G, bias.to(x_dtype))
        err = rel_err(y, ref)
        assert err <= TOL[x_dtype], f"M={M}: relative error {err:.3g}"


TILE_COUNT = 10  # kTileShapes in csrc/cuda/linear.cu; 0-3 scale after the mma


@pytest.mark.parametrize("x_dtype", HALF_DTYPES, ids=HALF_IDS)
@pytest.mark.parametrize("G", [64, 32])
def test_linear_with_every_tile_shape_forced(G, x_dtype, monkeypatch):
    # INT4KIT_CUDA_TILE forces a tile shape at M values the choice by M never gives it (the
    # private-x shapes 3 and 7 are only reached this way); shapes that scale after the mma need
    # one group per 64-column chunk and are refused at G = 32, with the list of shapes
    K, N = 320, 272
    qweight, scales, zeros = canonical(N, K, G, False, x_dtype)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    for tile in range(TILE_COUNT):
        monkeypatch.setenv("INT4KIT_CUDA_TILE", str(tile))
        if G == 32 and tile < 4:
            with pytest.raises(RuntimeError, match="needs one group per 64-column chunk"):
                ops.linear(torch.randn(1, K, dtype=x_dtype, device="cuda"), packed, N, K, G)
            continue
        for M in (1, 9, 16, 40, 100):
            x = torch.randn(M, K).to(x_dtype)
            poisoned_allocator(M * N)
            y = ops.linear(x.cuda(), packed, N, K, G)
            err = rel_err(y, R.linear(x, qweight, scales, zeros, G))
            assert err <= TOL[x_dtype], f"tile {tile}, M={M}: relative error {err:.3g}"
    monkeypatch.setenv("INT4KIT_CUDA_TILE", str(TILE_COUNT))
    with pytest.raises(RuntimeError, match=f"INT4KIT_CUDA_TILE={TILE_COUNT} names no tile shape"):
        ops.linear(torch.randn(1, K, dtype=x_dtype, device="cuda"), packed, N, K, G)


@pytest.mark.parametrize("x_dtype", HALF_DTYPES, ids=HALF_IDS)
@pytest.mark.parametrize("shape", [(16384, 40, 128), (64 * 65 + 40, 40, 32)],
                         ids=["even-splits", "short-last-split-g32"])
def test_linear_split_k_for_small_n(shape, x_dtype):
    # N = 40 leaves most SMs idle, so K is split across blocks (on a 132-SM H200: 16-32 splits;
    # the second K leaves a shorter last split and warps without a chunk in it): partials, then a
    # reduction that adds the bias; also under CUDA-graph capture (workspace from the graph's pool)
    K, N, G = shape
    qweight, scales, zeros = canonical(N, K, G, False, x_dtype)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    bias = torch.randn(N).to(x_dtype)
    bias_dev = bias.cuda()
    for M in (1, 9, 20, 40):
        x = torch.randn(M, K).to(x_dtype)
        ref = R.linear(x, qweight, scales, zeros, G, bias)
        y = ops.linear(x.cuda(), packed, N, K, G, bias_dev)
        assert rel_err(y, ref) <= TOL[x_dtype], f"M={M}"
        static_x = x.cuda()
        ops.linear(static_x, packed, N, K, G, bias_dev)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ops.linear(static_x, packed, N, K, G, bias_dev)
        x2 = torch.randn(M, K).to(x_dtype)
        static_x.copy_(x2.cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(static_y, R.linear(x2, qweight, scales, zeros, G, bias)) <= TOL[x_dtype]


@pytest.mark.parametrize("x_dtype", HALF_DTYPES, ids=HALF_IDS)
def test_linear_fractional_zero_points(x_dtype):
    K, N, G = 512, 48, 64
    qweight, scales, zeros = canonical(N, K, G, False, x_dtype, frac_zeros=True)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    for M in (1, 20, 64):
        x = torch.randn(M, K).to(x_dtype)
        y = ops.linear(x.cuda(), packed, N, K, G)
        assert rel_err(y, R.linear(x, qweight, scales, zeros, G)) <= TOL[x_dtype]


@pytest.mark.parametrize("case", ["fp32-x", "group-6", "large-M", "K-odd", "misaligned-x",
                                  "strided-x", "3d-x"])
def test_linear_other_paths(case, monkeypatch):
    K, N, G, M, dtype = 256, 40, 64, 5, torch.bfloat16
    if case == "group-6":
        G = 6
    if case == "K-odd":
        K, G = 131, -1
    if case == "fp32-x":
        dtype = torch.float32
    if case == "large-M":
        monkeypatch.setenv("INT4KIT_CUDA_FUSED_MAX_M", "2")  # the dequantize + cuBLAS path
    qweight, scales, zeros = canonical(N, K, G, False, torch.bfloat16)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    x = torch.randn(M, K).to(dtype)
    if case == "misaligned-x":
        buffer = torch.empty(M * K + 1, dtype=dtype, device="cuda")
        x_dev = buffer[1:].view(M, K)  # contiguous, but 2 bytes off a 16-byte boundary
        x_dev.copy_(x.cuda())
    elif case == "strided-x":
        x_dev = torch.randn(K, M).to(dtype).cuda().t()
        x_dev.copy_(x.cuda())
    elif case == "3d-x":
        x = torch.randn(2, 3, K).to(dtype)
        x_dev = x.cuda()
    else:
        x_dev = x.cuda()
    y = ops.linear(x_dev, packed, N, K, G)
    assert y.dtype == dtype and tuple(y.shape) == (*x.shape[:-1], N)
    assert rel_err(y, R.linear(x, qweight, scales, zeros, G)) <= TOL[dtype]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(200, 40, 64), (256, 33, 6), (131, 20, -1)],
                         ids=["K-tail-g64", "g6", "per-channel-K131"])
def test_dense_path_multiplies_by_the_exact_dequantized_weight(shape, scale_dtype, out_dtype,
                                                               monkeypatch):
    # linear's dense path (dequantize_prepacked into a temporary, then cuBLAS) on x = I gives
    # W^T: every value must be (q - z) * s in fp32, rounded once to the output dtype
    monkeypatch.setenv("INT4KIT_CUDA_FUSED_MAX_M", "0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    K, N, G = shape
    qweight, scales, zeros = canonical(N, K, G, False, scale_dtype, frac_zeros=True)
    packed = ops.prepack(*to_cuda(qweight, scales, zeros), G, K)
    y = ops.linear(torch.eye(K, dtype=out_dtype, device="cuda"), packed, N, K, G)
    expected = R.dequantize(qweight, scales, zeros, G, K, torch.float32).to(out_dtype)
    assert torch.equal(y.t().cpu(), expected)


def test_linear_rejects_bad_input():
    K, N, G = 128, 32, 64
    packed = ops.prepack(*to_cuda(*canonical(N, K, G, True)), G, K)
    x = torch.randn(3, K, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x must have K = 128"):
        ops.linear(x[:, :100], packed, N, K, G)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        ops.linear(x.cpu(), packed, N, K, G)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.linear(x, packed, N, K, G, torch.zeros(N + 1, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        ops.linear(x.int(), packed, N, K, G)


# ---- Int4Linear on a GPU ------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_module_moves_to_gpu_and_back_bit_exact(symmetric, x_dtype):
    K, N, G = 384, 37, 128
    cpu_module = Int4Linear.from_linear(make_linear(K, N), group_size=G, symmetric=symmetric)
    gpu_module = copy.deepcopy(cpu_module).to("cuda")
    assert gpu_module.packed.is_cuda and gpu_module.qweight is None and gpu_module.bias.is_cuda
    for key, value in cpu_module.state_dict().items():  # the canonical weights did not change
        assert torch.equal(gpu_module.state_dict()[key].cpu(), value), key
    x = torch.randn(2, 9, K).to(x_dtype)
    y_gpu = gpu_module(x.cuda())
    assert y_gpu.is_cuda and y_gpu.dtype == x_dtype
    qweight, scales, zeros = cpu_module.canonical()
    ref = R.linear(x, qweight, scales, zeros, G, cpu_module.bias.detach())
    assert rel_err(y_gpu, ref) <= TOL[x_dtype]
    back = gpu_module.to("cpu")
    assert back.packed is not None and not back.packed.is_cuda
    assert torch.equal(back.packed, cpu_module.packed)


def test_from_linear_on_gpu_and_state_dict_portability(tmp_path):
    linear = make_linear(256, 40, device="cuda")
    module = Int4Linear.from_linear(linear, group_size=64, symmetric=False)
    assert module.packed.is_cuda
    rq, rs, rz = R.quantize(linear.weight.detach().cpu(), 64, False)
    state = module.state_dict()
    assert torch.equal(state["qweight"].cpu(), rq) and torch.equal(state["scales"].cpu(), rs)
    assert torch.equal(state["zeros"].cpu(), rz)
    torch.save(state, tmp_path / "gpu.pt")
    cpu_module = Int4Linear(256, 40, True, 64, False)
    cpu_module.load_state_dict(torch.load(tmp_path / "gpu.pt", map_location="cpu", weights_only=True))
    gpu_again = Int4Linear(256, 40, True, 64, False).cuda()
    gpu_again.load_state_dict(torch.load(tmp_path / "gpu.pt", weights_only=True))
    assert torch.equal(gpu_again.packed, module.packed)
    x = torch.randn(5, 256)
    assert rel_err(module(x.cuda()), cpu_module(x)) <= 2e-5


def test_w4a8_on_gpu_is_refused_clearly():
    module = Int4Linear.from_linear(make_linear(128, 16), group_size=64, act_quant="int8").cuda()
    with pytest.raises(NotImplementedError, match="runs on CPU only"):
        module(torch.randn(2, 128, device="cuda"))


@pytest.mark.parametrize("M", [1, 16, 64])
def test_torch_compile_fullgraph(M):
    model = nn.Sequential(make_linear(256, 128), nn.GELU(), make_linear(128, 64)).to(torch.bfloat16)
    model = nn.Sequential(*[Int4Linear.from_linear(m, group_size=64) if isinstance(m, nn.Linear)
                            else m for m in model]).cuda()
    x = torch.randn(M, 256, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_err(compiled, eager) <= 1e-3


@pytest.mark.parametrize("M", [1, 8, 40])
def test_cuda_graph_capture_and_replay(M):
    module = Int4Linear.from_linear(make_linear(512, 96), group_size=128,
                                    symmetric=False).to("cuda")
    static_x = torch.randn(M, 512, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture, as the CUDA-graph docs ask
        module(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = module(static_x)
    for _ in range(2):
        x = torch.randn(M, 512, dtype=torch.float16)
        static_x.copy_(x.cuda())
        graph.replay()
        torch.cuda.synchronize()
        qweight, scales, zeros = module.canonical()
        ref = R.linear(x, qweight.cpu(), scales.cpu(), zeros.cpu(), 128, module.bias.detach().cpu())
        assert rel_err(static_y, ref) <= TOL[torch.float16]


def test_opcheck_cuda_ops():
    K, N, G = 128, 32, 64
    weight = random_weight(N, K).cuda()
    qweight, scales, zeros = ops.quantize(weight, G, False)
    packed = ops.prepack(qweight, scales, zeros, G, K)
    x = torch.randn(3, K, device="cuda", dtype=torch.bfloat16)
    cases = [("pack", (random_codes(N, K).cuda(),)), ("unpack", (qweight, K)),
             ("quantize", (weight, G, False)),
             ("dequantize", (qweight, scales, zeros, G, K, torch.bfloat16)),
             ("prepack", (qweight, scales, zeros, G, K)),
             ("unprepack", (packed, N, K, G, torch.float32)),
             ("linear", (x, packed, N, K, G, None))]
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.int4kit, name).default, args)


# ---- Int8Linear on a GPU: canonical tensors, dequantize_int8 + cuBLAS ----------------------------

@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8linear_on_gpu_matches_reference_and_moves_back(x_dtype, symmetric):
    from int4kit import Int8Linear
    linear = make_linear(200, 72)
    layer = Int8Linear.from_linear(linear, 64, symmetric)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    gpu = copy.deepcopy(layer).cuda()
    assert gpu.packed is None and gpu.qweight.is_cuda  # no CUDA int8 layout: canonical
    x = torch.randn(3, 9, 200).to(x_dtype)
    q, s, z = R.quantize(linear.weight.detach(), 64, symmetric, bits=8)
    want = R.linear(x.double(), q, s, None if symmetric else z, 64, linear.bias.detach(), bits=8)
    assert rel_err(gpu(x.cuda()), want) < TOL[x_dtype]
    back = gpu.cpu()
    assert back.packed is not None
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key]), key
