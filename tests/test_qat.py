"""Quantization-aware training (int4kit.qat): the gradients against the papers' formulas, the
first step against each post-training method, the convert invariant, distillation, bad input."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from int4kit import Int4Linear, QuantConfig, ops, qat, quantize_model
from int4kit import reference as R
from int4kit.qat.fake_quant import _FakeQuantize

from conftest import rel_err
from test_quant_model import bert_batches, tiny_bert

MODES = ["dynamic", "frozen", "learned", "codes_frozen"]


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(100, 48), nn.GELU(), nn.Linear(48, 20, bias=False)).to(dtype)


def train(model, steps=15, lr=(1e-3, 1e-5, 1e-3), seed=3, dtype=torch.float32):
    """A few Adam steps on a random regression task (enough to move codes and qparams)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 100, generator=g).to(dtype)
    y = torch.randn(64, 20, generator=g).to(dtype)
    opt = torch.optim.Adam(qat.param_groups(model, *lr))
    for _ in range(steps):
        loss = F.mse_loss(model(x).float(), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


# ---- gradients -----------------------------------------------------------------------------------

def lsq_reference(w, s, z, G):
    """LSQ / LSQ+ as the papers write them, per element in float64, for integer z: with the
    signed range [-z, 15 - z], w_hat = clamp(round(w / s), -z, 15 - z) * s,
    d w_hat / d w = [inside], d w_hat / d s = round(w / s) - w / s inside, the bound outside,
    d w_hat / d z = -s outside (the offset beta = -z s moves the clamped values only)."""
    w, s, z = w.double(), s.double(), z.double()
    N, K = w.shape
    se = s.repeat_interleave(G, 1)[:, :K]
    ze = z.repeat_interleave(G, 1)[:, :K]
    t = w / se
    r = torch.round(t)
    lo, hi = -ze, 15 - ze
    inside = (r >= lo) & (r <= hi)
    w_hat = r.clamp(lo, hi) * se
    d_s = torch.where(inside, r - t, torch.where(r < lo, lo, hi))
    d_z = torch.where(inside, torch.zeros_like(t), -se)
    return w_hat, inside.double(), d_s, d_z


@pytest.mark.parametrize("G", [16, 30])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_gradients_match_lsq_and_lsq_plus(G, symmetric):
    torch.manual_seed(0)
    N, K = 6, 70  # K % G != 0: a short tail group
    w = torch.randn(N, K) * 0.1
    groups = -(-K // G)
    s = torch.rand(N, groups) * 0.02 + 0.005  # small scales: many codes clamp
    z = torch.full((N, groups), 8.0) if symmetric else torch.randint(3, 12, (N, groups)).float()
    w_, s_, z_ = (t.clone().requires_grad_() for t in (w, s, z))
    out = _FakeQuantize.apply(w_, s_, z_, G)
    upstream = torch.randn(N, K)
    out.backward(upstream)
    w_hat, inside, d_s, d_z = lsq_reference(w, s, z, G)
    assert torch.equal(out.double(), w_hat.float().double())
    assert 0.1 < inside.mean() < 0.95  # both cases exercised
    assert torch.equal(w_.grad, upstream * inside.float())
    per_group = lambda d: torch.stack([  # noqa: E731
        (upstream.double() * d)[:, g * G:(g + 1) * G].sum(1) for g in range(groups)], 1)
    torch.testing.assert_close(s_.grad.double(), per_group(d_s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_.grad.double(), per_group(d_z), rtol=1e-5, atol=1e-6)


def test_learned_qparams_get_lsq_gradient_scale():
    """The scale's gradient is the LSQ gradient times 1 / sqrt(G * Qp)."""
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False), "learned"))
    layer = model[0]
    w = layer.weight.detach().float()
    s, z = layer.scale.detach().clone(), layer.zero_point.detach().clone()
    upstream = torch.randn(48, 100)
    layer.fake_quantized_weight().backward(upstream)
    s_, z_ = s.clone().requires_grad_(), z.clone().requires_grad_()
    _FakeQuantize.apply(w, s_, z_, 32).backward(upstream)
    factor = 1 / (32 * 15) ** 0.5
    torch.testing.assert_close(layer.scale.grad, s_.grad * factor)
    torch.testing.assert_close(layer.zero_point.grad, z_.grad * factor)


