"""Interrupted work: a KeyboardInterrupt (or any exception) at every stage boundary of
quantize_model, of qat.prepare_qat and qat.convert, of a save and of a checkpoint conversion
leaves the model exactly as it was (all layers swapped or none) and no checkpoint on disk that
loads as a mix of two saves.

Each test first runs the work once, counting the calls of the functions that mark its stage
boundaries, then runs it again once per call, raising at that call."""
import os

import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import CheckpointError, QuantConfig, qat, quantize_model
from int4kit.formats import files as ckfiles
from int4kit.qat import prepare as qprepare
from int4kit.quant import calibration
from int4kit.quant import model as qmodel

from test_quant_model import bert_batches, tiny_bert


class Interrupt:
    """Wraps functions so that the n-th call among all of them raises KeyboardInterrupt, before
    the call runs (or, with after=True, once it has run)."""

    def __init__(self, monkeypatch, targets, at=None, after=False):
        self.calls = 0
        self.at = at
        self.after = after
        for owner, name in targets:
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(real))

    def _wrap(self, real):
        def wrapper(*args, **kwargs):
            self.calls += 1
            mine = self.calls  # boundaries nest (a fold replaces a layer): count each once
            if mine == self.at and not self.after:
                raise KeyboardInterrupt(f"interrupted at call {mine}")
            result = real(*args, **kwargs)
            if mine == self.at:
                raise KeyboardInterrupt(f"interrupted after call {mine}")
            return result
        return wrapper


QUANTIZE_BOUNDARIES = [(qmodel, "replace_module"), (qmodel, "_data_free"), (qmodel, "_calibrated"),
                       (qmodel, "dense_stand_in"), (qmodel, "_fold_into_producer"),
                       (calibration, "collect"), (int4kit.hf, "attach")]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {n: type(m) for n, m in model.named_modules()}


def assert_untouched(model, before, where):
    before_state, before_types = before
    state, types = snapshot(model)
    assert types == before_types, f"{where}: layers swapped"
    for key in before_state:  # AWQ's folds into producers undone too
        assert torch.equal(state[key], before_state[key]), f"{where}: {key} changed"
    assert getattr(model.config, "quantization_config", None) is None, where
    assert not hasattr(model, "hf_quantizer") and not hasattr(model, "quantization_method"), where


def check_every_interruption(monkeypatch, boundaries, make_model, work):
    """Runs work(model) once to count the boundary calls, then, on a fresh model each time,
    interrupts it before and after each call: the model must come out untouched."""
    model = make_model()
    with monkeypatch.context() as m:
        counter = Interrupt(m, boundaries)
        work(model)
    assert counter.calls > 5
    for at in range(1, counter.calls + 1):
        for after in (False, True):  # before the boundary's work, and once it is done
            model = make_model()
            before = snapshot(model)
            with monkeypatch.context() as m:
                Interrupt(m, boundaries, at=at, after=after)
                with pytest.raises(KeyboardInterrupt):
                    work(model)
            assert_untouched(model, before, f"call {at}{' (after)' if after else ''}")


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq", "awq+gptq"])
def test_quantize_model_is_all_or_nothing(monkeypatch, method):
    config = QuantConfig(group_size=32, symmetric=False, method=method)
    calib = bert_batches(n=2) if config.needs_calibration else None
    check_every_interruption(monkeypatch, QUANTIZE_BOUNDARIES, tiny_bert,
                             lambda model: quantize_model(model, config, calib_data=calib))


QAT_BOUNDARIES = QUANTIZE_BOUNDARIES + [
    (qprepare, "quantize_model"), (qprepare, "replace_module"),
    (qat.FakeQuantLinear, "from_int4"), (qat.FakeQuantLinear, "from_linear")]
CONVERT_BOUNDARIES = [(qat.FakeQuantLinear, "quantized"), (qprepare, "to_int4linear"),
                      (qprepare, "replace_module"), (int4kit.hf, "attach")]


@pytest.mark.parametrize("method, qparams", [("rtn", "dynamic"), ("rtn", "learned"),
                                             ("gptq", "codes_frozen"), ("awq", "frozen")])
def test_prepare_qat_is_all_or_nothing(monkeypatch, method, qparams):
    config = qat.QATConfig(QuantConfig(group_size=32, symmetric=False, method=method), qparams)
    calib = bert_batches(n=2) if method != "rtn" else None
    check_every_interruption(monkeypatch, QAT_BOUNDARIES, tiny_bert,
                             lambda model: qat.prepare_qat(model, config, calib))


def test_qat_convert_is_all_or_nothing(monkeypatch):
    config = qat.QATConfig(QuantConfig(group_size=32, symmetric=False), "learned")

    def prepared():
        model = tiny_bert()
        qat.prepare_qat(model, config)
        return model
    check_every_interruption(monkeypatch, CONVERT_BOUNDARIES, prepared, qat.convert)


def test_undo_puts_back_an_int4_producer_an_awq_fold_replaced(monkeypatch):
    """value is quantized first; AWQ on output.dense then folds its scales into value's
    Int4Linear (replacing it): interrupted, the first Int4Linear comes back."""
    model = tiny_bert()
    quantize_model(model, QuantConfig(group_size=32, symmetric=False),
                   filter_fn=lambda name, m: name.endswith("attention.self.value"))
    value = model.encoder.layer[0].attention.self.value
    before = snapshot(model)
    with monkeypatch.context() as m:
        Interrupt(m, [(qmodel, "_fold_into_producer")], at=2, after=True)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="awq"),
                           calib_data=bert_batches(n=2),
                           filter_fn=lambda name, m: name.endswith("attention.output.dense"))
    assert model.encoder.layer[0].attention.self.value is value
    state, types = snapshot(model)
    assert types == before[1] and all(torch.equal(state[k], before[0][k]) for k in state)


