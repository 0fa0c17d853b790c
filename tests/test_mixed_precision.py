"""Storage knobs and mixed precision: scale dtypes, per-tensor scales, bits per weight,
per-layer configs, sensitivity and the plan under a size budget."""
import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import (Int4Linear, MixedPrecisionPlan, QuantConfig, SensitivityTable,
                     measure_sensitivity, plan_mixed_precision, quantize_model)
from int4kit import reference as R
from int4kit.nn import replace_module

from test_quant_model import bert_batches, tiny_bert

CALIBRATED = ["gptq", "awq", "awq+gptq", "adaround"]


def rtn_reference(w: torch.Tensor, G: int, scale_dtype: torch.dtype):
    """FORMAT.md's asymmetric round-to-nearest written out: the range in float64, the scale
    rounded to its stored dtype before the zero point and the codes (float32 division, as the
    format specifies) are computed from it."""
    N, K = w.shape
    wg = w.double().reshape(N, K // G, G)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).to(scale_dtype).double()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s).clamp(0, 15)
    q = codes_of(w, s.float(), z.float(), G)
    return q, s.to(scale_dtype), z.to(scale_dtype)


def codes_of(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int) -> torch.Tensor:
    """clamp(round(w / s) + z, 0, 15) in float32 for per-group s, z [N, K / G]."""
    N, K = w.shape
    wg = w.float().reshape(N, K // G, G)
    q = (torch.round(wg / s.float()[..., None]) + z.float()[..., None]).clamp(0, 15)
    return q.reshape(N, K).to(torch.uint8)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip_search", [False, True])
def test_rtn_scales_rounded_to_scale_dtype_first(scale_dtype, clip_search):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 48))
    w = model[0].weight.detach().clone()
    quantize_model(model, QuantConfig(group_size=64, symmetric=False, scale_dtype=scale_dtype,
                                      clip_search=clip_search))
    layer = model[0]
    qweight, scales, zeros = layer.canonical()
    assert scales.dtype == zeros.dtype == scale_dtype
    assert layer.bias.dtype == torch.float32  # the bias keeps the weight's dtype
    if not clip_search:
        codes, s, z = rtn_reference(w, 64, scale_dtype)
        assert torch.equal(R.unpack(qweight, 256), codes)
        assert torch.equal(scales, s) and torch.equal(zeros, z)
    else:  # whatever range the search keeps, the codes are those of the stored scale and zero
        assert torch.equal(R.unpack(qweight, 256), codes_of(w, scales, zeros, 64))


@pytest.mark.parametrize("method", ["hqq"] + CALIBRATED)
def test_every_method_stores_the_asked_scale_dtype(method):
    model = tiny_bert()
    config = QuantConfig(group_size=32, symmetric=False, method=method, adaround_iters=20,
                         scale_dtype=torch.float16)
    batches = bert_batches() if config.needs_calibration else None
    quantize_model(model, config, batches)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers
    for layer in layers:
        _, scales, zeros = layer.canonical()
        assert scales.dtype == zeros.dtype == torch.float16
        assert layer.bias.dtype == torch.float32
        if layer.input_scale is not None:  # AWQ's multiplier stays in the weight's dtype
            assert layer.input_scale.dtype == torch.float32
    with torch.no_grad():
        out = model(**bert_batches(1)[0]).last_hidden_state
    assert torch.isfinite(out).all()


