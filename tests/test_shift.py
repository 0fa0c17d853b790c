"""shift_report: calibration statistics recorded with the model (and saved with it), and the
divergence and expected error ratio of new data, against formulas written out here."""
import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import QuantConfig, quantize_model, shift_report
from int4kit.quant.calibration import CalibrationError

from test_mixed_precision import relative_output_error
from test_quant_model import bert_batches, tiny_bert

GPTQ = QuantConfig(group_size=32, symmetric=False, method="gptq")


def test_calibration_data_has_no_shift():
    for method in ("gptq", "awq"):  # awq: statistics of the folded input x / s
        model = tiny_bert()
        quantize_model(model, QuantConfig(group_size=32, symmetric=False, method=method),
                       bert_batches())
        report = shift_report(model, bert_batches())
        assert len(report.layers) == 13
        for name, layer in report.layers.items():
            assert layer.divergence < 1e-4, (method, name)
            assert layer.error_ratio == pytest.approx(1.0, abs=1e-3), (method, name)


def test_scores_follow_their_formulas():
    torch.manual_seed(0)
    K, N, G = 64, 24, 32
    linear = nn.Linear(K, N)
    with torch.no_grad():
        linear.weight[:, 5] *= 8  # an outlier column: group 0's grid is coarse for the others
    model = nn.Sequential(linear)
    calib = [torch.randn(16, K) for _ in range(4)]
    quantize_model(model, QuantConfig(group_size=G, symmetric=False, method="gptq"), calib)
    layer = model[0]
    m_c = torch.cat(calib).double().square().mean(0)
    assert torch.allclose(layer.input_sq_mean.double(), m_c, rtol=1e-6)
    boost = torch.ones(K)
    boost[:G] = 3.0  # the new data is louder in group 0
    new = [torch.randn(16, K) * boost for _ in range(4)]
    m_d = torch.cat(new).double().square().mean(0)
    _, scales, _ = layer.canonical()
    e = (scales.double().square().sum(0) / 12).repeat_interleave(G)
    w = layer.dequantized_weight().double().square().sum(0)
    expected_ratio = float((m_d * e).sum() / (m_d * w).sum()) / float((m_c * e).sum()
                                                                      / (m_c * w).sum())
    expected_divergence = float(0.5 * (m_d / m_d.sum() - m_c / m_c.sum()).abs().sum())
    report = shift_report(model, new)
    assert report.layers["0"].error_ratio == pytest.approx(expected_ratio, rel=1e-5)
    assert report.layers["0"].divergence == pytest.approx(expected_divergence, rel=1e-5)
    assert report.layers["0"].error_ratio > 1.02 and report.layers["0"].tokens == 64
    assert "most affected: 0" in str(report)


def test_statistics_are_saved_with_the_model(tmp_path):
    model = tiny_bert()
    quantize_model(model, GPTQ, bert_batches())
    int4kit.save_quantized(model, tmp_path / "native")
    loaded = int4kit.load_quantized(tiny_bert(), tmp_path / "native")
    model.save_pretrained(tmp_path / "hf")
    transformers = pytest.importorskip("transformers")
    from_hf = transformers.BertModel.from_pretrained(tmp_path / "hf")
    for name, layer in model.named_modules():
        if isinstance(layer, int4kit.Int4Linear):
            for other in (loaded, from_hf):
                assert torch.equal(other.get_submodule(name).input_sq_mean, layer.input_sq_mean)
    new = bert_batches(seed=7)
    assert shift_report(loaded, new).layers == shift_report(model, new).layers


def test_statistics_do_not_count_as_stored_bits():
    model = tiny_bert()
    report = quantize_model(model, GPTQ, bert_batches())
    assert report.bits_per_weight["encoder.layer.0.attention.self.query"] == 4 + 2 * 32 / 32 + 32 / 64


def test_bad_shift_input():
    model = tiny_bert()
    quantize_model(model, QuantConfig(group_size=32), None)
    with pytest.raises(ValueError, match="no Int4Linear with calibration statistics"):
        shift_report(model, bert_batches())
    model = tiny_bert()
    quantize_model(model, GPTQ, bert_batches())
    with pytest.raises(ValueError, match="data is empty"):
        shift_report(model, [])
    with pytest.raises(ValueError, match="not Int4Linear layers with calibration"):
        shift_report(model, bert_batches(), layers=["encoder.nope"])
    plain = nn.Sequential(nn.Linear(32, 16))
    quantize_model(plain, QuantConfig(group_size=32, method="gptq"), [torch.randn(8, 32)])
    bad = torch.randn(8, 32)
    bad[2, 3] = float("inf")
    with pytest.raises(CalibrationError):
        shift_report(plain, [bad])
    with pytest.raises(CalibrationError, match="batch 0"):
        shift_report(plain, [torch.randn(8, 31)])


