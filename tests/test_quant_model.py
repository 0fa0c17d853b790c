"""quantize_model with the calibration-based methods: the calibration engine, folding, bad input."""
import copy

import pytest
import torch
import torch.nn as nn

from int4kit import Int4Linear, QuantConfig, quantize_model
from int4kit import reference as R
from int4kit.quant import calibration
from int4kit.quant import model as qmodel

from conftest import rel_err

METHODS = ["rtn", "hqq", "gptq", "awq", "awq+gptq"]
SETTINGS = [(32, False), (-1, True)]


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    config = transformers.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_batches(n=3, B=4, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 60, (B, T), generator=g)
        lengths = torch.randint(3, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def layer_inputs(model, batch, names):
    seen = {}

    def make_hook(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs[0].detach())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("setting", SETTINGS, ids=["g32-asym", "chan-sym"])
@pytest.mark.parametrize("method", METHODS)
def test_quantize_bert_each_method(method, setting):
    G, sym = setting
    model = tiny_bert()
    original = copy.deepcopy(model)
    data = bert_batches()
    report = quantize_model(model, QuantConfig(group_size=G, symmetric=sym, method=method),
                            calib_data=data if method not in ("rtn", "hqq") else None)
    assert len(report.swapped) == 2 * 6 + 1 and not report.fallbacks
    batch = data[0]
    names = report.swapped
    q_inputs = layer_inputs(model, batch, names)
    fp_inputs = layer_inputs(original, batch, names)
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, Int4Linear), name
        assert module.group_size == G and module.symmetric == sym
        # the module computes exactly what its own canonical weights say
        x = q_inputs[name]
        qweight, scales, zeros = module.canonical()
        xs = x if module.input_scale is None else x * module.input_scale
        ref = R.linear(xs, qweight, scales, zeros, G, module.bias)
        assert rel_err(module(x), ref) <= 1e-5, name
        # and, mapped back through any AWQ fold, approximates the original layer
        in_mul, out_mul = report.io_scales.get(name, (None, None))
        xf = fp_inputs[name]
        y = module(xf if in_mul is None else xf * in_mul)
        y = y if out_mul is None else y * out_mul
        assert rel_err(y, original.get_submodule(name)(xf)) < 0.25, name
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        ref_out = original(**batch).last_hidden_state
    assert rel_err(out, ref_out) < 0.2
    if method.startswith("awq"):
        value = "encoder.layer.0.attention.self.value"
        dense = "encoder.layer.0.attention.output.dense"
        assert model.get_submodule(dense).input_scale is None  # folded into value
        assert value in report.io_scales and dense in report.io_scales
        assert model.get_submodule("encoder.layer.0.intermediate.dense").input_scale is not None
    if method in ("gptq", "awq", "awq+gptq"):
        assert set(report.layer_errors) == set(names)


def test_awq_state_dict_round_trip(tmp_path):
    model = tiny_bert()
    quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="awq"),
                   calib_data=bert_batches())
    state = model.state_dict()
    assert "encoder.layer.1.output.dense.input_scale" in state
    assert "encoder.layer.1.attention.output.dense.input_scale" not in state
    fresh = tiny_bert()
    quantize_model(fresh, QuantConfig(group_size=32, symmetric=False))  # plain RTN skeleton
    torch.save(state, tmp_path / "awq.pt")
    fresh.load_state_dict(torch.load(tmp_path / "awq.pt", weights_only=True))
    batch = bert_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_input_scale_module_behaviour():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    module = Int4Linear.from_linear(lin, 32, False)
    plain_state = module.state_dict()
    assert "input_scale" not in plain_state
    module.input_scale = torch.rand(64) + 0.5
    x = torch.randn(3, 64)
    qweight, scales, zeros = module.canonical()
    ref = R.linear(x * module.input_scale, qweight, scales, zeros, 32, module.bias)
    assert rel_err(module(x), ref) <= 1e-5
    state = module.state_dict()
    assert torch.equal(state["input_scale"], module.input_scale)
    other = Int4Linear(64, 8, True, 32, False)
    other.load_state_dict(state)
    assert torch.equal(other(x), module(x))
    bad = dict(state, input_scale=torch.ones(63))
    with pytest.raises(RuntimeError, match="input_scale"):
        Int4Linear(64, 8, True, 32, False).load_state_dict(bad)
    # a module with an input scale, loading a checkpoint without one, reports the missing key
    with pytest.raises(RuntimeError, match="input_scale"):
        other.load_state_dict(plain_state)
    assert module.to(torch.float16).input_scale.dtype == torch.float16