# ---- the first step reproduces the post-training method ------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq"])
@pytest.mark.parametrize("mode", ["frozen", "learned", "codes_frozen"])
def test_first_step_reproduces_the_base_methods_codes(method, mode):
    base = QuantConfig(group_size=32, symmetric=False, method=method, clip_search=True)
    calib = bert_batches(n=2) if base.needs_calibration else None
    reference_model = tiny_bert()
    quantize_model(reference_model, base, calib)
    model = tiny_bert()
    report = qat.prepare_qat(model, qat.QATConfig(base, mode), calib)
    assert len(report.swapped) == 13 and report.ptq is not None  # 12 + the pooler
    for name in report.swapped:
        fq = model.get_submodule(name)
        assert isinstance(fq, qat.FakeQuantLinear) and isinstance(fq, nn.Linear)
        qweight, scales, zeros = reference_model.get_submodule(name).canonical()
        codes, s, z = fq.quantized()
        assert torch.equal(codes, R.unpack(qweight, fq.in_features).long()), name
        assert torch.equal(s, scales.float()) and torch.equal(z, zeros.float()), name
        ref_scale = reference_model.get_submodule(name).input_scale  # AWQ's unfolded 1/s
        assert (fq.input_scale is None) == (ref_scale is None), name
        assert ref_scale is None or torch.equal(fq.input_scale, ref_scale), name
    batch = bert_batches(n=1, seed=5)[0]
    with torch.no_grad():  # the prepared model computes what the post-training model computes
        torch.testing.assert_close(model(**batch).last_hidden_state,
                                   reference_model(**batch).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_mode_is_round_to_nearest_of_the_latent_weight(symmetric):
    model = mlp()
    dense = copy.deepcopy(model)
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=symmetric),
                                         "dynamic"))
    train(model, steps=3)
    for i in (0, 2):
        fq = model[i]
        assert not torch.equal(fq.weight, dense[i].weight)  # it trained
        qweight, scales, zeros = R.quantize(fq.weight.detach(), 32, symmetric)
        codes, s, z = fq.quantized()
        assert torch.equal(codes, R.unpack(qweight, fq.in_features).long())
        assert torch.equal(s, scales.float())
        if not symmetric:
            assert torch.equal(z, zeros.float())


# ---- the convert invariant -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", [(32, False), (-1, True), (16, True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_stores_exactly_what_training_used(mode, setting, dtype):
    G, symmetric = setting
    model = mlp(dtype)
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=G, symmetric=symmetric), mode))
    before = {i: model[i].quantized() for i in (0, 2)}
    x = train(model, dtype=dtype)
    state = {}
    with torch.no_grad():
        inputs = {0: x, 2: F.gelu(model[0](x))}
    for i in (0, 2):
        fq = model[i]
        codes, s, z = fq.quantized()
        if mode != "codes_frozen":  # training moved the codes (codes_frozen: the scales)
            assert not torch.equal(codes, before[i][0]) or not torch.equal(s, before[i][1])
        state[i] = (codes, s, z, fq.fake_quantized_weight().detach(), fq(inputs[i]).detach(),
                    None if fq.bias is None else fq.bias.detach().clone())
    assert qat.convert(model) == ["0", "2"]
    for i in (0, 2):
        layer = model[i]
        assert isinstance(layer, Int4Linear) and layer.scale_dtype == dtype
        assert layer.method == f"rtn+qat-{mode}"
        codes, s, z, w_fq, y_fq, bias = state[i]
        qweight, scales, zeros = layer.canonical()
        K = layer.in_features
        assert torch.equal(R.unpack(qweight, K).long(), codes)
        assert torch.equal(scales.float(), s) and scales.dtype == dtype
        assert (zeros is None) == symmetric
        if not symmetric:
            assert torch.equal(zeros.float(), z)
        # ops.dequantize of the stored tensors is the fake-quantized weight, bit for bit
        assert torch.equal(ops.dequantize(qweight, scales, zeros, G, K, torch.float32), w_fq)
        # and the dequantize path computes the training forward's output bit for bit
        xi = inputs[i]
        y_deq = F.linear(xi, ops.dequantize(qweight, scales, zeros, G, K, xi.dtype),
                         None if bias is None else bias.to(xi.dtype))
        assert torch.equal(y_deq, y_fq)
        # the fused kernel: within its documented error of the float64 reference
        y = layer(xi)
        y_ref = R.linear(xi, qweight, scales, zeros, G, bias)
        assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_convert_w4a8_matches_the_w4a8_reference():
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False,
                                                     act_quant="int8"), "learned",
                                         act_fake_quant="int8"))
    x = train(model)
    with torch.no_grad():
        y_fq = model[0](x)
    qat.convert(model)
    layer = model[0]
    assert layer.act_quant == "int8"
    qweight, scales, zeros = layer.canonical()
    y_ref = R.linear_w4a8(x, qweight, scales, zeros, 32, layer.bias)
    assert rel_err(y_fq, y_ref) < 1e-5  # training saw W4A8's own activation rounding
    assert rel_err(layer(x), y_ref) < 2e-2  # the W4A8 kernel's documented error (docs/W4A8.md)


