"""quantize_checkpoint (int4kit.parallel.streaming, docs/SCALE.md): a Hugging Face folder
quantized without loading the model gives the codes quantize_model gives on the loaded model
with the same options (torch.equal on every stored tensor), resumes after an interruption, and
refuses sources it cannot handle before writing anything that loads."""
import os

import pytest
import torch

import int4kit
from int4kit.formats.files import CheckpointReader
from int4kit.parallel import streaming

transformers = pytest.importorskip("transformers")


def tiny_llama_folder(path, layers=3, tie=False):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="100KB")  # several shards, blocks across them
    return path


def calibration():
    g = torch.Generator().manual_seed(3)
    batches = []
    for length in (9, 12):
        ids = torch.randint(0, 96, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # padding in each batch: it must stay out of the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def in_memory(src, config, batches, skip, streamed_report=None, layer_configs=None):
    """quantize_model on the loaded model; with streamed_report, also checks that
    quantize_checkpoint's report counts the same bytes per layer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    report = int4kit.quantize_model(model, config, batches, skip=skip,
                                    layer_configs=layer_configs)
    if streamed_report is not None:
        assert streamed_report.layer_sizes == report.layer_sizes
    return model


def assert_same_checkpoint(model, directory):
    reader = CheckpointReader(directory)
    state = model.state_dict()
    quantized = int4kit.formats.native.read_quantization_config(reader)["layers"]
    assert set(quantized) == {n for n, m in model.named_modules()
                              if isinstance(m, int4kit.nn.QuantLinear)}
    for key in reader.keys():
        assert torch.equal(reader.get(key), state[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = calibration()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_data_free_streams_the_same_codes(tmp_path, method):
    src = tiny_llama_folder(tmp_path / "src")
    config = int4kit.QuantConfig(method=method, group_size=32, symmetric=False)
    report = int4kit.quantize_checkpoint(src, tmp_path / "dst", config, max_shard_size="50KB")
    assert len(report.swapped) == 3 * 7 + 1  # every Linear, lm_head included
    assert_same_checkpoint(in_memory(src, config, None, (), report), tmp_path / "dst")
    assert not os.path.exists(tmp_path / "dst" / streaming.PARTIAL_DIR)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int8_layers_stream_the_same_codes(tmp_path, method):
    # a mixed plan's int8 layers, data-free and calibrated, block by block
    src = tiny_llama_folder(tmp_path / "src")
    config = int4kit.QuantConfig(method=method, group_size=32, symmetric=False)
    layer_configs = {"*down_proj": int4kit.QuantConfig(method=method, bits=8, group_size=-1)}
    batches = calibration() if method == "gptq" else None
    skip = ("lm_head",) if method == "gptq" else ()
    report = int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches, skip=skip,
                                         layer_configs=layer_configs)
    model = in_memory(src, config, batches, skip, report, layer_configs)
    assert isinstance(model.model.layers[0].mlp.down_proj, int4kit.Int8Linear)
    assert_same_checkpoint(model, tmp_path / "dst")


@pytest.mark.parametrize("method, extra", [("gptq", {}), ("gptq", {"act_order": True}),
                                           ("awq", {})])
def test_block_by_block_gives_quantize_model_codes(tmp_path, method, extra):
    src = tiny_llama_folder(tmp_path / "src")
    config = int4kit.QuantConfig(method=method, group_size=32, symmetric=False, **extra)
    batches = calibration()
    report = int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches,
                                         skip=["lm_head"])
    assert len(report.swapped) == 3 * 7 and report.skipped == [("lm_head", "named in skip")]
    assert_same_checkpoint(in_memory(src, config, batches, ["lm_head"], report),
                           tmp_path / "dst")


@pytest.mark.parametrize("calibrated", [True, False])
def test_layer_configs_give_quantize_model_codes(tmp_path, calibrated):
    """Per-layer configs (a mixed-precision plan): finer groups for down_proj, v_proj dense,
    and with a calibrated base an lm_head outside the blocks kept to a data-free method."""
    src = tiny_llama_folder(tmp_path / "src")
    Q = int4kit.QuantConfig
    config = Q(method="gptq" if calibrated else "rtn", group_size=32, symmetric=False)
    layer_configs = {"*.mlp.down_proj": Q(method=config.method, group_size=16, symmetric=False),
                     "*.self_attn.v_proj": None,
                     "lm_head": Q(method="hqq", group_size=32, symmetric=False)}
    batches = calibration() if calibrated else None
    report = int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches,
                                         layer_configs=layer_configs)
    assert len(report.swapped) == 3 * 6 + 1
    model = in_memory(src, config, batches, (), report, layer_configs)
    assert model.model.layers[0].mlp.down_proj.group_size == 16
    assert isinstance(model.model.layers[0].self_attn.v_proj, torch.nn.Linear)
    assert model.lm_head.method == "hqq"
    assert_same_checkpoint(model, tmp_path / "dst")


def test_tied_embeddings_and_the_last_norm(tmp_path):
    """A tied lm_head stays tied (written once, as an alias); the last block's norm weighting
    uses the model's final norm."""
    src = tiny_llama_folder(tmp_path / "src", layers=2, tie=True)
    config = int4kit.QuantConfig(method="gptq", group_size=32)
    batches = calibration()
    report = int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches)
    assert_same_checkpoint(in_memory(src, config, batches, (), report), tmp_path / "dst")


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_resumes_after_an_interruption(tmp_path, monkeypatch, method):
    """Stopped after the second unit (block, or source shard), nothing in dst loads; called
    again, the run skips the finished units and gives the uninterrupted result."""
    src = tiny_llama_folder(tmp_path / "src")
    config = int4kit.QuantConfig(method=method, group_size=32, symmetric=False)
    batches = calibration() if method == "gptq" else None
    skip = ["lm_head"] if method == "gptq" else ()
    record = streaming._Run.record
    calls = []

    def interrupted(self, done, *args):
        record(self, done, *args)
        calls.append(done)
        if done == 2 and len(calls) == 2:
            raise Interrupt
    monkeypatch.setattr(streaming._Run, "record", interrupted)
    with pytest.raises(Interrupt):
        int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches, skip=skip)
    with pytest.raises(int4kit.CheckpointError):
        CheckpointReader(tmp_path / "dst")
    calls.clear()
    int4kit.quantize_checkpoint(src, tmp_path / "dst", config, batches, skip=skip)
    assert calls[0] == 3  # units 1 and 2 were not done again
    assert_same_checkpoint(in_memory(src, config, batches, skip), tmp_path / "dst")