# ---- calibration engine -------------------------------------------------------------------------

class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)
        self.never = nn.Linear(16, 16)

    def forward(self, x, attention_mask=None):
        return self.b(torch.relu(self.a(x)))


def test_padding_tokens_left_out_of_statistics():
    net = MaskedNet()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    stats = calibration.collect(net, [{"x": x, "attention_mask": mask}], {"a": net.a})
    rows = x[mask.bool()]
    assert stats["a"].count == 7
    torch.testing.assert_close(stats["a"].absmean, rows.double().abs().mean(0))
    if calibration._fast_bf16_matmul():
        # X^T X runs in bf16 on AMX: the reference is the float64 product of the bf16-rounded
        # rows, and the product itself is rounded to bf16 (8 bits) once
        r = rows.bfloat16().double()
        torch.testing.assert_close(stats["a"].hessian, (r.T @ r) / 7, rtol=2 ** -8, atol=1e-6)
    else:
        torch.testing.assert_close(stats["a"].hessian, (rows.double().T @ rows.double()) / 7)


def test_calib_max_tokens_and_item_kinds():
    net = nn.Sequential(nn.Linear(8, 8))
    data = [torch.randn(10, 8), (torch.randn(10, 8),)]
    stats = calibration.collect(net, data, {"0": net[0]}, max_tokens=15)
    assert stats["0"].count == 15


def test_true_sequential_calibration(monkeypatch):
    """Layer 2's Hessian comes from layer 1 already quantized."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    original = copy.deepcopy(net)
    data = [torch.randn(40, 64) for _ in range(2)]
    seen = {}
    real = qmodel.gptq

    def spy(w, H, *args, **kwargs):
        seen[w.shape] = H.clone()
        return real(w, H, *args, **kwargs)

    monkeypatch.setattr(qmodel, "gptq", spy)
    quantize_model(net, QuantConfig(group_size=32, symmetric=False, method="gptq"), calib_data=data)
    x = torch.cat(data)
    with torch.no_grad():
        h_q = torch.relu(net[0](x)).double()
        h_fp = torch.relu(original[0](x)).double()
    H2 = seen[torch.Size([32, 64])]
    # with bf16 statistics (AMX) the references take bf16-rounded inputs, and the product's own
    # rounding (8 bits) sets the tolerance
    bf16 = calibration._fast_bf16_matmul()

    def hessian(h):
        h = h.bfloat16().double() if bf16 else h
        return h.T @ h / x.shape[0]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    tol = 2 ** -8 if bf16 else 1e-6
    assert rel(H2, hessian(h_q)) <= tol
    assert rel(H2, hessian(h_fp)) > 3 * tol


class TinyRMSNorm(nn.Module):
    """Like transformers' LlamaRMSNorm: found by its class name, eps in `variance_epsilon`."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, u):
        ms = u.pow(2).mean(-1, keepdim=True)
        return self.weight * u * torch.rsqrt(ms + self.variance_epsilon)