def test_undo_leaves_a_weight_norm_linear_working(monkeypatch):
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(32, 32)),
                          nn.Linear(32, 32))
    with monkeypatch.context() as m:
        Interrupt(m, [(qmodel, "replace_module")], at=1)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(model, QuantConfig(group_size=32))
    model(torch.randn(2, 32))  # its weight is still computed by the parametrization


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)


def quantized_two(seed, symmetric):
    torch.manual_seed(seed)
    model = Two()
    quantize_model(model, QuantConfig(group_size=32, symmetric=symmetric))
    return model


def loaded_state(folder):
    """The state a checkpoint folder loads as, or None when nothing loads."""
    with int4kit.skeleton():
        model = Two()
    try:
        int4kit.load_quantized(model, folder)
    except (CheckpointError, FileNotFoundError):
        return None
    return snapshot(model)[0]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SAVE_BOUNDARIES = [(ckfiles.ShardWriter, "add"), (ckfiles.os, "replace"),
                   (ckfiles.os, "remove"), (ckfiles, "_fsync")]


@pytest.mark.parametrize("shard", [1000, 10**9])
def test_interrupted_save_never_leaves_a_mix(tmp_path, monkeypatch, shard):
    old, new = quantized_two(0, False), quantized_two(1, True)
    old_state, new_state = snapshot(old)[0], snapshot(new)[0]
    folder = tmp_path / "ckpt"
    int4kit.save_quantized(old, folder, max_shard_size=4000)
    with monkeypatch.context() as m:
        counter = Interrupt(m, SAVE_BOUNDARIES)
        int4kit.save_quantized(new, tmp_path / "count", max_shard_size=shard)
    for at in range(1, counter.calls + 1):
        int4kit.save_quantized(old, folder, max_shard_size=4000)  # the previous checkpoint
        with monkeypatch.context() as m:
            Interrupt(m, SAVE_BOUNDARIES, at=at)
            with pytest.raises(KeyboardInterrupt):
                int4kit.save_quantized(new, folder, max_shard_size=shard)
        state = loaded_state(folder)
        assert state is None or same_state(state, old_state) or same_state(state, new_state), \
            f"interrupted at call {at}: the folder loads as neither save"
        assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")
                    and n.endswith(".safetensors")], f"call {at}: temporary shards left"
        assert same_state(snapshot(new)[0], new_state)  # the model is not touched by saving


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path, monkeypatch):
    import foreign_formats as ff
    from test_convert import tiny_llama, linear_names
    model = tiny_llama()
    tensors = {}
    for name in linear_names(model):
        w = model.get_submodule(name).weight.detach()
        codes, zeros, scales = ff.quantize_asym(w, 32, torch.arange(w.shape[1]) // 32, False,
                                                torch.float16)
        qweight, qzeros = ff.gptq_pack(codes, zeros, False)
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": scales})
    ff.write_hf_folder(tmp_path / "src", model, tensors, {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"})
    boundaries = SAVE_BOUNDARIES + [(int4kit.formats.convert.gptq, "gptq_to_canonical")]
    with monkeypatch.context() as m:
        counter = Interrupt(m, boundaries)
        int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "count", max_shard_size=20000)
    complete = int4kit.formats.CheckpointReader(tmp_path / "count")
    for at in range(1, counter.calls + 1):
        dst = tmp_path / f"dst{at}"
        with monkeypatch.context() as m:
            Interrupt(m, boundaries, at=at)
            with pytest.raises(KeyboardInterrupt):
                int4kit.convert_checkpoint(tmp_path / "src", dst, max_shard_size=20000)
        try:
            reader = int4kit.formats.CheckpointReader(dst)
            int4kit.formats.native.read_quantization_config(reader)
        except (CheckpointError, FileNotFoundError):
            continue  # nothing that loads
        assert set(reader.keys()) == set(complete.keys()), f"call {at}: a partial conversion"


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": torch.zeros(0, 12, dtype=torch.long)}, "batch 1: input_ids is empty"),
    ({"input_ids": torch.ones(2, 12, dtype=torch.long), "attention_mask": None,
      "token_type_ids": torch.zeros(2, 12, dtype=torch.long, device="meta")},
     "batch 1: token_type_ids is on meta"),
    ({"inputs_embeds": torch.full((2, 12, 64), float("inf"))}, "batch 1: inputs_embeds holds NaN"),
    ("some text", "batch 1 holds no tensor"),
    ({"inputs_embeds": torch.randn(2, 12, 64, dtype=torch.float64)},
     "batch 1: the model raised RuntimeError"),  # a dtype the model does not compute in
])
def test_bad_calibration_data_is_refused_before_anything_changes(bad, message):
    model = tiny_bert()
    before_state, before_types = snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize_model(model, QuantConfig(group_size=32, method="gptq"),
                       calib_data=[bert_batches(n=1)[0], bad])
    state, types = snapshot(model)
    assert types == before_types and all(torch.equal(state[k], before_state[k]) for k in state)