def test_act_fake_quant_gradient_passes_straight_through():
    x = torch.randn(5, 40, requires_grad=True)
    y = qat.fake_quant_activations_int8(x)
    codes, scale = R.quantize_activations_int8(x.detach())
    assert torch.equal(y.detach(), codes * scale)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantizer_ignores_autocast():
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False), "learned"))
    plain = model[0].fake_quantized_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = model[0].fake_quantized_weight()
        y = model(torch.randn(4, 100))
    assert under.dtype == torch.float32 and torch.equal(plain, under)
    assert y.dtype == torch.bfloat16  # the matmul itself follows autocast


def test_training_state_round_trips_through_a_state_dict():
    model = mlp()
    config = qat.QATConfig(QuantConfig(group_size=32, symmetric=False), "learned")
    qat.prepare_qat(model, config)
    x = train(model)
    other = mlp(seed=9)
    qat.prepare_qat(other, config)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))


def test_prepare_starts_from_a_loaded_int4_model(tmp_path):
    model = mlp()
    quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="hqq"))
    codes = {i: model[i].canonical() for i in (0, 2)}
    # a calibration-based base method needs no data here: every layer is already int4
    report = qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False,
                                                              method="gptq"), "codes_frozen"))
    assert report.swapped == ["0", "2"] and report.ptq is None
    for i in (0, 2):
        q, s, z = model[i].quantized()
        assert torch.equal(q, R.unpack(codes[i][0], model[i].in_features).long())
        assert torch.equal(s, codes[i][1].float()) and torch.equal(z, codes[i][2].float())
        assert model[i].method == "hqq"


def test_param_groups_cover_every_trainable_parameter_once():
    model = nn.Sequential(mlp(), nn.LayerNorm(20))
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False), "learned"))
    groups = qat.param_groups(model, weight_lr=1e-4, qparam_lr=1e-5)
    assert [g["name"] for g in groups] == ["weights", "qparams", "other"]
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == 1e-5 and "lr" not in groups[2]
    assert groups[1]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    fq = model[0][0]
    assert {id(fq.weight)} <= {id(p) for p in groups[0]["params"]}
    assert {id(fq.scale), id(fq.zero_point)} <= {id(p) for p in groups[1]["params"]}


def test_codes_frozen_learns_only_scales_and_zero_points():
    model = mlp()
    report = qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False),
                                                  "codes_frozen"))
    assert report.trainable_weights == 0 and report.trainable_qparams == 2 * (48 * 4 + 20 * 2)
    codes = model[0].codes.clone()
    weight = model[0].weight.detach().clone()
    scale = model[0].scale.detach().clone()
    train(model)
    assert torch.equal(model[0].codes, codes) and torch.equal(model[0].weight, weight)
    assert not torch.equal(model[0].scale, scale)