class NormNet(nn.Module):
    """a -> post-LN residual sum (LayerNorm); b -> RMS norm; c: no norm after it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16, eps=1e-3)
        self.b = nn.Linear(16, 24)
        self.rms = TinyRMSNorm(24)
        self.c = nn.Linear(24, 8)

    def forward(self, x, attention_mask=None):
        h = self.ln(x + self.a(x))
        return self.c(torch.relu(self.rms(self.b(h))))


def norm_net_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    out = []
    for _ in range(2):
        x = torch.randn(3, 6, 16, generator=g)
        x[:, 0] *= 6  # one token with a large residual, as BERT's [CLS]
        out.append({"x": x, "attention_mask": mask})
    return out


def weighted_hessian_reference(net, data, layer, norm, rms):
    """Float64, directly: sum_t x_t x_t^T / sigma_t^2 / tokens, sigma_t^2 of `norm`'s input
    (variance + eps, or mean square + eps), padding left out. With bf16 statistics (AMX) the rows
    x_t / sigma_t are rounded to bf16 first, as LayerStats does."""
    num, count = 0, 0
    for item in data:
        seen = {}

        def grab(key):
            def hook(module, inputs, *output):
                seen[key] = inputs[0]  # returns None: the forward is left as it is
            return hook

        hooks = [layer.register_forward_hook(grab("x")), norm.register_forward_pre_hook(grab("u"))]
        with torch.no_grad():
            net(**item)
        for h in hooks:
            h.remove()
        keep = item["attention_mask"] != 0
        x, u = seen["x"][keep].double(), seen["u"][keep].double()
        eps = norm.variance_epsilon if rms else norm.eps
        var = u.pow(2).mean(-1) if rms else u.var(-1, unbiased=False)
        xw = x / (var + eps).sqrt()[:, None]
        if calibration._fast_bf16_matmul():
            xw = xw.float().bfloat16().double()
        num = num + xw.T @ xw
        count += x.shape[0]
    return num / count


def test_norm_weighting_matches_float64_reference():
    torch.manual_seed(0)
    net = NormNet().eval()
    data = norm_net_data()
    layers = {"a": net.a, "b": net.b, "c": net.c}
    norms = calibration.plan_norms(net, data[0], layers)
    assert norms == {"a": net.ln, "b": net.rms}  # c: no norm after it
    stats = calibration.collect(net, data, layers, norms=norms)
    tol = 2 ** -7 if calibration._fast_bf16_matmul() else 1e-6
    for name, norm, rms in (("a", net.ln, False), ("b", net.rms, True)):
        ref = weighted_hessian_reference(net, data, layers[name], norm, rms)
        assert stats[name].count == 2 * 12
        assert ((stats[name].hessian - ref).norm() / ref.norm()).item() <= tol, name
    # the absolute mean stays unweighted; c, with no norm after it, is unchanged
    plain = calibration.collect(net, data, layers)
    torch.testing.assert_close(stats["a"].absmean, plain["a"].absmean)
    torch.testing.assert_close(stats["c"].hessian, plain["c"].hessian)
    # the weighting is not a no-op here: the large token is down-weighted
    assert ((stats["a"].hessian - plain["a"].hessian).norm() / plain["a"].hessian.norm()) > 0.1


def test_norm_weighting_in_quantize_model(monkeypatch):
    """GPTQ receives the weighted Hessian; the whole BERT quantizes with the option on."""
    torch.manual_seed(0)
    net = NormNet().eval()
    data = norm_net_data()
    ref = weighted_hessian_reference(net, data, net.a, net.ln, False)
    seen = {}
    real = qmodel.gptq

    def spy(w, H, *args, **kwargs):
        seen.setdefault(tuple(w.shape), H.clone())
        return real(w, H, *args, **kwargs)

    monkeypatch.setattr(qmodel, "gptq", spy)
    quantize_model(net, QuantConfig(group_size=16, symmetric=False, method="gptq",
                                    norm_weighting=True), calib_data=data)
    tol = 2 ** -7 if calibration._fast_bf16_matmul() else 1e-6
    H = seen[(16, 16)]
    assert ((H - ref).norm() / ref.norm()).item() <= tol

    monkeypatch.setattr(qmodel, "gptq", real)
    model = tiny_bert()
    original = copy.deepcopy(model)
    batches = bert_batches()
    report = quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="gptq",
                                               norm_weighting=True), calib_data=batches)
    assert len(report.swapped) == 2 * 6 + 1 and not report.fallbacks
    with torch.no_grad():
        out = model(**batches[0]).last_hidden_state
        ref_out = original(**batches[0]).last_hidden_state
    assert rel_err(out, ref_out) < 0.2


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_quantize_bert_refined_gptq(method):
    """refine_rounds: fractional zero points that the kernels and a state-dict round trip keep."""
    model = tiny_bert()
    original = copy.deepcopy(model)
    batches = bert_batches()
    report = quantize_model(model, QuantConfig(group_size=32, symmetric=False, method=method,
                                               refine_rounds=3), calib_data=batches)
    assert len(report.swapped) == 2 * 6 + 1 and not report.fallbacks
    fractional = 0
    for name in report.swapped:
        module = model.get_submodule(name)
        qweight, scales, zeros = module.canonical()
        fractional += int((zeros != torch.round(zeros)).any())
        x = torch.randn(5, module.in_features)
        xs = x if module.input_scale is None else x * module.input_scale
        assert rel_err(module(x), R.linear(xs, qweight, scales, zeros, 32, module.bias)) <= 1e-5
        again = Int4Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           group_size=32, symmetric=False)
        again.load_state_dict(module.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(again.canonical(), (qweight, scales, zeros)))
    assert fractional >= len(report.swapped) // 2
    with torch.no_grad():
        out = model(**batches[0]).last_hidden_state
        ref_out = original(**batches[0]).last_hidden_state
    assert rel_err(out, ref_out) < 0.2


class PooledNormNet(nn.Module):
    """a's rows reach its norm only after a mean over the sequence (other row count); the norm is
    called with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.c = nn.Linear(16, 8)

    def forward(self, x, attention_mask=None):
        return self.c(self.ln(input=self.a(x).mean(1)))


