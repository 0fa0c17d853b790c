"""int4kit's native checkpoint format: save_quantized / load_quantized (docs/CHECKPOINT.md).

Round trips are checked tensor by tensor against what was saved (torch.equal) and output by output
against the model before saving; the files themselves are read back with the safetensors package,
independently of int4kit's reader."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import int4kit
from int4kit import CheckpointError, reference
from int4kit.formats import files, native


class Tiny(nn.Module):
    """Two quantizable layers, one left dense, an embedding and buffers of both kinds."""

    def __init__(self, tie=False):
        super().__init__()
        self.emb = nn.Embedding(11, 64)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 11, bias=False)
        self.norm = nn.LayerNorm(64)
        self.register_buffer("steps", torch.tensor([3]))
        self.register_buffer("positions", torch.arange(7), persistent=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(h + self.down(F.gelu(self.up(h))))
        return self.head(h)


def quantized_tiny(symmetric=False, group_size=32, tie=False, dtype=torch.float32):
    model = Tiny(tie).to(dtype)
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=group_size, symmetric=symmetric),
                           skip=["head"])
    return model


IDS = torch.tensor([[1, 4, 9, 2, 0, 10]])


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_into_meta_skeleton(tmp_path, symmetric, dtype):
    model = quantized_tiny(symmetric, dtype=dtype)
    expected = model(IDS)
    names = int4kit.save_quantized(model, tmp_path)
    assert names == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with int4kit.skeleton():
        fresh = Tiny().to(dtype)
    assert fresh.up.weight.device.type == "meta" and fresh.positions.device.type == "cpu"
    loaded = int4kit.load_quantized(fresh, tmp_path)
    assert loaded is fresh
    assert isinstance(fresh.up, int4kit.Int4Linear) and isinstance(fresh.head, nn.Linear)
    assert fresh.up.packed is not None  # prepacked for the CPU, no canonical copy kept
    assert_same_state(model, fresh)
    assert torch.equal(fresh(IDS), expected)


def test_files_hold_the_canonical_tensors(tmp_path):
    """Read back with the safetensors package alone: the canonical tensors under each layer's
    prefix, every other tensor unchanged, and the per-layer settings in the metadata."""
    model = quantized_tiny()
    int4kit.save_quantized(model, tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    qweight, scales, zeros = model.up.canonical()
    assert torch.equal(tensors["up.qweight"], qweight) and tensors["up.qweight"].dtype == torch.uint8
    assert torch.equal(tensors["up.scales"], scales) and torch.equal(tensors["up.zeros"], zeros)
    assert torch.equal(tensors["up.bias"], model.up.bias)
    assert "down.bias" not in tensors and "down.weight" not in tensors
    assert torch.equal(tensors["head.weight"], model.head.weight)
    assert torch.equal(tensors["steps"], model.steps) and "positions" not in tensors
    with safetensors.safe_open(path, "pt") as f:
        config = json.loads(f.metadata()[native.METADATA_KEY])
    assert config["quant_method"] == "int4kit" and config["format_version"] == 1
    assert config["layers"]["up"] == {
        "in_features": 64, "out_features": 96, "group_size": 32, "symmetric": False,
        "scale_dtype": "float32", "act_quant": None, "method": "rtn", "bias": True,
        "input_scale": False, "input_scale_dtype": None, "input_perm": False}
    assert set(config["layers"]) == {"up", "down"}
    # the file is the canonical tensors plus the dense parts, and little else
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == int4kit.quant.model.state_dict_bytes(model)
    assert os.path.getsize(path) <= payload * 1.02 + 4096


def test_sharded_save_follows_hugging_face_conventions(tmp_path):
    model = quantized_tiny()
    limit = 3500
    names = int4kit.save_quantized(model, tmp_path, max_shard_size=limit)
    assert names[-1] == "model.safetensors.index.json" and len(names) > 3
    index = json.loads((tmp_path / names[-1]).read_text())
    shards = names[:-1]
    assert all(n == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
               for i, n in enumerate(shards))
    seen = {}
    for shard in shards:
        part = safetensors.torch.load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1, (shard, size)  # one oversized tensor alone
        seen.update({k: shard for k in part})
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    with int4kit.skeleton():
        fresh = Tiny()
    int4kit.load_quantized(fresh, tmp_path)
    assert_same_state(model, fresh)


def test_save_is_streamed_one_shard_at_a_time(tmp_path, monkeypatch):
    """The writer never holds more than one shard, and each layer's canonical tensors are made
    only when its turn comes (not all up front, as model.state_dict() would)."""
    model = quantized_tiny()
    events = []
    real_canonical = int4kit.Int4Linear.canonical

    def canonical(self):
        events.append("canonical")
        return real_canonical(self)
    real_flush = files.ShardWriter._flush

    def flush(self):
        if self._pending:
            events.append(self._pending_bytes)
        return real_flush(self)
    monkeypatch.setattr(int4kit.Int4Linear, "canonical", canonical)
    monkeypatch.setattr(files.ShardWriter, "_flush", flush)
    int4kit.save_quantized(model, tmp_path, max_shard_size=3500)
    sizes = [e for e in events if e != "canonical"]
    assert len(sizes) >= 4 and max(sizes) <= 3500 + 3072  # a shard, or one tensor over it
    first_flush = next(i for i, e in enumerate(events) if e != "canonical")
    assert events[:first_flush].count("canonical") == 1  # `down` waits for its turn


def test_resave_replaces_the_previous_checkpoint_whole(tmp_path):
    model = quantized_tiny()
    int4kit.save_quantized(model, tmp_path, max_shard_size=4000)
    int4kit.save_quantized(model, tmp_path, max_shard_size=9000)  # fewer shards: stale ones go
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    index = json.loads((tmp_path / files.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    int4kit.save_quantized(model, tmp_path, max_shard_size="1GB")  # one file: the index goes
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path):
    model = quantized_tiny(tie=True)
    int4kit.save_quantized(model, tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert "emb.weight" in saved and "head.weight" not in saved
    with int4kit.skeleton():
        fresh = Tiny(tie=True)
    int4kit.load_quantized(fresh, tmp_path)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(fresh(IDS), model(IDS))


def test_real_skeleton_keeps_its_dtype(tmp_path):
    model = quantized_tiny()
    int4kit.save_quantized(model, tmp_path)
    fresh = Tiny().to(torch.bfloat16)  # random real weights in another dtype
    int4kit.load_quantized(fresh, tmp_path)
    assert fresh.emb.weight.dtype == torch.bfloat16  # the skeleton's dtype is kept
    assert torch.equal(fresh.emb.weight, model.emb.weight.bfloat16())
    for a, b in zip(model.up.canonical(), fresh.up.canonical()):  # quantized tensors as saved
        assert torch.equal(a, b)


def test_settings_and_optional_inputs_survive(tmp_path):
    """input_scale, input_perm, act_quant, method and 16-bit scales come back as saved."""
    torch.manual_seed(1)
    K, N, G = 96, 40, 32
    w = torch.randn(N, K)
    qweight, scales, zeros = reference.quantize(w, G, False)
    perm = torch.randperm(K)
    layer = int4kit.Int4Linear.from_quantized(qweight, scales.to(torch.bfloat16),
                                              zeros.to(torch.bfloat16), G, K,
                                              bias=torch.randn(N), act_quant="int8")
    layer.input_scale = torch.rand(K) + 0.5
    layer.input_perm = perm
    layer.method = "gptq"
    model = nn.Sequential(layer)
    x = torch.randn(5, K)
    # reference: stored column k multiplies x[:, perm[k]] * input_scale[k]
    w_hat = reference.dequantize(qweight, scales.to(torch.bfloat16), zeros.to(torch.bfloat16), G,
                                 K, torch.float32)
    layer.act_quant = None
    y_ref = (x[:, perm] * layer.input_scale) @ w_hat.T + layer.bias
    assert torch.allclose(model(x), y_ref, rtol=1e-4, atol=1e-4)
    layer.act_quant = "int8"
    int4kit.save_quantized(model, tmp_path)
    with int4kit.skeleton():
        fresh = nn.Sequential(nn.Linear(K, N))
    int4kit.load_quantized(fresh, tmp_path)
    got = fresh[0]
    assert (got.act_quant, got.method, got.scale_dtype) == ("int8", "gptq", torch.bfloat16)
    assert torch.equal(got.input_perm, perm) and torch.equal(got.input_scale, layer.input_scale)
    assert_same_state(model, fresh)
    assert torch.equal(fresh(x), model(x))


def test_state_dict_load_checks_input_perm():
    layer = int4kit.Int4Linear(8, 4, group_size=8)
    state = layer.state_dict()
    state["input_perm"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(RuntimeError, match="input_perm: expected an int64 permutation"):
        layer.load_state_dict(state)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = quantized_tiny()
    int4kit.save_quantized(model, tmp_path, max_shard_size=6000)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        int4kit.save_quantized(quantized_tiny(symmetric=True), tmp_path, max_shard_size=6000)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    # into a fresh folder: nothing that loads is left behind
    fresh_dir = tmp_path / "new"
    calls["n"] = 0
    with pytest.raises(OSError):
        int4kit.save_quantized(model, fresh_dir, max_shard_size=6000)
    assert os.listdir(fresh_dir) == []
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        int4kit.load_quantized(Tiny(), fresh_dir)


# ---- bad input ----------------------------------------------------------------------------------

def saved(tmp_path, **kwargs):
    model = quantized_tiny(**kwargs)
    int4kit.save_quantized(model, tmp_path)
    return tmp_path / "model.safetensors"


def rewrite(path, change, metadata_change=None):
    """Rewrites a saved file with `change(tensors)` applied (and the metadata's config edited)."""
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    # a self-consistent file: the checksums match what it now holds
    metadata[files.CHECKSUM_KEY] = json.dumps({k: files.tensor_crc32(v) for k, v in tensors.items()})
    if metadata_change is not None:
        config = json.loads(metadata[native.METADATA_KEY])
        metadata_change(config)
        metadata[native.METADATA_KEY] = json.dumps(config)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def load_into_skeleton(path):
    with int4kit.skeleton():
        model = Tiny()
    return int4kit.load_quantized(model, path)


@pytest.mark.parametrize("size", [0, 7, 100, -1])
def test_truncated_file_is_named(tmp_path, size):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:size] if size >= 0 else data[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_into_skeleton(tmp_path)


def test_corrupted_header_is_named(tmp_path):
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_into_skeleton(tmp_path)


def _del(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize("change, message", [
    (_del("up.scales"), "'up.scales' is missing"),
    (_del("emb.weight"), "lacks 1 tensor.*emb.weight"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), "no place for: extra.weight"),
    (lambda t: t.update({"up.weight": torch.zeros(2)}), "'up.weight' belongs to a quantized layer"),
    (lambda t: t.update({"up.scales": t["up.scales"][:, :1].contiguous()}),
     r"'up.scales' expected shape \[96, 2\] and dtype float32, got \[96, 1\]"),
    (lambda t: t.update({"up.qweight": t["up.qweight"].to(torch.int8)}),
     "'up.qweight' expected .* dtype uint8, got .* int8"),
    (lambda t: t.update({"up.zeros": t["up.zeros"].half()}), "'up.zeros' expected .*float32"),
    (lambda t: t["up.scales"].__setitem__((3, 1), float("nan")), r"'up.scales' must be finite.*\[3, 1\]"),
    (lambda t: t["down.zeros"].__setitem__((0, 0), float("inf")), "'down.zeros' must be finite"),
    (lambda t: t.update({"emb.weight": t["emb.weight"][:5].contiguous()}),
     r"'emb.weight' has shape \[5, 64\]"),
])
def test_bad_tensors_are_named(tmp_path, change, message):
    path = saved(tmp_path)
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_into_skeleton(tmp_path)
    assert str(tmp_path) in str(info.value)  # the file, or the folder for a missing tensor


def _set_layer(field, value):
    return lambda config: config["layers"]["up"].__setitem__(field, value)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.__setitem__("format_version", 2), "format_version 2, newer than the 1"),
    (lambda c: c.__setitem__("format_version", "1"), "format_version must be a positive int"),
    (lambda c: c.__setitem__("quant_method", "gptq"), "quant_method 'gptq'.*convert_checkpoint"),
    (lambda c: c.__setitem__("bits", 8), "bits=8"),
    (lambda c: c.__setitem__("layers", []), "needs 'layers'"),
    (_set_layer("group_size", 3), "layer 'up'.*group_size"),
    (_set_layer("scale_dtype", "float64"), "scale_dtype must be one of"),
    (_set_layer("symmetric", True), "'up.zeros' belongs to a quantized layer"),
    (_set_layer("input_perm", True), "'up.input_perm' is missing"),
    (_set_layer("out_features", 95), "'up' is a 95 x 64 linear in the checkpoint but the model "
                                     "has Linear 96 x 64"),
    (lambda c: c["layers"].__setitem__("norm", c["layers"]["up"]), "'norm' .* has LayerNorm"),
    (lambda c: c["layers"].__setitem__("nope", c["layers"]["up"]), "'nope', which model"),
    (lambda c: c["layers"]["up"].pop("method"), "layer 'up' lacks method"),
])
def test_bad_config_is_named(tmp_path, change, message):
    path = saved(tmp_path)
    rewrite(path, lambda t: None, change)
    with pytest.raises(CheckpointError, match=message):
        load_into_skeleton(tmp_path)