def test_tensor_parallel_shards_leave_the_statistics_behind():
    from int4kit.formats.native import check_layer_tensors, layer_settings
    from int4kit.parallel.sharding import local_settings, shard_of, shard_tensors, tensor_reader
    model = nn.Sequential(nn.Linear(64, 32))
    quantize_model(model, GPTQ, [torch.randn(8, 64)])
    layer = model[0]
    settings = layer_settings(layer)
    assert settings["input_sq_mean"] is True
    qweight, scales, zeros = layer.canonical()
    tensors = {"qweight": qweight, "scales": scales, "zeros": zeros, "bias": layer.bias.detach(),
               "input_sq_mean": layer.input_sq_mean}
    for style, dim, unit in (("colwise", 32, 1), ("rowwise", 64, 32)):
        shard = shard_of(style, dim, unit, 0, 2)
        local = local_settings(settings, shard)
        part = shard_tensors(tensor_reader(tensors), settings, shard)
        assert "input_sq_mean" not in local and "input_sq_mean" not in part
        check_layer_tensors(part, local, lambda short: short)


# ---- recalibrate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fit", ["weights", "outputs"])
def test_recalibrate_qparams_keeps_codes_and_fits_the_new_data(fit):
    import copy
    teacher = tiny_bert()
    model = copy.deepcopy(teacher)
    quantize_model(model, GPTQ, bert_batches())
    before = {n: m.canonical() for n, m in model.named_modules()
              if isinstance(m, int4kit.Int4Linear)}
    new = bert_batches(seed=11, T=20)
    error_before = relative_output_error(model, teacher, new)
    report = int4kit.recalibrate(model, new, teacher, calib_data=bert_batches(), fit=fit)
    assert report.rows == 960 and 0 < report.rows_refit <= 960
    assert all(after <= b for b, after in report.objectives.values())
    for name, (qweight, scales, zeros) in before.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.canonical()[0], qweight)  # the codes stay
        assert layer.method == "gptq" and layer.input_sq_mean is not None
    assert relative_output_error(model, teacher, new) < 0.9 * error_before


@pytest.mark.parametrize("fit", ["weights", "outputs"])
def test_recalibrate_qparams_is_the_least_squares_scale(fit):
    """Symmetric per channel: one scale per row, s = sum_t a_t y_t / sum_t a_t^2 with
    a_t = (q - 8) . x_t, y_t the teacher's output (= W x_t: one layer, no bias, so both fits
    agree) and x_t the quantized model's input."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(48, 16, bias=False))
    model = nn.Sequential(nn.Linear(48, 16, bias=False))
    model.load_state_dict(teacher.state_dict())
    quantize_model(model, QuantConfig(group_size=-1, symmetric=True, method="gptq"),
                   [torch.randn(32, 48)])
    x = torch.randn(64, 48) * torch.linspace(0.2, 3, 48)
    int4kit.recalibrate(model, [x], teacher, fit=fit)
    layer = model[0]
    q = int4kit.reference.unpack(layer.canonical()[0], 48).double() - 8
    a = x.double() @ q.T  # [tokens, rows]
    y = teacher(x).detach().double()
    expected = (a * y).sum(0) / a.square().sum(0)
    assert torch.allclose(layer.canonical()[1][:, 0].double(), expected, rtol=1e-5)


def test_recalibrate_full_is_quantize_model_on_the_mixed_data():
    import copy
    teacher = tiny_bert()
    model = copy.deepcopy(teacher)
    quantize_model(model, GPTQ, bert_batches())
    new = bert_batches(seed=11, T=20)
    int4kit.recalibrate(model, new, teacher, mode="full", calib_data=bert_batches(), config=GPTQ)
    reference = copy.deepcopy(teacher)
    quantize_model(reference, GPTQ, new + bert_batches())
    for name, layer in reference.named_modules():
        if isinstance(layer, int4kit.Int4Linear):
            for a, b in zip(layer.canonical(), model.get_submodule(name).canonical()):
                assert (a is None and b is None) or torch.equal(a, b), name


def test_bad_recalibration_input():
    teacher = tiny_bert()
    model = tiny_bert()
    quantize_model(model, GPTQ, bert_batches())
    with pytest.raises(ValueError, match="mode must be 'qparams' or 'full'"):
        int4kit.recalibrate(model, bert_batches(), teacher, mode="scales")
    with pytest.raises(ValueError, match="fit must be 'weights' or 'outputs'"):
        int4kit.recalibrate(model, bert_batches(), teacher, fit="logits")
    with pytest.raises(TypeError, match="teacher must be the full-precision model"):
        int4kit.recalibrate(model, bert_batches(), None)
    with pytest.raises(ValueError, match="data is empty"):
        int4kit.recalibrate(model, [], teacher)
    with pytest.raises(ValueError, match="teacher has no layer"):
        int4kit.recalibrate(model, bert_batches(), nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="no Int4Linear"):
        int4kit.recalibrate(tiny_bert(), bert_batches(), teacher)
    small = nn.Sequential(nn.Linear(32, 16))
    quantize_model(small, QuantConfig(group_size=32, method="gptq"), [torch.randn(8, 32)])
    with pytest.raises(ValueError, match="is not a 16 x 32 linear"):
        int4kit.recalibrate(small, [torch.randn(8, 32)], nn.Sequential(nn.Linear(32, 8)))