def test_norm_weighting_falls_back_per_layer_and_reports_it():
    torch.manual_seed(0)
    net = PooledNormNet().eval()
    data = [{"x": torch.randn(3, 6, 16)} for _ in range(2)]
    norms = calibration.plan_norms(net, data[0], {"a": net.a})
    assert norms == {"a": net.ln}
    stats = calibration.collect(net, data, {"a": net.a}, norms=norms)
    assert stats["a"].norm_weighted is False  # 18 rows in, 3 rows at the norm
    report = quantize_model(net, QuantConfig(group_size=16, method="gptq"), calib_data=data)
    assert any(name == "a" and "norm weighting off" in note for name, note in report.notes)


def test_gptq_layer_whose_hessian_fails_keeps_rtn_with_a_note(monkeypatch):
    """quantize_model's GPTQ guard: a layer whose Hessian GPTQ cannot factorise (its memory is
    gone by then) gets plain rounding's codes and a note naming it; the others keep GPTQ."""
    from int4kit.quant.gptq import HessianError
    real_gptq = qmodel.gptq

    def failing_for_c(w, H, *args, **kwargs):
        if w.shape[0] == 8:  # layer c
            raise HessianError("GPTQ: the Hessian of this layer (16 inputs) is not positive "
                               "definite with damping 0.01")
        return real_gptq(w, H, *args, **kwargs)

    monkeypatch.setattr(qmodel, "gptq", failing_for_c)
    torch.manual_seed(0)
    net = PooledNormNet().eval()
    data = [{"x": torch.randn(3, 6, 16)} for _ in range(2)]
    weight = net.c.weight.detach().clone()
    report = quantize_model(net, QuantConfig(group_size=16, symmetric=False, method="gptq"),
                            calib_data=data)
    assert any(name == "c" and "not positive definite" in note and "kept RTN" in note
               for name, note in report.notes)
    for got, expected in zip(net.c.canonical(), R.quantize(weight, 16, symmetric=False)):
        assert torch.equal(got, expected)
    assert not any(name == "a" and "kept RTN" in note for name, note in report.notes)
    assert 0 < report.layer_errors["c"] < 1


