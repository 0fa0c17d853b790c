"""Int4Linear, its state dict, quantize_model and QuantConfig; a CUDA section that skips without a GPU."""
import copy

import pytest
import torch
import torch.nn as nn

from int4kit import Int4Linear, QuantConfig, QuantReport, ops, quantize_model
from int4kit import reference as R

from conftest import make_linear, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def reference_output(module, x):
    qweight, scales, zeros = module.canonical()
    return R.linear(x, qweight.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(),
                    module.group_size, None if module.bias is None else module.bias.cpu())


def check_module(module, x):
    y = module(x)
    assert y.dtype == x.dtype
    assert tuple(y.shape) == (*x.shape[:-1], module.out_features)
    ref = reference_output(module, x.cpu())
    err = rel_err(y, ref)
    assert err <= TOL[x.dtype], f"relative error {err:.3g} > {TOL[x.dtype]:g}"
    return y


# ------------------------------------------------------------------------------------------------
# from_linear and forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(100, 7, 32), (256, 37, -1), (130, 17, 6), (512, 64, 128)],
                         ids=lambda s: f"K{s[0]}-N{s[1]}-G{s[2]}")
def test_from_linear_matches_reference(shape, symmetric, bias, x_dtype):
    K, N, G = shape
    module = Int4Linear.from_linear(make_linear(K, N, bias), group_size=G, symmetric=symmetric)
    check_module(module, torch.randn(9, K).to(x_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_from_low_precision_linear(dtype, symmetric):
    # a bf16/fp16 model: scales in the weight's dtype, bias and activations too
    linear = make_linear(192, 40, True, dtype)
    module = Int4Linear.from_linear(linear, group_size=64, symmetric=symmetric)
    assert module.scale_dtype == dtype
    assert module.bias.dtype == dtype
    check_module(module, torch.randn(5, 192).to(dtype))


@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(2, 3), (2, 1, 4), (), (1,)], ids=["2x3", "2x1x4", "1d", "1"])
def test_forward_leading_dims(lead, x_dtype):
    module = Int4Linear.from_linear(make_linear(130, 17), group_size=6, symmetric=False)
    check_module(module, torch.randn(*lead, 130).to(x_dtype))


@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)], ids=["0", "2x0", "0x5"])
def test_forward_empty_batch(lead, x_dtype):
    module = Int4Linear.from_linear(make_linear(64, 24), group_size=32)
    y = module(torch.randn(*lead, 64).to(x_dtype))
    assert tuple(y.shape) == (*lead, 24) and y.dtype == x_dtype


def test_forward_matches_the_dense_layer_roughly():
    # sanity of the whole pipeline: int4 output close to the float layer's (quantization error)
    linear = make_linear(512, 64)
    module = Int4Linear.from_linear(linear, group_size=32, symmetric=False)
    x = torch.randn(16, 512)
    with torch.no_grad():
        assert rel_err(module(x), linear(x)) < 0.2


def test_empty_module_is_the_zero_weight():
    module = Int4Linear(64, 12, bias=True, group_size=32, symmetric=False)
    with torch.no_grad():
        module.bias.copy_(torch.arange(12.0))
    x = torch.randn(3, 64)
    y = check_module(module, x)
    # the kernels fold the zero point into per-group sums of x (q * s + b), so "exactly zero"
    # comes out as a cancellation of float32 sums: allow a few ulps of 8 * sum|x|
    torch.testing.assert_close(y, torch.arange(12.0).expand(3, 12), rtol=0, atol=1e-4)


def test_extra_repr():
    module = Int4Linear.from_linear(make_linear(192, 40, bias=False, dtype=torch.bfloat16),
                                    group_size=64, symmetric=False)
    text = repr(module)
    assert "group_size=64" in text
    assert "in_features=192" in text and "out_features=40" in text
    assert "bias=False" in text and "symmetric=False" in text and "bfloat16" in text


# ------------------------------------------------------------------------------------------------
# layout: only the prepacked copy on CPU
# ------------------------------------------------------------------------------------------------