def test_refuses_what_it_cannot_do_before_writing(tmp_path):
    src = tiny_llama_folder(tmp_path / "src", layers=2)
    config = int4kit.QuantConfig(method="gptq", group_size=32)
    with pytest.raises(ValueError, match="lm_head.*in no block"):
        int4kit.quantize_checkpoint(src, tmp_path / "a", config, calibration())
    with pytest.raises(ValueError, match="needs calib_data"):
        int4kit.quantize_checkpoint(src, tmp_path / "b", config)
    with pytest.raises(ValueError, match="reconstruction='layer'"):
        int4kit.quantize_checkpoint(src, tmp_path / "b", int4kit.QuantConfig(
            method="adaround", reconstruction="block"), calibration(), skip=["lm_head"])
    # a block whose weights are missing from the files (and the index)
    reader = CheckpointReader(src)
    victim = "model.layers.1.mlp.down_proj.weight"
    shard = os.path.join(src, os.path.basename(reader.file_of(victim)))
    import safetensors.torch
    tensors = safetensors.torch.load_file(shard)
    del tensors[victim]
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    index = os.path.join(src, "model.safetensors.index.json")
    import json
    content = json.loads(open(index).read())
    del content["weight_map"][victim]
    open(index, "w").write(json.dumps(content))
    with pytest.raises(int4kit.CheckpointError, match="lacks 1 tensor.*down_proj"):
        int4kit.quantize_checkpoint(src, tmp_path / "c", int4kit.QuantConfig(group_size=32))
    assert not os.path.exists(tmp_path / "c" / "model.safetensors")