def test_hugging_face_round_trip_after_qat(tmp_path):
    model = tiny_bert()
    teacher = tiny_bert()
    calib = bert_batches(n=2)
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False,
                                                     method="gptq"), "learned"), calib)
    assert getattr(model.config, "quantization_config", None) is None  # not until convert
    opt = torch.optim.Adam(qat.param_groups(model, 1e-4, 1e-6, 1e-4))
    model.train()
    for batch in calib * 2:
        with torch.no_grad():
            target = teacher(**batch)
        loss = qat.distill_loss(model(**batch), target, cosine=1.0, mse=1.0,
                                attention_mask=batch["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    qat.convert(model)
    model.save_pretrained(tmp_path)
    from transformers import BertModel
    loaded = BertModel.from_pretrained(tmp_path)
    batch = bert_batches(n=1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
    assert loaded.encoder.layer[0].attention.self.query.method == "gptq+qat-learned"


# ---- distillation --------------------------------------------------------------------------------

def test_kl_term_is_hintons_kl_with_temperature():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    T = 2.0
    loss = qat.distill_loss({"logits": s}, {"logits": t}, kl=1.0, temperature=T,
                            attention_mask=mask)
    p = torch.softmax(t.double() / T, -1)
    kl = (p * (p.log() - torch.log_softmax(s.double() / T, -1))).sum(-1)
    expected = (kl * mask).sum() / mask.sum() * T * T
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_pooled_terms_mask_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = lambda h: torch.stack([h[0, :2].mean(0), h[1].mean(0)])  # noqa: E731
    cos = qat.distill_loss(s, t, cosine=1.0, attention_mask=mask)
    torch.testing.assert_close(cos, (1 - F.cosine_similarity(mean(s), mean(t))).mean())
    mse = qat.distill_loss(s, t, mse=1.0, attention_mask=mask)
    torch.testing.assert_close(mse, ((mean(s) - mean(t)) ** 2).mean())
    s2 = s.clone()
    s2[0, 2:] = 1e3  # padding changes nothing
    torch.testing.assert_close(qat.distill_loss(s2, t, cosine=1.0, mse=0.5, attention_mask=mask),
                               cos + 0.5 * mse)


def test_hidden_state_term_masks_padding():
    torch.manual_seed(0)
    s = tuple(torch.randn(2, 3, 4) for _ in range(3))
    t = tuple(torch.randn(2, 3, 4) for _ in range(3))
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss = qat.distill_loss({"hidden_states": s}, {"hidden_states": t}, hidden=1.0,
                            hidden_layers=[0, -1], attention_mask=mask)
    keep = mask.bool()
    expected = torch.stack([((s[i] - t[i])[keep] ** 2).mean() for i in (0, 2)]).mean()
    torch.testing.assert_close(loss, expected)


def test_distill_loss_reaches_the_student_only():
    s = torch.randn(2, 6, requires_grad=True)
    t = torch.randn(2, 6, requires_grad=True)
    qat.distill_loss(s, t, cosine=1.0).backward()
    assert s.grad is not None and t.grad is None


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(qparams="sometimes"), "qparams must be one of"),
    (dict(act_fake_quant="int4"), "act_fake_quant must be None or 'int8'"),
    (dict(base=QuantConfig(method="gptq"), qparams="dynamic"), "base.method must be 'rtn'"),
    (dict(base=QuantConfig(act_quant="int8")), "act_fake_quant is None"),
    (dict(base="rtn"), "QATConfig.base must be an int4kit.QuantConfig"),
])
def test_bad_qat_config(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        qat.QATConfig(**kwargs)


def test_prepare_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="no layer prepare_qat can train"):
        qat.prepare_qat(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no layer prepare_qat can train.*group_size"):
        qat.prepare_qat(nn.Sequential(nn.Linear(8, 4)))  # in_features < 128
    with pytest.raises(ValueError, match="needs calib_data"):
        qat.prepare_qat(mlp(), qat.QATConfig(QuantConfig(group_size=32, method="gptq")))
    with pytest.raises(TypeError, match="is itself an nn.Linear"):
        qat.prepare_qat(nn.Linear(100, 4))
    with pytest.raises(TypeError, match="QATConfig"):
        qat.prepare_qat(mlp(), QuantConfig())
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32)))
    with pytest.raises(ValueError, match="already holds FakeQuantLinear"):
        qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32)))
    with pytest.raises(ValueError, match="qat.convert"):
        quantize_model(model, QuantConfig(group_size=32))


