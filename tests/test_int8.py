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


# ---- quantize_model, checkpoints, Hugging Face, what refuses int8 ------------------------------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


def test_quantconfig_bits():
    assert int4kit.QuantConfig(bits=8).bits == 8
    assert int4kit.QuantConfig.from_dict(int4kit.QuantConfig(bits=8).to_dict()).bits == 8
    for bad in (2, 16, True, "8"):
        with pytest.raises(ValueError, match="bits must be 4"):
            int4kit.QuantConfig(bits=bad)
    for kwargs in ({"method": "awq"}, {"method": "hqq"}, {"method": "gptq", "refine_rounds": 1},
                   {"act_quant": "int8"}):
        with pytest.raises(ValueError, match="bits=8"):
            int4kit.QuantConfig(bits=8, **kwargs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_model_rtn_int8_matches_reference(symmetric):
    model = _mlp()
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    report = int4kit.quantize_model(model, int4kit.QuantConfig(bits=8, group_size=-1,
                                                               symmetric=symmetric))
    assert isinstance(model[0], Int8Linear) and isinstance(model[2], Int8Linear)
    for layer, w in zip((model[0], model[2]), weights):
        q, s, z = R.quantize(w, -1, symmetric, bits=8)
        assert torch.equal(layer.canonical()[0], q) and torch.equal(layer.canonical()[1], s)
    # per channel, fp32 scales and zeros: 8 bits + 32 (+ 32) / K per weight, plus the bias
    expected = 8 * (96 * 64 + 4 * 96 * (2 if not symmetric else 1) + 4 * 96) / (96 * 64)
    assert report.bits_per_weight["0"] == pytest.approx(expected)


def test_gptq_int8_beats_rtn_int8_on_the_layer_objective():
    from int4kit.quant.gptq import gptq
    from int4kit.quant.rtn import codes_objective, rtn
    torch.manual_seed(1)
    w = random_weight(48, 128)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs
    H = (x.T @ x).double()
    g = gptq(w, H, 32, False, torch.float32, damp=0.01, bits=8)
    r = rtn(w, 32, False, torch.float32, bits=8)
    assert int(g[0].max()) > 15  # the int8 code range is used
    assert codes_objective(w, *g, 32, H) < 0.9 * codes_objective(w, *r, 32, H)


def test_mixed_int4_int8_model_saves_and_loads_bit_exact(tmp_path):
    model = _mlp()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False),
                           layer_configs={"2": int4kit.QuantConfig(bits=8, group_size=32,
                                                                   symmetric=False,
                                                                   scale_dtype=torch.bfloat16)})
    assert isinstance(model[0], int4kit.Int4Linear) and isinstance(model[2], Int8Linear)
    x = torch.randn(3, 64)
    y = model(x)
    int4kit.save_quantized(model, tmp_path)
    loaded = int4kit.load_quantized(_mlp(seed=5), tmp_path)
    assert isinstance(loaded[2], Int8Linear) and isinstance(loaded[0], int4kit.Int4Linear)
    assert loaded[2].scale_dtype == torch.bfloat16
    for a, b in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1]), a[0]
    assert torch.equal(loaded(x), y)
    from int4kit.formats.native import CheckpointReader, read_quantization_config
    layers = read_quantization_config(CheckpointReader(str(tmp_path)))["layers"]
    assert layers["2"]["bits"] == 8 and "bits" not in layers["0"]  # int4 entries as before


def test_int8_checkpoint_errors(tmp_path):
    import json
    import safetensors
    import safetensors.torch
    model = _mlp()
    int4kit.quantize_model(model, int4kit.QuantConfig(bits=8, group_size=-1))
    int4kit.save_quantized(model, tmp_path / "ok")
    path = tmp_path / "ok" / "model.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["int4kit_quantization_config"])
    # bits 7 is refused by name
    config["layers"]["0"]["bits"] = 7
    bad = dict(metadata, int4kit_quantization_config=json.dumps(config))
    (tmp_path / "bad").mkdir()
    safetensors.torch.save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata=bad)
    with pytest.raises(int4kit.CheckpointError, match="bits must be 4 or 8"):
        int4kit.load_quantized(_mlp(), tmp_path / "bad")
    # an int8 layer read as int4 (bits dropped) meets a qweight of the wrong shape
    del config["layers"]["0"]["bits"]
    bad = dict(metadata, int4kit_quantization_config=json.dumps(config))
    safetensors.torch.save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata=bad)
    with pytest.raises(int4kit.CheckpointError, match=r"expected shape \[96, 32\]"):
        int4kit.load_quantized(_mlp(), tmp_path / "bad")
    # exports to GPTQ / AWQ / compressed-tensors hold int4 only
    with pytest.raises(int4kit.CheckpointError, match="int8 .bits 8."):
        int4kit.convert_checkpoint(tmp_path / "ok", tmp_path / "gptq", to="gptq")


def test_int8_hf_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)).eval()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32),
                           layer_configs={"*down_proj": int4kit.QuantConfig(bits=8, group_size=-1)})
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int8Linear)
    assert loaded.model.layers[0].mlp.down_proj.packed is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_tensor_parallel_refuses_int8():
    from int4kit.parallel.tensor_parallel import TensorParallelError, _Int4Style
    layer = Int8Linear.from_linear(make_linear(64, 32), -1)
    with pytest.raises(TensorParallelError, match="shards an Int4Linear, got Int8Linear"):
        _Int4Style()._apply(layer, None)


def test_sensitivity_with_an_int8_candidate():
    model = _mlp()
    calib = [torch.randn(8, 64) for _ in range(2)]
    candidates = [int4kit.QuantConfig(group_size=32), int4kit.QuantConfig(bits=8, group_size=-1)]
    table = int4kit.measure_sensitivity(model, candidates, calib, show_progress=False)
    assert "int8 rtn channel sym" in str(table)
    for row in table.layers.values():
        int4_damage, int8_damage, dense_damage = row["damage"]
        assert dense_damage == 0 < int8_damage < int4_damage / 20
        assert row["bytes"][2] > row["bytes"][1] > row["bytes"][0]
    plan = int4kit.plan_mixed_precision(table, bits_per_weight=7)
    assert any(c is not None and c.bits == 8 for c in plan.values())
    with pytest.raises(ValueError, match="no int4 format"):
        int4kit.measure_sensitivity(model, [candidates[1]], calib, show_progress=False)