def test_bf16_model_with_float32_scales():
    """A bfloat16 model can keep float32 scales: they are not rounded to bfloat16, the codes are
    those of the stored scales, and the layer runs on bfloat16 inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64).bfloat16())
    w = model[0].weight.detach().clone()
    quantize_model(model, QuantConfig(group_size=128, symmetric=False, scale_dtype=torch.float32))
    qweight, scales, zeros = model[0].canonical()
    assert scales.dtype == torch.float32 and model[0].bias.dtype == torch.bfloat16
    assert not torch.equal(scales.bfloat16().float(), scales)
    assert torch.equal(R.unpack(qweight, 512), codes_of(w, scales, zeros, 128))
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    ref = x.float() @ model[0].dequantized_weight().T + model[0].bias.float()
    out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 2e-2 * ref.abs().max()


def test_bits_per_weight_counts_codes_scales_zeros_and_bias():
    torch.manual_seed(0)
    N, K, G = 64, 512, 128
    for scale_dtype, scale_bits in ((None, 32), (torch.bfloat16, 16)):
        model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 8, bias=False))
        report = quantize_model(model, QuantConfig(group_size=G, symmetric=False,
                                                   scale_dtype=scale_dtype), skip=["2"])
        expected_q = (N * K * 4 + 2 * N * (K // G) * scale_bits + N * 32) / (N * K)
        assert report.bits_per_weight["0"] == pytest.approx(expected_q)
        assert report.bits_per_weight["2"] == 32.0  # kept dense, float32, no bias
        total = (N * K * expected_q + 8 * N * 32) / (N * K + 8 * N)
        assert report.total_bits_per_weight == pytest.approx(total)
        assert f"{total:.3f} bits per weight" in str(report)
    assert expected_q == pytest.approx(4.25 + 32 / K)  # the 16-bit scale saving at g128


def test_bits_per_weight_leaves_tied_layers_out():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    report = quantize_model(model, QuantConfig(group_size=32))
    assert "lm_head" not in report.layer_sizes  # its weight is the embedding's
    assert set(report.layer_sizes) == set(report.swapped)


def test_scale_dtype_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32))
    quantize_model(model, QuantConfig(group_size=32, symmetric=False, scale_dtype=torch.float16))
    int4kit.save_quantized(model, tmp_path)
    loaded = int4kit.load_quantized(nn.Sequential(nn.Linear(128, 32)), tmp_path)
    for a, b in zip(model[0].canonical(), loaded[0].canonical()):
        assert torch.equal(a, b)
    assert loaded[0].scale_dtype == torch.float16


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "bfloat16", 16])
def test_bad_scale_dtype(bad):
    with pytest.raises(ValueError, match="QuantConfig.scale_dtype"):
        QuantConfig(scale_dtype=bad)


# ---- per-layer configs (quantize_model(layer_configs=...)) ---------------------------------------

def _canonical_tensors(model):
    return {name: m.canonical() for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def _assert_same_layers(a, b, names=None):
    ta, tb = _canonical_tensors(a), _canonical_tensors(b)
    for name in names or ta:
        for x, y in zip(ta[name], tb[name]):
            assert (x is None and y is None) or torch.equal(x, y), name


def test_layer_configs_matching_every_layer_equal_plain_run():
    config = QuantConfig(group_size=32, symmetric=False, method="gptq")
    plain, planned = tiny_bert(), tiny_bert()
    quantize_model(plain, config, bert_batches())
    report = quantize_model(planned, QuantConfig(group_size=16), bert_batches(),
                            layer_configs={"*": config})
    _assert_same_layers(plain, planned)
    assert report.method == "gptq"


def test_layer_configs_first_match_wins_and_none_keeps_dense():
    model = tiny_bert()
    base = QuantConfig(group_size=32, symmetric=False, method="gptq")
    report = quantize_model(model, base, bert_batches(), layer_configs=[
        ("encoder.layer.0.attention.self.value", QuantConfig(group_size=16, symmetric=False,
                                                             method="gptq")),
        ("*.attention.self.value", None),
        ("*intermediate*", QuantConfig(group_size=64, symmetric=False, method="hqq",
                                       scale_dtype=torch.float16)),
    ])
    layer = model.get_submodule
    assert layer("encoder.layer.0.attention.self.value").group_size == 16
    assert isinstance(layer("encoder.layer.1.attention.self.value"), nn.Linear)
    assert ("encoder.layer.1.attention.self.value",
            "layer_configs keeps it dense (pattern '*.attention.self.value')") in report.skipped
    inter = layer("encoder.layer.0.intermediate.dense")
    assert (inter.group_size, inter.method, inter.scale_dtype) == (64, "hqq", torch.float16)
    assert layer("encoder.layer.0.attention.self.query").group_size == 32
    assert report.method == "mixed"
    bits = report.bits_per_weight
    assert bits["encoder.layer.1.attention.self.value"] == 32 + 32 / 64  # dense fp32 + bias
    # K = 64, float32 scales, zero points and bias
    assert bits["encoder.layer.0.attention.self.value"] == 4 + 2 * 32 / 16 + 32 / 64
    assert bits["encoder.layer.0.attention.self.query"] == 4 + 2 * 32 / 32 + 32 / 64


def test_layer_configs_data_free_layers_in_a_calibrated_run():
    """A data-free layer among calibrated ones is quantized from its own weights (what RTN alone
    gives), and the first stage's calibrated layers see the unquantized model, as in a plain run."""
    rtn_cfg = QuantConfig(group_size=32, symmetric=False)
    gptq_cfg = QuantConfig(group_size=32, symmetric=False, method="gptq")
    dense, plain, planned = tiny_bert(), tiny_bert(), tiny_bert()
    quantize_model(plain, gptq_cfg, bert_batches())
    quantize_model(planned, gptq_cfg, bert_batches(), layer_configs={"*.output.dense": rtn_cfg})
    first_stage = [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    _assert_same_layers(plain, planned, first_stage)
    for name in ("encoder.layer.0.output.dense", "encoder.layer.1.attention.output.dense"):
        expected = Int4Linear.from_linear(dense.get_submodule(name), 32, symmetric=False)
        for x, y in zip(expected.canonical(), planned.get_submodule(name).canonical()):
            assert torch.equal(x, y)
        assert planned.get_submodule(name).method == "rtn"


def test_layer_configs_needing_calibration_without_data():
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize_model(tiny_bert(), QuantConfig(), layer_configs={
            "*.query": QuantConfig(group_size=32, method="gptq")})


@pytest.mark.parametrize("layer_configs, error, match", [
    ({"*.no_such_layer": None}, ValueError, r"pattern\(s\) \['\*.no_such_layer'\] match no"),
    ({"*.query": "int8"}, TypeError, r"layer_configs\['\*.query'\] must be an int4kit.QuantConfig"),
    ({"": QuantConfig()}, TypeError, "non-empty str"),
    ([("*.query",)], TypeError, "list of"),
    ({"*.query": QuantConfig(method="adaround", reconstruction="block")}, ValueError,
     "reconstruction='block'"),
])
def test_bad_layer_configs(layer_configs, error, match):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        quantize_model(model, QuantConfig(), layer_configs=layer_configs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- per-tensor granularity (QuantConfig(group_size="tensor")) -----------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_per_tensor_matches_the_formula(symmetric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40))
    w = model[0].weight.detach().clone()
    report = quantize_model(model, QuantConfig(group_size="tensor", symmetric=symmetric))
    qweight, scales, zeros = model[0].canonical()
    assert model[0].group_size == -1 and scales.shape == (40, 1)
    lo, hi = float(w.double().min().clamp(max=0)), float(w.double().max().clamp(min=0))
    if symmetric:
        s = torch.tensor(max(hi, -lo) / 7.5).float()
        z = torch.tensor(8.0)
    else:
        s = torch.tensor((hi - lo) / 15).float()
        z = torch.round(-lo / s.double()).clamp(0, 15).float()
    assert torch.equal(scales, s.expand(40, 1))
    if not symmetric:
        assert torch.equal(zeros, z.expand(40, 1))
    assert torch.equal(R.unpack(qweight, 96), codes_of(w, s.expand(40, 1), z.expand(40, 1), 96))
    assert report.bits_per_weight["0"] == pytest.approx(4 + (1 if symmetric else 2) * 32 / 96
                                                        + 32 / 96)


@pytest.mark.parametrize("method", CALIBRATED + ["rtn"])
def test_every_method_keeps_one_scale_per_tensor(method):
    model = tiny_bert()
    config = QuantConfig(group_size="tensor", symmetric=False, method=method, clip_search=True,
                         adaround_iters=20)
    quantize_model(model, config, bert_batches() if config.needs_calibration else None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 13  # 12 encoder layers and the pooler
    for name, layer in layers.items():
        _, scales, zeros = layer.canonical()
        assert layer.group_size == -1
        assert (scales == scales[0, 0]).all() and (zeros == zeros[0, 0]).all(), name


def test_per_tensor_gptq_beats_per_tensor_rtn_on_the_layer_objective():
    from int4kit.quant.gptq import gptq
    from int4kit.quant.rtn import codes_objective, rtn
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs
    H = (x.T @ x / 512).double()
    w = torch.randn(32, 64) * 0.1
    base = rtn(w, "tensor", False, torch.float32)
    solved = gptq(w, H, "tensor", False, torch.float32, damp=0.01)
    for codes, s, z in (base, solved):
        assert torch.equal(s, s[0, 0].expand_as(s)) and s.shape == (32, 1)
    assert torch.equal(solved[1], base[1])  # the same grid, GPTQ only moves codes
    assert codes_objective(w, *solved, 64, H) < 0.8 * codes_objective(w, *base, 64, H)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size="tensor", method="hqq"), "hqq and refine_rounds"),
    (dict(group_size="tensor", method="gptq", refine_rounds=2), "hqq and refine_rounds"),
    (dict(group_size="channel"), "'tensor'"),
])
def test_bad_per_tensor_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_qat_refuses_per_row_learning_of_a_per_tensor_grid():
    from int4kit import qat
    base = QuantConfig(group_size="tensor", symmetric=False)
    with pytest.raises(ValueError, match="qparams='frozen'"):
        qat.QATConfig(base, qparams="learned")
    qat.QATConfig(base, qparams="frozen")  # fixed grid: stays per tensor