def test_cpu_module_holds_only_the_prepacked_copy():
    linear = make_linear(130, 17)
    module = Int4Linear.from_linear(linear, group_size=6, symmetric=False)
    assert module.packed is not None and module.packed.dtype == torch.uint8
    assert module.qweight is None and module.scales is None and module.zeros is None
    assert [name for name, _ in module.named_buffers()] == ["packed"]
    assert "packed" not in module.state_dict()
    # the prepacked bytes are the canonical weights of reference.quantize, laid out for the CPU
    rq, rs, rz = R.quantize(linear.weight.detach(), 6, False)
    assert torch.equal(module.packed, ops.prepack(rq, rs, rz, 6, 130))


def test_layout_after_load_and_to():
    source = Int4Linear.from_linear(make_linear(64, 24), group_size=32, symmetric=False)
    module = Int4Linear(64, 24, bias=True, group_size=32, symmetric=False)
    module.load_state_dict(source.state_dict())
    module = module.to("cpu").to(torch.bfloat16).float()
    assert [name for name, _ in module.named_buffers()] == ["packed"]
    assert module.qweight is None and module.scales is None and module.zeros is None


# ------------------------------------------------------------------------------------------------
# state dict: canonical, portable, bit-exact
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(130, 17, 6), (256, 40, -1), (100, 3, 32)],
                         ids=lambda s: f"K{s[0]}-N{s[1]}-G{s[2]}")
def test_state_dict_is_reference_quantize(shape, symmetric, bias, dtype):
    K, N, G = shape
    linear = make_linear(K, N, bias, dtype)
    module = Int4Linear.from_linear(linear, group_size=G, symmetric=symmetric)
    state = module.state_dict()
    expected = ["qweight", "scales"] + ([] if symmetric else ["zeros"]) + (["bias"] if bias else [])
    assert sorted(state) == sorted(expected)
    rq, rs, rz = R.quantize(linear.weight.detach(), G, symmetric)
    groups = -(-K // (K if G == -1 else G))
    assert state["qweight"].dtype == torch.uint8 and tuple(state["qweight"].shape) == (N, (K + 1) // 2)
    assert state["scales"].dtype == dtype and tuple(state["scales"].shape) == (N, groups)
    assert torch.equal(state["qweight"], rq)
    assert torch.equal(state["scales"], rs)
    if not symmetric:
        assert state["zeros"].dtype == dtype and torch.equal(state["zeros"], rz)
    if bias:
        assert state["bias"].dtype == dtype and torch.equal(state["bias"], linear.bias.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_save_load_round_trip(tmp_path, symmetric, bias, dtype):
    K, N, G = 130, 17, 6
    module = Int4Linear.from_linear(make_linear(K, N, bias, dtype), group_size=G,
                                    symmetric=symmetric)
    path = tmp_path / "int4linear.pt"
    torch.save(module.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = Int4Linear(K, N, bias, G, symmetric, dtype)
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    saved, loaded = module.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype, key
        assert torch.equal(saved[key], loaded[key]), key
    assert torch.equal(fresh.packed, module.packed)
    x = torch.randn(2, 5, K).to(dtype)
    assert torch.equal(fresh(x), module(x))


def test_load_state_dict_replaces_the_weight():
    # loading into a module that already holds other weights replaces them completely
    a = Int4Linear.from_linear(make_linear(64, 24), group_size=32, symmetric=False)
    b = Int4Linear.from_linear(make_linear(64, 24), group_size=32, symmetric=False)
    assert not torch.equal(a.packed, b.packed)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))
    check_module(b, x)


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16])
def test_to_dtype_casts_bias_only(target):
    module = Int4Linear.from_linear(make_linear(130, 17), group_size=6, symmetric=False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    packed = module.packed.clone()
    module = module.to(target)
    assert module.bias.dtype == target
    assert module.scale_dtype == torch.float32
    after = module.state_dict()
    for key in ("qweight", "scales", "zeros"):
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key], before[key]), key
    assert torch.equal(module.packed, packed)
    assert torch.equal(after["bias"], before["bias"].to(target))
    x = torch.randn(4, 130).to(target)
    check_module(module, x)
    # and back
    module = module.float()
    assert module.bias.dtype == torch.float32
    assert torch.equal(module.state_dict()["scales"], before["scales"])


def test_deepcopy():
    module = Int4Linear.from_linear(make_linear(64, 24), group_size=32, symmetric=False)
    clone = copy.deepcopy(module)
    assert clone.packed.data_ptr() != module.packed.data_ptr()
    x = torch.randn(3, 64)
    assert torch.equal(clone(x), module(x))