def test_convert_refuses_unprepared_and_disabled_models():
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        qat.convert(mlp())
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32)))
    qat.set_fake_quant(model, False)
    assert torch.equal(model[0](torch.ones(1, 100)),
                       F.linear(torch.ones(1, 100), model[0].weight, model[0].bias))
    with pytest.raises(qat.QATError, match="fake quantization is disabled.*'0'"):
        qat.convert(model)
    assert isinstance(model[0], qat.FakeQuantLinear)  # nothing swapped
    qat.set_fake_quant(model, True)
    qat.convert(model)


@pytest.mark.parametrize("mode", ["frozen", "learned", "dynamic"])
def test_nan_weights_are_refused_naming_the_layer(mode):
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32), mode))
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    with pytest.raises(qat.QATError, match="FakeQuantLinear 2: its weight holds NaN"):
        model(torch.randn(2, 100))
    with pytest.raises(qat.QATError, match="FakeQuantLinear 2"):
        qat.convert(model)
    assert isinstance(model[0], qat.FakeQuantLinear)  # all or nothing


def test_a_scale_driven_below_zero_is_refused_naming_the_layer():
    model = mlp()
    qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32, symmetric=False),
                                         "codes_frozen"))
    with torch.no_grad():
        model[0].scale[4, 1] = -1e-3
    with pytest.raises(qat.QATError, match="FakeQuantLinear 0: learned scale of row 4, group 1"):
        model(torch.randn(2, 100))
    with torch.no_grad():
        model[0].scale[4, 1] = float("inf")
    with pytest.raises(qat.QATError, match="scale / zero_point holds NaN or inf"):
        qat.convert(model)


def test_distill_loss_bad_input():
    s, t = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="at least one of"):
        qat.distill_loss(s, t)
    with pytest.raises(ValueError, match="kl must be a non-negative weight"):
        qat.distill_loss(s, t, kl=-1)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        qat.distill_loss(s, t, kl=1, temperature=0)
    with pytest.raises(ValueError, match="student shape"):
        qat.distill_loss(s, torch.randn(2, 5), cosine=1)
    with pytest.raises(ValueError, match="needs hidden_layers"):
        qat.distill_loss(s, t, hidden=1)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        qat.distill_loss(s, t, hidden=1, hidden_layers=[0])
    with pytest.raises(ValueError, match="with 'logits'"):
        qat.distill_loss({"x": s}, {"x": t}, kl=1)
    with pytest.raises(qat.QATError, match="the cosine term is nan"):
        qat.distill_loss(torch.full((2, 4), float("nan")), t, cosine=1)


def test_offline_training_text_is_plain_unseen_prose():
    from int4kit import eval_data
    text = eval_data.offline_sentences(seed=0)
    assert len(text) > 8000  # about 10k on Python 3.11
    assert text == eval_data.offline_sentences(seed=0)  # deterministic
    assert text != eval_data.offline_sentences(seed=1) and sorted(text) == sorted(
        eval_data.offline_sentences(seed=1))
    held_out = set(eval_data.EVAL_IN_DOMAIN) | set(eval_data.EVAL_OUT_OF_DOMAIN) | set(
        eval_data.CALIBRATION)
    assert not held_out & set(text) and len(set(text)) == len(text)
    for sentence in text[:500]:
        assert 5 <= len(sentence.split()) <= 40 and ">>>" not in sentence
        assert sentence[0].isupper() and sentence[-1] in ".!?"


def test_skip_given_as_a_generator_applies_to_int4_layers_too():
    model = mlp()
    quantize_model(model, QuantConfig(group_size=32))
    report = qat.prepare_qat(model, qat.QATConfig(QuantConfig(group_size=32), "frozen"),
                             skip=(name for name in ["2"]))
    assert report.swapped == ["0"] and isinstance(model[2], Int4Linear)
