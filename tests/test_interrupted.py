"""Interrupted work: a KeyboardInterrupt (or any exception) at every stage boundary of
quantize_model, of a save and of a checkpoint conversion leaves the model exactly as it was (all
layers swapped or none) and no checkpoint on disk that loads as a mix of two saves.

Each test first runs the work once, counting the calls of the functions that mark its stage
boundaries, then runs it again once per call, raising at that call."""
import os

import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import CheckpointError, QuantConfig, quantize_model
from int4kit.formats import files as ckfiles
from int4kit.quant import calibration
from int4kit.quant import model as qmodel

from test_quant_model import bert_batches, tiny_bert


class Interrupt:
    """Wraps functions so that the n-th call among all of them raises KeyboardInterrupt."""

    def __init__(self, monkeypatch, targets, at=None):
        self.calls = 0
        self.at = at
        for owner, name in targets:
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(real))

    def _wrap(self, real):
        def wrapper(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt(f"interrupted at call {self.calls}")
            return real(*args, **kwargs)
        return wrapper


QUANTIZE_BOUNDARIES = [(qmodel, "_replace"), (qmodel, "_data_free"), (qmodel, "_calibrated"),
                       (qmodel, "dense_stand_in"), (qmodel, "_fold_into_producer"),
                       (calibration, "collect"), (int4kit.hf, "attach")]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq", "awq+gptq"])
def test_quantize_model_is_all_or_nothing(monkeypatch, method):
    config = QuantConfig(group_size=32, symmetric=False, method=method)
    calib = bert_batches(n=2) if config.needs_calibration else None
    with monkeypatch.context() as m:
        counter = Interrupt(m, QUANTIZE_BOUNDARIES)
        quantize_model(tiny_bert(), config, calib_data=calib)
    assert counter.calls > 5
    for at in range(1, counter.calls + 1):
        model = tiny_bert()
        before_state, before_types = snapshot(model)
        with monkeypatch.context() as m:
            Interrupt(m, QUANTIZE_BOUNDARIES, at=at)
            with pytest.raises(KeyboardInterrupt):
                quantize_model(model, config, calib_data=calib)
        state, types = snapshot(model)
        assert types == before_types, f"interrupted at call {at}: layers swapped"
        for key in before_state:  # AWQ's folds into producers undone too
            assert torch.equal(state[key], before_state[key]), f"call {at}: {key} changed"
        assert getattr(model.config, "quantization_config", None) is None


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
    for at in range(1, counter.calls + 1, 3):
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