# ------------------------------------------------------------------------------------------------
# quantize_model
# ------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 64)           # in_features 16 < group size 32
        self.blocks = nn.ModuleList([Block(64, 128), Block(64, 128), Block(64, 128)])
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)
        self.classifier_a = nn.Linear(64, 4)
        self.classifier_b = nn.Linear(64, 4)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return torch.cat([self.head(h), self.classifier_a(h), self.classifier_b(h)], dim=-1)


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_quantize_model_swaps_skips_and_reports():
    torch.manual_seed(3)
    model = Net()
    original = copy.deepcopy(model)
    bytes_before = _state_bytes(model)
    report = quantize_model(model, QuantConfig(group_size=32, symmetric=False),
                            skip=["head", "classifier_*"],
                            filter_fn=lambda name, module: name != "blocks.1.down")
    assert isinstance(report, QuantReport)
    expected_swapped = {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.2.up", "blocks.2.down"}
    assert set(report.swapped) == expected_swapped
    skipped = dict(report.skipped)
    assert set(skipped) == {"embed", "head", "classifier_a", "classifier_b", "blocks.1.down"}
    assert "skip" in skipped["head"] and "skip" in skipped["classifier_a"]
    assert "filter_fn" in skipped["blocks.1.down"]
    assert "in_features 16" in skipped["embed"] and "32" in skipped["embed"]
    for name, module in model.named_modules():
        if name in expected_swapped:
            assert isinstance(module, Int4Linear), name
            dense = original.get_submodule(name)
            assert module.group_size == 32 and not module.symmetric
            qweight, scales, zeros = module.canonical()
            rq, rs, rz = R.quantize(dense.weight.detach(), 32, False)
            assert torch.equal(qweight, rq) and torch.equal(scales, rs) and torch.equal(zeros, rz)
            assert (module.bias is None) == (dense.bias is None)
        elif name in skipped:
            assert type(module) is nn.Linear, name
            assert torch.equal(module.weight, original.get_submodule(name).weight)
    assert report.bytes_before == bytes_before
    assert report.bytes_after == _state_bytes(model)
    assert report.bytes_before > report.bytes_after
    assert report.compression > 1
    text = str(report)
    assert "swapped 5" in text and "blocks.1.down" in text
    # the quantized model still runs and is close to the original
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) < 0.1


def test_quantize_model_sequential_defaults():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                          nn.Linear(256, 8))
    report = quantize_model(model)  # QuantConfig(): group 128, symmetric
    assert report.swapped == ["0", "2", "4"]
    assert report.skipped == []
    assert all(isinstance(model[i], Int4Linear) for i in (0, 2, 4))
    assert model[0].group_size == 128 and model[0].symmetric
    assert not any(key.endswith("zeros") for key in model.state_dict())
    assert report.bytes_after < report.bytes_before / 4
    # running it again finds nothing left to do
    again = quantize_model(model)
    assert again.swapped == [] and again.bytes_before == again.bytes_after


def test_quantize_model_skip_as_a_string_and_per_channel():
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20))
    report = quantize_model(model, QuantConfig(group_size=-1), skip="1")
    assert report.swapped == ["0"] and [n for n, _ in report.skipped] == ["1"]
    assert isinstance(model[0], Int4Linear) and model[0].group_size == -1
    assert type(model[1]) is nn.Linear


def test_quantize_model_state_dict_round_trip(tmp_path):
    torch.manual_seed(5)
    a, b = Net(), Net()
    cfg = QuantConfig(group_size=32, symmetric=False)
    quantize_model(a, cfg)
    quantize_model(b, cfg)
    torch.save(a.state_dict(), tmp_path / "model.pt")
    b.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kwargs", [dict(), dict(group_size=-1), dict(group_size=2),
                                    dict(group_size=64, symmetric=False), dict(method="rtn")])
def test_quant_config_accepts(kwargs):
    config = QuantConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize("kwargs", [dict(group_size=0), dict(group_size=5), dict(group_size=-4),
                                    dict(group_size=1.5), dict(symmetric="no"),
                                    dict(method="smoothquant")])
def test_quant_config_rejects(kwargs):
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        QuantConfig(**kwargs)
