"""Tier 4: each misuse raises a Python exception whose message names the problem; none crashes the
interpreter (every case runs in this process, so a crash would take the whole session down)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from int4kit import Int4Linear, QuantConfig, ops, quantize_model
from int4kit import reference as R

from conftest import random_codes, random_weight, unsupported_isas

N, K, G = 8, 64, 32


@pytest.fixture
def canon():
    weight = random_weight(N, K)
    qweight, scales, zeros = R.quantize(weight, G, False)
    packed = ops.prepack(qweight, scales, zeros, G, K)
    return dict(weight=weight, qweight=qweight, scales=scales, zeros=zeros, packed=packed)


# ------------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int8, torch.int64])
def test_pack_codes_wrong_dtype(dtype):
    with pytest.raises(RuntimeError, match=r"codes must be Byte"):
        ops.pack(torch.zeros(3, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
def test_pack_codes_wrong_rank(shape):
    with pytest.raises(RuntimeError, match=r"codes must be 2-D"):
        ops.pack(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize("bad", [16, 0xF0, 255])
@pytest.mark.parametrize("where", [(0, 0), (2, 6), (3, 4)], ids=["first", "last-odd", "mid"])
def test_pack_codes_out_of_range(bad, where):
    codes = random_codes(4, 7)
    codes[where] = bad
    with pytest.raises(RuntimeError, match=r"codes must be in 0\.\.15"):
        ops.pack(codes)


def test_unpack_qweight_wrong_dtype():
    with pytest.raises(RuntimeError, match=r"qweight must be Byte"):
        ops.unpack(torch.zeros(3, 4, dtype=torch.int32), 8)


def test_unpack_qweight_wrong_rank():
    with pytest.raises(RuntimeError, match=r"qweight must be 2-D"):
        ops.unpack(torch.zeros(8, dtype=torch.uint8), 16)


@pytest.mark.parametrize("bad_k", [10, 6, 0, -1, -8])
def test_unpack_wrong_k(bad_k):
    with pytest.raises(RuntimeError, match=rf"K = {bad_k} does not fit qweight"):
        ops.unpack(torch.zeros(3, 4, dtype=torch.uint8), bad_k)


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_quantize_weight_wrong_dtype(dtype):
    with pytest.raises(RuntimeError, match=r"weight must be float32, bfloat16 or float16"):
        ops.quantize(torch.zeros(4, 64, dtype=dtype), 32, True)


@pytest.mark.parametrize("shape", [(64,), (2, 4, 64)])
def test_quantize_weight_wrong_rank(shape):
    with pytest.raises(RuntimeError, match=r"weight must be 2-D"):
        ops.quantize(torch.zeros(shape), 32, True)


@pytest.mark.parametrize("group_size", [0, -2, -3, 1, 3, 33])
def test_quantize_bad_group_size(group_size):
    with pytest.raises(RuntimeError, match=rf"group_size must be -1 .*positive even.*{group_size}"):
        ops.quantize(torch.randn(4, 64), group_size, True)


@pytest.mark.parametrize("group_size", [66, 128])
def test_quantize_group_size_larger_than_k(group_size):
    with pytest.raises(RuntimeError, match=rf"group_size {group_size} is larger than K = 64"):
        ops.quantize(torch.randn(4, 64), group_size, True)


def test_quantize_empty_k():
    with pytest.raises(RuntimeError, match=r"K \(in_features\) must be positive"):
        ops.quantize(torch.empty(4, 0), -1, True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_non_finite_weight(bad, dtype, symmetric):
    weight = torch.randn(4, 64)
    weight[2, 17] = bad
    with pytest.raises(RuntimeError, match=r"weight contains NaN or Inf"):
        ops.quantize(weight.to(dtype), 32, symmetric)


# ------------------------------------------------------------------------------------------------
# dequantize / prepack (same canonical-format checks)
# ------------------------------------------------------------------------------------------------

def _canonical_op(op, c, **override):
    args = dict(qweight=c["qweight"], scales=c["scales"], zeros=c["zeros"], group_size=G, K=K)
    args.update(override)
    if op == "dequantize":
        return ops.dequantize(args["qweight"], args["scales"], args["zeros"], args["group_size"],
                              args["K"], args.get("dtype", torch.float32))
    return ops.prepack(args["qweight"], args["scales"], args["zeros"], args["group_size"], args["K"])


CANONICAL_OPS = ["dequantize", "prepack"]


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_canonical_qweight_wrong_dtype(op, canon, dtype):
    with pytest.raises(RuntimeError, match=r"qweight must be Byte"):
        _canonical_op(op, canon, qweight=canon["qweight"].to(dtype))


@pytest.mark.parametrize("op", CANONICAL_OPS)
def test_canonical_qweight_wrong_rank(op, canon):
    with pytest.raises(RuntimeError, match=r"qweight must be 2-D"):
        _canonical_op(op, canon, qweight=canon["qweight"].reshape(-1))


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("cols", [K // 2 - 1, K // 2 + 1, K])
def test_canonical_qweight_wrong_width(op, canon, cols):
    with pytest.raises(RuntimeError, match=r"qweight must have ceil\(K/2\) = 32 columns"):
        _canonical_op(op, canon, qweight=torch.zeros(N, cols, dtype=torch.uint8))


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64])
def test_canonical_scales_wrong_dtype(op, canon, dtype):
    with pytest.raises(RuntimeError, match=r"scales must be float32, bfloat16 or float16"):
        _canonical_op(op, canon, scales=canon["scales"].to(dtype), zeros=None)


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("shape", [(N, 3), (N, 1), (N - 1, 2), (N * 2,), (1, N, 2)])
def test_canonical_scales_wrong_shape(op, canon, shape):
    with pytest.raises(RuntimeError, match=r"scales must have shape \[8, 2\]"):
        _canonical_op(op, canon, scales=torch.ones(shape), zeros=None)


@pytest.mark.parametrize("op", CANONICAL_OPS)
def test_canonical_scales_shape_for_other_group_size(op, canon):
    # scales made for G = 32 passed with per-channel group size
    with pytest.raises(RuntimeError, match=r"scales must have shape \[8, 1\]"):
        _canonical_op(op, canon, group_size=-1)


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("shape", [(N, 3), (N,), (N - 1, 2), (2, N)])
def test_canonical_zeros_wrong_shape(op, canon, shape):
    with pytest.raises(RuntimeError, match=r"zeros must have the shape of scales"):
        _canonical_op(op, canon, zeros=torch.full(shape, 8.0))


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32, torch.uint8])
def test_canonical_zeros_dtype_mismatch(op, canon, dtype):
    with pytest.raises(RuntimeError, match=r"zeros must have the dtype of scales"):
        _canonical_op(op, canon, zeros=canon["zeros"].to(dtype))


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("group_size", [0, 3, 31, -4])
def test_canonical_bad_group_size(op, canon, group_size):
    with pytest.raises(RuntimeError, match=r"group_size must be -1"):
        _canonical_op(op, canon, group_size=group_size)


@pytest.mark.parametrize("op", CANONICAL_OPS)
def test_canonical_group_size_larger_than_k(op, canon):
    with pytest.raises(RuntimeError, match=r"group_size 128 is larger than K = 64"):
        _canonical_op(op, canon, group_size=128)


@pytest.mark.parametrize("op", CANONICAL_OPS)
@pytest.mark.parametrize("bad_k", [0, -5])
def test_canonical_bad_k(op, canon, bad_k):
    with pytest.raises(RuntimeError, match=r"K \(in_features\) must be positive"):
        _canonical_op(op, canon, K=bad_k)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.uint8])
def test_dequantize_bad_output_dtype(canon, dtype):
    with pytest.raises(RuntimeError, match=r"dtype must be float32, bfloat16 or float16"):
        _canonical_op("dequantize", canon, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# unprepack
# ------------------------------------------------------------------------------------------------

def test_unprepack_packed_wrong_size(canon):
    with pytest.raises(RuntimeError, match=r"packed has \d+ bytes, which is no CPU prepacked layout"):
        ops.unprepack(canon["packed"][:-4], N, K, G, torch.float32)


@pytest.mark.parametrize("n,k,g", [(N + 16, K, G), (N, K, -1), (N, K + 64, G)])
def test_unprepack_sizes_do_not_match_packed(canon, n, k, g):
    with pytest.raises(RuntimeError, match=r"packed has \d+ bytes"):
        ops.unprepack(canon["packed"], n, k, g, torch.float32)


def test_unprepack_packed_wrong_dtype(canon):
    with pytest.raises(RuntimeError, match=r"packed must be Byte"):
        ops.unprepack(canon["packed"].to(torch.int32), N, K, G, torch.float32)


def test_unprepack_packed_wrong_rank(canon):
    with pytest.raises(RuntimeError, match=r"packed must be 1-D"):
        ops.unprepack(canon["packed"].reshape(2, -1), N, K, G, torch.float32)


def test_unprepack_negative_n(canon):
    with pytest.raises(RuntimeError, match=r"N must be >= 0"):
        ops.unprepack(canon["packed"], -1, K, G, torch.float32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_unprepack_bad_scale_dtype(canon, dtype):
    with pytest.raises(RuntimeError, match=r"scale_dtype must be float32, bfloat16 or float16"):
        ops.unprepack(canon["packed"], N, K, G, dtype)


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float64, torch.bool])
def test_linear_x_wrong_dtype(canon, dtype):
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16"):
        ops.linear(torch.zeros(3, K, dtype=dtype), canon["packed"], N, K, G, None)


@pytest.mark.parametrize("shape", [(3, K - 1), (3, K + 1), (K, 3), (3,), (), (2, 3, 2 * K)])
def test_linear_x_wrong_k(canon, shape):
    with pytest.raises(RuntimeError, match=rf"x must have K = {K} features in its last dimension"):
        ops.linear(torch.randn(shape), canon["packed"], N, K, G, None)


def test_linear_packed_wrong_size(canon):
    with pytest.raises(RuntimeError, match=r"packed has \d+ bytes"):
        ops.linear(torch.randn(3, K), canon["packed"][:100], N, K, G, None)


@pytest.mark.parametrize("n,g", [(N + 16, G), (N, -1), (N, 16)])
def test_linear_sizes_do_not_match_packed(canon, n, g):
    with pytest.raises(RuntimeError, match=r"packed has \d+ bytes"):
        ops.linear(torch.randn(3, K), canon["packed"], n, K, g, None)


def test_linear_packed_wrong_dtype(canon):
    with pytest.raises(RuntimeError, match=r"packed must be Byte"):
        ops.linear(torch.randn(3, K), canon["packed"].float(), N, K, G, None)


def test_linear_canonical_qweight_instead_of_packed(canon):
    # a common mistake: passing the canonical qweight instead of the prepacked buffer
    with pytest.raises(RuntimeError, match=r"packed must be 1-D"):
        ops.linear(torch.randn(3, K), canon["qweight"], N, K, G, None)


@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (1,), (1, N), ()])
def test_linear_bias_wrong_shape(canon, shape):
    with pytest.raises(RuntimeError, match=rf"bias must have shape \[{N}\]"):
        ops.linear(torch.randn(3, K), canon["packed"], N, K, G, torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_linear_bias_wrong_dtype(canon, dtype):
    with pytest.raises(RuntimeError, match=r"bias must be float32, bfloat16 or float16"):
        ops.linear(torch.randn(3, K), canon["packed"], N, K, G, torch.zeros(N, dtype=dtype))


@pytest.mark.parametrize("group_size", [0, 3, 33, 128])
def test_linear_bad_group_size(canon, group_size):
    with pytest.raises(RuntimeError, match=r"group_size"):
        ops.linear(torch.randn(3, K), canon["packed"], N, K, group_size, None)


def test_linear_negative_n(canon):
    with pytest.raises(RuntimeError, match=r"N must be >= 0"):
        ops.linear(torch.randn(3, K), canon["packed"], -1, K, G, None)


# ------------------------------------------------------------------------------------------------
# INT4KIT_CPU_ISA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["bogus", "AVX2", "avx", "scalar ", "amx-int8"])
def test_unknown_isa_name(canon, monkeypatch, value):
    monkeypatch.setenv("INT4KIT_CPU_ISA", value)
    with pytest.raises(RuntimeError, match=rf"INT4KIT_CPU_ISA={value}.* is not one of"):
        ops.linear(torch.randn(3, K), canon["packed"], N, K, G, None)
    with pytest.raises(RuntimeError, match=r"INT4KIT_CPU_ISA"):
        ops.cpu_isa()
    # and the next call with a valid setting works again
    monkeypatch.setenv("INT4KIT_CPU_ISA", "scalar")
    ops.linear(torch.randn(3, K), canon["packed"], N, K, G, None)


@pytest.mark.parametrize("name", unsupported_isas() or ["<none>"])
def test_unsupported_isa(canon, monkeypatch, name):
    if name == "<none>":
        pytest.skip("every CPU path int4kit has is supported on this CPU")
    monkeypatch.setenv("INT4KIT_CPU_ISA", name)
    with pytest.raises(RuntimeError, match=rf"INT4KIT_CPU_ISA={name} is not supported by this CPU"):
        ops.linear(torch.randn(3, K), canon["packed"], N, K, G, None)


def test_unknown_isa_name_is_not_supported():
    assert not ops.cpu_isa_supported("bogus")
    assert "bogus" not in ops.cpu_isas()


def test_unknown_isa_does_not_crash_in_a_fresh_interpreter():
    # the variable is set before the library loads: importing must work, the first linear raises
    code = ("import torch, int4kit\n"
            "from int4kit import ops\n"
            "q, s, z = ops.quantize(torch.randn(8, 64), 32, False)\n"
            "packed = ops.prepack(q, s, z, 32, 64)\n"
            "try:\n"
            "    ops.linear(torch.randn(2, 64), packed, 8, 64, 32)\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    env = {**os.environ, "INT4KIT_CPU_ISA": "bogus"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RAISED" in out.stdout and "INT4KIT_CPU_ISA=bogus" in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------------
# Int4Linear, QuantConfig, quantize_model
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_from_linear_non_finite_weight(bad, dtype):
    linear = nn.Linear(64, 8).to(dtype)
    with torch.no_grad():
        linear.weight[3, 5] = bad
    with pytest.raises(RuntimeError, match=r"weight contains NaN or Inf"):
        Int4Linear.from_linear(linear, group_size=32)


@pytest.mark.parametrize("obj", [nn.Conv1d(4, 4, 1), torch.randn(8, 64), nn.Sequential(nn.Linear(64, 8)),
                                 None, "linear"], ids=["conv", "tensor", "sequential", "none", "str"])
def test_from_linear_wrong_type(obj):
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear"):
        Int4Linear.from_linear(obj)


def test_from_linear_wrong_weight_dtype():
    with pytest.raises(TypeError, match=r"linear.weight must be float32, bfloat16 or float16"):
        Int4Linear.from_linear(nn.Linear(64, 8).double(), group_size=32)


@pytest.mark.parametrize("group_size", [0, 3, 33, -2])
def test_from_linear_bad_group_size(group_size):
    with pytest.raises(ValueError, match=rf"group_size must be -1 .*positive even.*{group_size}"):
        Int4Linear.from_linear(nn.Linear(64, 8), group_size=group_size)


def test_from_linear_group_size_larger_than_in_features():
    with pytest.raises(ValueError, match=r"group_size 128 is larger than in_features = 64"):
        Int4Linear.from_linear(nn.Linear(64, 8), group_size=128)


@pytest.mark.parametrize("group_size", [32.0, "32", True, None])
def test_from_linear_group_size_wrong_type(group_size):
    with pytest.raises(TypeError, match=r"group_size must be an int"):
        Int4Linear.from_linear(nn.Linear(64, 8), group_size=group_size)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"in_features must be positive"):
        Int4Linear(0, 8, group_size=-1)
    with pytest.raises(ValueError, match=r"out_features non-negative"):
        Int4Linear(64, -1, group_size=32)
    with pytest.raises(ValueError, match=r"group_size must be -1"):
        Int4Linear(64, 8, group_size=7)
    with pytest.raises(ValueError, match=r"group_size 128 is larger than in_features"):
        Int4Linear(64, 8, group_size=128)
    with pytest.raises(TypeError, match=r"scale_dtype must be float32, bfloat16 or float16"):
        Int4Linear(64, 8, group_size=32, scale_dtype=torch.float64)


def test_from_quantized_rejects_bad_shapes(canon):
    with pytest.raises(RuntimeError, match=r"scales must have shape"):
        Int4Linear.from_quantized(canon["qweight"], canon["scales"][:, :1], None, G, K)
    with pytest.raises(RuntimeError, match=r"qweight must have ceil\(K/2\)"):
        Int4Linear.from_quantized(canon["qweight"], canon["scales"], canon["zeros"], G, K + 2)
    with pytest.raises(RuntimeError, match=r"zeros must have the dtype of scales"):
        Int4Linear.from_quantized(canon["qweight"], canon["scales"], canon["zeros"].half(), G, K)


@pytest.fixture
def layer():
    return Int4Linear.from_linear(nn.Linear(K, N), group_size=G, symmetric=False)


def test_forward_wrong_features(layer):
    with pytest.raises(RuntimeError, match=rf"x must have K = {K} features"):
        layer(torch.randn(3, K + 1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_forward_wrong_dtype(layer, dtype):
    with pytest.raises(RuntimeError, match=r"x must be float32, bfloat16 or float16"):
        layer(torch.zeros(3, K, dtype=dtype))


def _fresh(symmetric=False, bias=True):
    return Int4Linear(K, N, bias=bias, group_size=G, symmetric=symmetric)


def _weights(module):
    """A snapshot of the quantized weight (the canonical tensors, cloned)."""
    return {k: v.clone() for k, v in module.state_dict().items() if k != "bias"}


def _assert_unchanged(module, before):
    # nn.Module itself loads the other tensors (the bias) before it reports missing keys; what
    # must not happen is a quantized weight half-replaced by an inconsistent checkpoint
    after = _weights(module)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed by a failed load"


@pytest.mark.parametrize("key,bad", [
    ("qweight", torch.zeros(N, K // 2 - 1, dtype=torch.uint8)),
    ("qweight", torch.zeros(N + 1, K // 2, dtype=torch.uint8)),
    ("qweight", torch.zeros(N * K // 2, dtype=torch.uint8)),
    ("qweight", torch.zeros(N, K // 2, dtype=torch.int8)),
    ("scales", torch.ones(N, 1)),
    ("scales", torch.ones(N, 2, dtype=torch.float64)),
    ("scales", torch.ones(N, 2, dtype=torch.int32)),
    ("zeros", torch.ones(N, 3)),
    ("zeros", torch.ones(N, 2, dtype=torch.bfloat16)),
], ids=["qweight-narrow", "qweight-rows", "qweight-1d", "qweight-int8", "scales-shape",
        "scales-fp64", "scales-int", "zeros-shape", "zeros-dtype"])
def test_load_state_dict_wrong_tensor(layer, key, bad):
    state = layer.state_dict()
    state[key] = bad
    target = _fresh()
    before = _weights(target)
    with pytest.raises(RuntimeError, match=rf"{key}: expected shape"):
        target.load_state_dict(state)
    _assert_unchanged(target, before)


def test_load_state_dict_wrong_bias_shape(layer):
    state = layer.state_dict()
    state["bias"] = torch.zeros(N + 1)
    with pytest.raises(RuntimeError, match=r"size mismatch for bias"):
        _fresh().load_state_dict(state)


@pytest.mark.parametrize("key", ["qweight", "scales", "zeros", "bias"])
def test_load_state_dict_missing_key(layer, key):
    state = layer.state_dict()
    del state[key]
    target = _fresh()
    before = _weights(target)
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*\"{key}\""):
        target.load_state_dict(state)
    if key != "bias":  # without the bias the weight itself is complete and loads, as in nn.Linear
        _assert_unchanged(target, before)


def test_load_state_dict_missing_key_non_strict(layer):
    state = layer.state_dict()
    del state["scales"]
    target = _fresh()
    before = _weights(target)
    result = target.load_state_dict(state, strict=False)
    assert "scales" in result.missing_keys
    _assert_unchanged(target, before)  # a partial checkpoint must not half-load the weight


def test_load_state_dict_unexpected_key(layer):
    state = layer.state_dict()
    state["packed"] = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"packed\""):
        _fresh().load_state_dict(state)


def test_load_asymmetric_checkpoint_into_symmetric_module(layer):
    target = _fresh(symmetric=True)
    before = _weights(target)
    with pytest.raises(RuntimeError, match=r"zeros is present but this Int4Linear is symmetric"):
        target.load_state_dict(layer.state_dict())
    _assert_unchanged(target, before)


def test_load_symmetric_checkpoint_into_asymmetric_module():
    symmetric = Int4Linear.from_linear(nn.Linear(K, N), group_size=G, symmetric=True)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"zeros\""):
        _fresh(symmetric=False).load_state_dict(symmetric.state_dict())


def test_load_checkpoint_with_other_group_size():
    other = Int4Linear.from_linear(nn.Linear(K, N), group_size=16, symmetric=False)
    with pytest.raises(RuntimeError, match=r"scales: expected shape \[8, 2\]"):
        _fresh().load_state_dict(other.state_dict())


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(group_size=0), ValueError, r"group_size"),
    (dict(group_size=3), ValueError, r"group_size"),
    (dict(group_size=-2), ValueError, r"group_size"),
    (dict(group_size=64.0), ValueError, r"group_size"),
    (dict(group_size="128"), ValueError, r"group_size"),
    (dict(group_size=True), ValueError, r"group_size"),
    (dict(symmetric=1), TypeError, r"symmetric must be a bool"),
    (dict(symmetric="yes"), TypeError, r"symmetric must be a bool"),
    (dict(method="spqr"), ValueError, r"method 'spqr' is unknown"),
    (dict(method="RTN"), ValueError, r"method 'RTN' is unknown"),
    (dict(method=None), ValueError, r"method None is unknown"),
    (dict(refine_rounds=-1), ValueError, r"refine_rounds must be a non-negative int"),
    (dict(refine_rounds=2.0), ValueError, r"refine_rounds must be a non-negative int"),
    (dict(refine_rounds=True), ValueError, r"refine_rounds must be a non-negative int"),
])
def test_quant_config_rejects(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("config", ["rtn", 128, dict(group_size=128)])
def test_quantize_model_wrong_config_type(config):
    with pytest.raises(TypeError, match=r"config must be an int4kit.QuantConfig"):
        quantize_model(nn.Sequential(nn.Linear(256, 8)), config)


def test_quantize_model_non_finite_weight_names_the_weight():
    model = nn.Sequential(nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"weight contains NaN or Inf"):
        quantize_model(model, QuantConfig(group_size=32))


def test_quantize_model_on_a_bare_linear():
    # the root module cannot be swapped in place: quantize_model must say so (or skip it with a
    # reason), not fail with an AttributeError about an empty attribute name
    model = nn.Linear(256, 8)
    try:
        report = quantize_model(model, QuantConfig(group_size=128))
    except (TypeError, ValueError) as e:
        assert "Linear" in str(e) or "root" in str(e) or "model" in str(e)
    else:
        assert report.swapped == [] and [name for name, _ in report.skipped] == [""]
