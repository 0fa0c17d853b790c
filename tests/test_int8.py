"""Int8 weights (Int8Linear): the canonical int8 format and its CPU prepacked layout round trip
bit for bit, the fused linear matches the float64 reference on every CPU path (GEMV, tile GEMM,
library GEMM; every dtype, odd shapes), and the module quantizes, saves, loads and moves like
Int4Linear. The reference is int4kit.reference with bits=8, never the kernels' own output."""
import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import ops
from int4kit import reference as R
from int4kit.nn import Int8Linear

from conftest import make_linear, random_weight, rel_err

SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _canonical(N, K, G, symmetric, dtype=torch.float32):
    qweight, scales, zeros = R.quantize(random_weight(N, K, dtype), G, symmetric, bits=8)
    return qweight, scales, None if symmetric else zeros


def test_reference_int8_rtn_rules():
    # symmetric: s = max|w| / 127.5, z = 128; the group's largest |w| reaches a code edge
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [-2.0, 1.0, 0.0, 0.5]])
    q, s, z = R.quantize(w, -1, True, bits=8)
    assert q.shape == (2, 4) and q.dtype == torch.uint8
    torch.testing.assert_close(s, torch.tensor([[1 / 127.5], [2 / 127.5]]))
    assert z.eq(128).all()
    # the largest |w| of a row lands on the grid's edge (+-127.5 steps, up to float rounding)
    assert q[0, 0] == 255 and q[1, 0] in (0, 1)
    assert (R.dequantize(q, s, z, -1, 4, bits=8) - w.double()).abs().max() <= (
        s.double().max() / 2 + 1e-7)
    # asymmetric: s = (hi - lo) / 255, z = round(-lo / s)
    q, s, z = R.quantize(w, -1, False, bits=8)
    torch.testing.assert_close(s, torch.tensor([[1.5 / 255], [3.0 / 255]]))
    torch.testing.assert_close(z, torch.round(torch.tensor([[0.5], [2.0]]) / s))
    w_hat = R.dequantize(q, s, z, -1, 4, bits=8)
    assert (w_hat - w.double()).abs().max() <= s.double().max() / 2 + 1e-12