def test_input_perm_that_is_not_a_permutation(tmp_path):
    path = saved(tmp_path)

    def add_perm(t):
        t["up.input_perm"] = torch.zeros(64, dtype=torch.int64)
    rewrite(path, add_perm, _set_layer("input_perm", True))
    with pytest.raises(CheckpointError, match="'up.input_perm' must be a permutation of 0..63"):
        load_into_skeleton(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_into_skeleton(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_into_skeleton(tmp_path / "nowhere")
    safetensors.torch.save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not an int4kit checkpoint"):
        load_into_skeleton(tmp_path)


def test_flipped_data_bits_fail_the_checksum(tmp_path):
    """safetensors has no checksum of its own: int4kit records each tensor's CRC-32 in its
    shard's metadata, so a flipped bit in the data is an error, not a silently different
    weight."""
    path = saved(tmp_path)
    with safetensors.safe_open(path, "pt") as f:
        checksums = json.loads(f.metadata()[files.CHECKSUM_KEY])
    tensors = safetensors.torch.load_file(path)
    assert checksums == {k: files.tensor_crc32(v) for k, v in tensors.items()}
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the CRC-32.*corrupt"):
        load_into_skeleton(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    int4kit.save_quantized(quantized_tiny(), tmp_path, max_shard_size=8000)
    os.remove(sorted(tmp_path.glob("model-00002-of-*.safetensors"))[0])
    with pytest.raises(CheckpointError, match="model-00002-of-.*missing"):
        load_into_skeleton(tmp_path)


def test_stale_config_json_is_caught_and_replaced(tmp_path):
    """save_quantized into a Hugging Face folder updates its config.json with the weights; a
    config.json that disagrees with the weights' metadata is an error, not silently obeyed."""
    model = quantized_tiny()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    int4kit.save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "tiny"
    assert config["quantization_config"]["layers"]["up"]["symmetric"] is False
    config["quantization_config"]["layers"]["up"]["act_quant"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: its quantization_config and the "
                                              "safetensors metadata .* describe different layers"):
        load_into_skeleton(tmp_path)


def test_meta_buffers_fail_before_anything_changes(tmp_path):
    saved(tmp_path)
    with torch.device("meta"):
        model = Tiny()  # its non-persistent buffer is meta too: no checkpoint holds it
    with pytest.raises(CheckpointError, match="buffer.*on the meta device.*positions.*skeleton"):
        int4kit.load_quantized(model, tmp_path)
    assert isinstance(model.up, nn.Linear) and model.emb.weight.device.type == "meta"


def test_nothing_is_changed_when_loading_fails(tmp_path):
    path = saved(tmp_path)
    rewrite(path, lambda t: t["down.scales"].__setitem__((0, 0), float("nan")))
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        int4kit.load_quantized(model, tmp_path)
    assert isinstance(model.up, nn.Linear)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_save_arguments_are_checked(tmp_path):
    model = quantized_tiny()
    with pytest.raises(ValueError, match="max_shard_size must be an int or a size"):
        int4kit.save_quantized(model, tmp_path, max_shard_size="five")
    with pytest.raises(ValueError, match="max_shard_size must be positive"):
        int4kit.save_quantized(model, tmp_path, max_shard_size=0)
    with pytest.raises(ValueError, match="no Int4Linear or Int8Linear layer"):
        int4kit.save_quantized(Tiny(), tmp_path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        int4kit.save_quantized("model", tmp_path)
    with pytest.raises(TypeError, match="single Int4Linear"):
        int4kit.save_quantized(model.up, tmp_path)
    assert files.parse_size("5GB") == 5 * 10**9 and files.parse_size("500MiB") == 500 * 2**20


# ---- what the hostile-file fuzzer (tests/checkpoint_fuzz.py) found, kept as regular tests --------

def test_a_damaged_checksum_key_does_not_switch_the_check_off(tmp_path):
    path = saved(tmp_path)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    tensors["up.qweight"][0, 0] ^= 1  # a changed code ...
    metadata["int4kit_crc33"] = metadata.pop(files.CHECKSUM_KEY)  # ... and a damaged key name
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="no checksum recorded for .*corrupt"):
        load_into_skeleton(tmp_path)
    metadata[files.WRITER_KEY] = "int4kiu"
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="'int4kit_writer' is 'int4kiu'.*corrupt"):
        load_into_skeleton(tmp_path)


def test_a_header_lying_about_a_dtype_of_the_same_width(tmp_path):
    """The checksum covers dtype and shape: F32 bytes relabelled I32 are caught."""
    path = saved(tmp_path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["emb.weight"]["dtype"] = "I32"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    with pytest.raises(CheckpointError, match="'emb.weight' does not match the CRC-32"):
        load_into_skeleton(tmp_path)


def test_an_integer_tensor_where_the_model_has_a_float_one(tmp_path):
    path = saved(tmp_path)
    rewrite(path, lambda t: t.update({"emb.weight": t["emb.weight"].view(torch.int32)}))
    with pytest.raises(CheckpointError, match="'emb.weight' has dtype int32, the model's "
                                              "emb.weight is float32"):
        load_into_skeleton(tmp_path)