def test_norm_weights_are_capped_and_reject_non_finite_input():
    ln = nn.LayerNorm(16)
    u = torch.randn(5, 16)
    u[2] = 3.0  # a constant row: sigma^2 = eps, which would weigh it ~1e5 times the others
    w = calibration.norm_weights(ln, u)
    assert torch.isfinite(w).all()
    assert float(w.max() / w.median()) <= calibration.MAX_NORM_WEIGHT_RATIO * 1.0001
    sigma2 = u.var(-1, unbiased=False) + ln.eps
    keep = torch.arange(5) != 2  # the others are exactly 1 / sigma^2
    torch.testing.assert_close(w[keep], 1 / sigma2[keep])
    with pytest.raises(calibration.CalibrationError, match="norm"):
        calibration.norm_weights(ln, torch.tensor([[1.0, float("nan")]]))


def test_norm_weighting_sees_a_norm_called_with_keywords():
    torch.manual_seed(0)
    net = PooledNormNet().eval()
    net.forward = lambda x, attention_mask=None: net.c(net.ln(input=net.a(x)))  # rows line up
    x = torch.randn(2, 4, 16)
    stats = calibration.collect(net, [{"x": x}], {"a": net.a}, norms={"a": net.ln})
    assert stats["a"].norm_weighted is True
    plain = calibration.collect(net, [{"x": x}], {"a": net.a})
    rows = net.a(x).detach().reshape(-1, 16)
    xr = x.reshape(-1, 16).double()
    w = 1 / (rows.double().var(-1, unbiased=False) + net.ln.eps)
    ref = (xr * w.sqrt()[:, None]).T @ (xr * w.sqrt()[:, None]) / xr.shape[0]
    tol = 2 ** -7 if calibration._fast_bf16_matmul() else 1e-5
    assert ((stats["a"].hessian - ref).norm() / ref.norm()).item() <= tol
    assert ((plain["a"].hessian - ref).norm() / ref.norm()).item() > 10 * tol


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_calibrated_methods_need_calib_data(method):
    net = MaskedNet()
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(net, QuantConfig(group_size=16, symmetric=False, method=method))
    with pytest.raises(ValueError, match="empty"):
        quantize_model(net, QuantConfig(group_size=16, method=method), calib_data=[])
    assert all(type(m) is nn.Linear for m in (net.a, net.b, net.never))


def test_nan_batch_raises_and_leaves_model_untouched():
    net = MaskedNet()
    bad = torch.randn(4, 16)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"batch 1\b.*NaN"):
        quantize_model(net, QuantConfig(group_size=16, method="gptq"),
                       calib_data=[torch.randn(4, 16), bad])
    assert all(type(m) is nn.Linear for m in (net.a, net.b, net.never))


def test_unreached_layer_is_reported_not_silent():
    net = MaskedNet()
    report = quantize_model(net, QuantConfig(group_size=16, symmetric=False, method="gptq"),
                            calib_data=[torch.randn(6, 16)])
    assert [name for name, _ in report.fallbacks] == ["never"]
    assert "RTN" in report.fallbacks[0][1] and "never reached" in report.fallbacks[0][1]
    assert "fallback never" in str(report)
    assert isinstance(net.never, Int4Linear) and isinstance(net.a, Int4Linear)


@pytest.mark.parametrize("kwargs", [dict(method="gptqq"), dict(damp=-1), dict(block_size=0),
                                    dict(calib_max_tokens=0), dict(clip_search="yes"),
                                    dict(act_order=1), dict(norm_weighting="on")])
def test_config_rejects(kwargs):
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        QuantConfig(**kwargs)


def test_clip_search_rtn_is_data_free_and_not_worse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64))
    w = net[0].weight.detach().clone()
    quantize_model(net, QuantConfig(group_size=32, symmetric=False, clip_search=True))
    qweight, scales, zeros = net[0].canonical()
    err = (R.dequantize(qweight, scales, zeros, 32, 128) - w.double()).pow(2).sum()
    rq, rs, rz = R.quantize(w, 32, False)
    err_rtn = (R.dequantize(rq, rs, rz, 32, 128) - w.double()).pow(2).sum()
    assert err <= err_rtn