@pytest.mark.parametrize("N,K,G", [(1, 2, -1), (17, 33, -1), (33, 100, 32), (16, 64, 64),
                                   (5, 130, 128), (40, 258, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_prepack_unprepack_is_exact(N, K, G, symmetric, scale_dtype):
    qweight, scales, zeros = _canonical(N, K, G, symmetric, scale_dtype)
    packed = ops.prepack_int8(qweight, scales, zeros, G)
    assert packed.numel() == ops.prepacked_bytes(N, K, G, scale_dtype, "cpu", bits=8)
    q2, s2, z2 = ops.unprepack_int8(packed, N, K, G, scale_dtype)
    assert torch.equal(q2, qweight)
    assert torch.equal(s2, scales)
    assert torch.equal(z2, zeros if zeros is not None else torch.full_like(scales, 128))


def test_dequantize_int8_matches_reference():
    for symmetric in (True, False):
        qweight, scales, zeros = _canonical(21, 77, 16, symmetric)
        got = ops.dequantize_int8(qweight, scales, zeros, 16)
        want = R.dequantize(qweight, scales, zeros, 16, 77, bits=8)
        assert rel_err(got, want) < 1e-7


# M: the GEMV's row chunks (1-7), the tile GEMM (8 and up, panels with a remainder), and the
# library GEMM on the dequantized weight (from 1024 rows, bf16 / fp32 only)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 7, 8, 13, 40, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_int8_matches_reference(cpu_isa, M, dtype):
    N, K, G = 37, 200, 64
    for symmetric in (True, False):
        qweight, scales, zeros = _canonical(N, K, G, symmetric)
        packed = ops.prepack_int8(qweight, scales, zeros, G)
        x = torch.randn(M, K).to(dtype)
        bias = torch.randn(N)
        y = ops.linear_int8(x, packed, N, K, G, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        want = R.linear(x.double(), qweight, scales, zeros, G, bias, bits=8)
        tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1.5e-3}[dtype]
        if M >= 1024 and dtype == torch.bfloat16:
            tol = 1e-2  # the library GEMM reads the weight rounded to bf16
        assert rel_err(y, want) < tol, (cpu_isa, M, dtype, symmetric)


@pytest.mark.parametrize("N,K,G", [(1, 2, -1), (15, 9, -1), (16, 16, 8), (49, 1000, 128),
                                   (3, 131, 130)])
def test_linear_int8_odd_shapes(cpu_isa, N, K, G):
    qweight, scales, zeros = _canonical(N, K, G, False, torch.bfloat16)
    packed = ops.prepack_int8(qweight, scales, zeros, G)
    for M in (1, 4, 9):
        x = torch.randn(2, M, K)
        y = ops.linear_int8(x, packed, N, K, G)
        want = R.linear(x.double(), qweight, scales, zeros, G, bits=8)
        assert rel_err(y, want) < 2e-6, (cpu_isa, N, K, G, M)


def test_linear_int8_extreme_codes(cpu_isa):
    # codes 0 and 255 with zero 128 and a large scale: no saturation anywhere in the kernels
    N, K = 32, 512
    qweight = torch.where(torch.rand(N, K) < 0.5, 0, 255).to(torch.uint8)
    scales = torch.full((N, 4), 3.0)
    x = torch.full((1, K), 100.0)
    y = ops.linear_int8(x, ops.prepack_int8(qweight, scales, None, 128), N, K, 128)
    assert rel_err(y, R.linear(x.double(), qweight, scales, None, 128, bits=8)) < 1e-6


def test_int8_bad_input():
    qweight, scales, zeros = _canonical(20, 64, 32, False)
    with pytest.raises(RuntimeError, match="qweight must be 2-D"):
        ops.prepack_int8(qweight.flatten(), scales, zeros, 32)
    with pytest.raises(RuntimeError, match="group_size 128 is larger than K = 64"):
        ops.prepack_int8(qweight, scales, zeros, 128)
    with pytest.raises(RuntimeError, match="scales must have shape"):
        ops.prepack_int8(qweight, scales[:, :1], None, 32)
    with pytest.raises(RuntimeError, match="qweight must be Byte"):
        ops.prepack_int8(qweight.int(), scales, None, 32)
    packed = ops.prepack_int8(qweight, scales, zeros, 32)
    int4_packed = ops.prepack(R.pack(qweight % 16), scales, zeros, 32, 64)
    with pytest.raises(RuntimeError, match="no CPU int8 prepacked layout.*prepack_int8"):
        ops.linear_int8(torch.randn(1, 64), int4_packed, 20, 64, 32)
    with pytest.raises(RuntimeError, match="no CPU prepacked layout"):
        ops.linear(torch.randn(1, 64), packed, 20, 64, 32)
    with pytest.raises(RuntimeError, match="x must have K = 64"):
        ops.linear_int8(torch.randn(1, 63), packed, 20, 64, 32)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.linear_int8(torch.randn(1, 64), packed, 20, 64, 32, torch.randn(3))
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        ops.linear_int8(torch.ones(1, 64, dtype=torch.int32), packed, 20, 64, 32)
    with pytest.raises(RuntimeError, match="scale_dtype is"):
        ops.unprepack_int8(packed, 20, 64, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="scales .and zeros. must have shape"):
        ops.dequantize_int8(qweight, scales[:, :1], None, 32)


# ---- the module ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_matches_reference(group_size, symmetric, dtype):
    linear = make_linear(96, 40, dtype=dtype)
    layer = Int8Linear.from_linear(linear, group_size, symmetric)
    qweight, scales, zeros = R.quantize(linear.weight.detach(), group_size, symmetric, bits=8)
    q2, s2, z2 = layer.canonical()
    assert torch.equal(q2, qweight) and torch.equal(s2, scales)
    assert (z2 is None) == symmetric and (symmetric or torch.equal(z2, zeros))
    x = torch.randn(3, 5, 96).to(dtype)
    want = R.linear(x.double(), qweight, scales, None if symmetric else zeros, group_size,
                    linear.bias.detach(), bits=8)
    assert rel_err(layer(x), want) < (2e-6 if dtype == torch.float32 else 8e-3)
    # int8 is much closer to the dense layer than int4 at the same group size
    dense = linear(x).double()
    int4 = int4kit.Int4Linear.from_linear(linear, group_size, symmetric)(x)
    assert rel_err(layer(x), dense) < rel_err(int4, dense) / 8


def test_state_dict_round_trip_and_device_moves():
    linear = make_linear(64, 24)
    layer = Int8Linear.from_linear(linear, 32, symmetric=False)
    state = layer.state_dict()
    assert state["qweight"].shape == (24, 64) and state["qweight"].dtype == torch.uint8
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    fresh = Int8Linear(64, 24, group_size=32, symmetric=False)
    fresh.load_state_dict(state)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    # the canonical layout off the CPU (meta here; CUDA keeps it too) and back, bit for bit
    layer.to("meta")
    assert layer.packed is None and layer.qweight.device.type == "meta"
    back = Int8Linear(64, 24, group_size=32, symmetric=False)
    back.load_state_dict(state)
    back.to(torch.bfloat16)  # a dtype cast leaves the quantized weight alone
    assert torch.equal(back.canonical()[0], state["qweight"])


def test_canonical_forward_matches_fused(monkeypatch):
    # the path CUDA and other devices take (dequantize_int8, then the dense matmul), run on the CPU
    linear = make_linear(80, 33)
    fused = Int8Linear.from_linear(linear, 16, symmetric=False)
    monkeypatch.setattr(Int8Linear, "_prepack", lambda self, q, s, z: None)
    dense_path = Int8Linear.from_linear(linear, 16, symmetric=False)
    assert dense_path.packed is None
    x = torch.randn(6, 80)
    assert rel_err(dense_path(x), fused(x)) < 1e-6


def test_int8linear_bad_input():
    linear = make_linear(64, 8)
    with pytest.raises(ValueError, match="act_quant must be None"):
        Int8Linear.from_linear(linear, act_quant="int8")
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear.from_linear(linear, group_size=3)
    with torch.no_grad():
        linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int8Linear.from_linear(linear, group_size=32)
    qweight, scales, _ = _canonical(8, 64, 32, True)
    with pytest.raises(ValueError, match=r"qweight must have shape \[8, 64\]"):
        Int8Linear.from_quantized(qweight[:, :32], scales, None, 32, 64)
    layer = Int8Linear(64, 8, group_size=32)
    bad = {"qweight": torch.zeros(8, 32, dtype=torch.uint8), "scales": scales, "bias": torch.zeros(8)}
    with pytest.raises(RuntimeError, match=r"qweight: expected shape \[8, 64\]"):
        layer.load_state_dict(bad)


def test_compile_fullgraph_matches_eager():
    model = nn.Sequential(Int8Linear.from_linear(make_linear(48, 32), 16), nn.ReLU(),
                          Int8Linear.from_linear(make_linear(32, 8), -1, symmetric=False))
    x = torch.randn(3, 48)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), model(x))