# ---- sensitivity and the plan under a budget -----------------------------------------------------

G32_RTN = QuantConfig(group_size=32, symmetric=False)
G32_GPTQ = QuantConfig(group_size=32, symmetric=False, method="gptq")
G16_GPTQ = QuantConfig(group_size=16, symmetric=False, method="gptq")


def relative_output_error(model, reference_model, batches):
    """sum ||y - y_ref||^2 / sum ||y_ref||^2 over the tokens the attention masks keep."""
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"] != 0
            y = model(**batch).last_hidden_state[keep].double()
            ref = reference_model(**batch).last_hidden_state[keep].double()
            num += float((y - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den


@pytest.mark.parametrize("config", [G32_RTN, G32_GPTQ], ids=["rtn", "gptq"])
def test_damage_is_the_output_error_with_only_that_layer_quantized(config):
    model, batches = tiny_bert(), bert_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_sensitivity(model, [config], batches, show_progress=False)
    assert table.candidates == [config, None]  # dense added
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model as it was
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    for name in ("encoder.layer.0.attention.self.value", "encoder.layer.1.output.dense"):
        alone = copy.deepcopy(model)
        quantize_model(alone, config, batches, filter_fn=lambda n, m: n == name)
        layer = alone.get_submodule(name)
        size = sum(t.numel() * t.element_size() for key, t in layer.state_dict().items()
                   if key != "input_sq_mean")  # statistics, not needed to run the layer
        replace_module(alone, name, layer.to_linear(torch.float32))
        row = table.layers[name]
        assert row["bytes"][0] == size
        assert row["damage"][0] == pytest.approx(relative_output_error(alone, model, batches),
                                                 rel=1e-9)
        assert row["damage"][1] == 0.0 and row["bytes"][1] == sum(
            t.numel() * 4 for t in model.get_submodule(name).state_dict().values())


def _llama(layers=3):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_replayed_blocks_give_the_same_damages(model_name):
    # measure_sensitivity replays the blocks before the measured layer's block from a recording
    # (BlockReplay): the damages must be bit-identical to full forwards, and the early blocks
    # must really be skipped
    if model_name == "bert":
        model, batches = tiny_bert(), bert_batches()
        blocks = model.encoder.layer
    else:
        model = _llama()
        g = torch.Generator().manual_seed(3)
        batches = [{"input_ids": torch.randint(0, 64, (2, 9), generator=g)} for _ in range(3)]
        blocks = model.model.layers
    candidates = [G32_RTN, QuantConfig(group_size=16, symmetric=True)]
    calls = [0] * len(blocks)

    def count(i):
        def hook(module, args):
            calls[i] += 1
        return hook
    handles = [block.register_forward_pre_hook(count(i)) for i, block in enumerate(blocks)]
    replayed = measure_sensitivity(model, candidates, batches, show_progress=False)
    replayed_calls = list(calls)
    calls[:] = [0] * len(blocks)
    full = measure_sensitivity(model, candidates, batches, show_progress=False, replay=False)
    for h in handles:
        h.remove()
    assert replayed.layers.keys() == full.layers.keys()
    for name in full.layers:
        assert replayed.layers[name]["damage"] == full.layers[name]["damage"], name
    assert replayed_calls[0] < calls[0] and replayed_calls[-1] == calls[-1]
    assert all(isinstance(b, nn.Module) and type(b).__name__ != "_Replayed" for b in blocks)


class _ReversedStack(nn.Module):
    """Blocks in a ModuleList called last to first: replaying "earlier" blocks would be wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3))

    def forward(self, x):
        for block in reversed(self.layers):
            x = block(x)
        return x


def test_replay_stays_off_for_blocks_called_out_of_order():
    model = _ReversedStack()
    batches = [torch.randn(5, 32) for _ in range(2)]
    replayed = measure_sensitivity(model, [G32_RTN], batches, show_progress=False)
    full = measure_sensitivity(model, [G32_RTN], batches, show_progress=False, replay=False)
    for name in full.layers:
        assert replayed.layers[name]["damage"] == full.layers[name]["damage"], name
    # the replay would have given the last-called block (index 0) the damage of zero
    assert all(full.layers[name]["damage"][0] > 0 for name in full.layers)


def test_shared_inputs_are_found():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    table = measure_sensitivity(model, [G32_RTN], batches, show_progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        assert [p + f"self_attn.{x}_proj" for x in "qkv"] in table.groups
        assert [p + "mlp.gate_proj", p + "mlp.up_proj"] in table.groups
    assert len(table.groups) == 4


def _random_table(layers=7, seed=0):
    rng = random.Random(seed)
    candidates = [G32_RTN, G16_GPTQ, QuantConfig(group_size=-1), None]
    rows = {}
    for i in range(layers):
        weights = rng.choice([64, 128, 256]) * 64
        sizes = [weights // 2 + rng.randint(0, weights // 2), weights * 3 // 4 + rng.randint(0, weights),
                 weights // 2, weights * 4]
        damage = [rng.random() * 1e-3, rng.random() * 3e-4, rng.random() * 3e-3, 0.0]
        rows[f"layer{i}"] = {"weights": weights, "in_features": 64, "bytes": sizes,
                             "damage": damage}
    return SensitivityTable(candidates, rows)


def _brute_force(table, budget, units):
    best = None
    for pick in itertools.product(range(len(table.candidates)), repeat=len(units)):
        size = damage = 0
        for unit, i in zip(units, pick):
            size += sum(table.layers[n]["bytes"][i] for n in unit)
            damage += sum(table.layers[n]["damage"][i] for n in unit)
        if size <= budget and (best is None or damage < best):
            best = damage
    return best


@pytest.mark.parametrize("seed", range(4))
def test_plan_is_the_exact_knapsack_optimum(seed):
    table = _random_table(seed=seed)
    weights = table.weights
    for bits in (4.5, 5.0, 6.0, 9.0):
        plan = plan_mixed_precision(table, bits_per_weight=bits)
        budget = int(bits * weights / 8)
        assert plan.predicted_bytes <= budget
        assert plan.predicted_damage == pytest.approx(
            _brute_force(table, budget, [[n] for n in table.layers]), rel=1e-12)
        assert set(plan) == set(table.layers)
        assert plan.predicted_bytes == sum(table.layers[n]["bytes"][table.candidates.index(c)]
                                           for n, c in plan.items())
    tied = [["layer0", "layer1", "layer2"], ["layer4", "layer5"]]
    plan = plan_mixed_precision(table, bits_per_weight=5.0, ties=tied)
    assert plan["layer0"] is plan["layer1"] is plan["layer2"]
    assert plan["layer4"] is plan["layer5"]
    units = tied + [["layer3"], ["layer6"]]
    assert plan.predicted_damage == pytest.approx(
        _brute_force(table, int(5.0 * weights / 8), units), rel=1e-12)


def test_plan_budget_errors():
    table = _random_table()
    with pytest.raises(ValueError, match="below the smallest"):
        plan_mixed_precision(table, bits_per_weight=1.0)
    with pytest.raises(ValueError, match="at or above the dense"):
        plan_mixed_precision(table, bits_per_weight=33.0)
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_mixed_precision(table)
    with pytest.raises(ValueError, match="exactly one budget"):
        plan_mixed_precision(table, bits_per_weight=5.0, max_bytes=10**6)
    for bad in (-1, float("nan"), "4.5", True):
        with pytest.raises(ValueError, match="bits_per_weight must be a positive number"):
            plan_mixed_precision(table, bits_per_weight=bad)
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        plan_mixed_precision(table, max_bytes=1.5)
    with pytest.raises(TypeError, match="SensitivityTable"):
        plan_mixed_precision({"layer0": {}}, bits_per_weight=4.5)
    table.layers["layer3"]["in_features"] = 128
    with pytest.raises(ValueError, match="different in_features"):
        plan_mixed_precision(table, bits_per_weight=5.0, ties=[["layer2", "layer3"]])
    with pytest.raises(ValueError, match="not layers of the table"):
        plan_mixed_precision(table, bits_per_weight=5.0, ties=[["layer2", "nope"]])
    table.layers["layer1"]["damage"][0] = float("nan")
    with pytest.raises(ValueError, match="damage of nan"):
        plan_mixed_precision(table, bits_per_weight=5.0)


def test_table_saves_and_loads_as_json(tmp_path):
    model, batches = tiny_bert(), bert_batches()
    config = QuantConfig(group_size="tensor", scale_dtype=torch.bfloat16)
    table = measure_sensitivity(model, [G32_RTN, config], batches, show_progress=False)
    table.save(tmp_path / "table.json")
    loaded = SensitivityTable.load(tmp_path / "table.json")
    assert loaded.candidates == table.candidates and loaded.layers == table.layers
    assert loaded.groups == table.groups and "| bits per weight |" in str(loaded)
    assert dict(plan_mixed_precision(loaded, bits_per_weight=8.0)) == \
        dict(plan_mixed_precision(table, bits_per_weight=8.0))
    (tmp_path / "bad.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format version"):
        SensitivityTable.load(tmp_path / "bad.json")


def test_quantize_model_applies_a_plan_and_reports_predicted_against_measured():
    model, batches = tiny_bert(), bert_batches()
    table = measure_sensitivity(model, [G32_GPTQ, G16_GPTQ, QuantConfig(group_size=64,
                                                                       symmetric=False,
                                                                       method="gptq")],
                                batches, show_progress=False)
    plan = plan_mixed_precision(table, bits_per_weight=6.5)
    assert isinstance(plan, MixedPrecisionPlan)
    reference = copy.deepcopy(model)
    report = quantize_model(model, G32_GPTQ, batches, layer_configs=plan)
    check = report.plan_check
    assert check["measured_bits_per_weight"] == pytest.approx(plan.predicted_bits_per_weight,
                                                              rel=1e-12)
    assert report.total_bits_per_weight <= 6.5
    assert check["measured_error"] == pytest.approx(relative_output_error(model, reference,
                                                                           batches), rel=1e-3)
    assert "predicted" in str(report) and "measured" in str(report)
    for name, config in plan.items():
        layer = model.get_submodule(name)
        if config is None:
            assert isinstance(layer, nn.Linear)
        else:
            assert layer.group_size == config.group_size


@pytest.mark.parametrize("candidates, error, match", [
    ([None], ValueError, "no int4 format"),
    (G32_RTN, TypeError, "list of int4kit.QuantConfig"),
    ([G32_RTN, "int8"], TypeError, "got str"),
    ([G32_RTN, G32_RTN], ValueError, "same format twice"),
    ([G32_GPTQ, QuantConfig(group_size=16, method="gptq", norm_weighting=False)], ValueError,
     "norm_weighting"),
])
def test_bad_candidates(candidates, error, match):
    with pytest.raises(error, match=match):
        measure_sensitivity(tiny_bert(), candidates, bert_batches(), show_progress=False)


def test_bad_sensitivity_data():
    with pytest.raises(ValueError, match="calib_data is empty"):
        measure_sensitivity(tiny_bert(), [G32_RTN], None)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    bad = torch.randn(4, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        measure_sensitivity(model, [G32_RTN], [bad], show_progress=False)
    with pytest.raises(ValueError, match="eval_fn returned nan"):
        measure_sensitivity(model, [QuantConfig(group_size=16)], [torch.randn(4, 32)],
                            eval_fn=lambda m: float("nan"), show_progress=False)
