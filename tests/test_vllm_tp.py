"""The tensor-parallel sizes vLLM can serve a checkpoint at (formats/vllm.py): its alignment
rules on known model shapes, worked out by hand below, and the same answer read from exported
GPTQ and compressed-tensors files."""
import json

import pytest
import torch.nn as nn

import int4kit
from int4kit.formats import vllm
from int4kit.formats.convert import detect_format
from int4kit.formats.files import CheckpointReader

LLAMA2_7B = {"num_attention_heads": 32, "num_key_value_heads": 32}


def llama_layers(hidden, intermediate, group_size, kv_dim=None):
    kv_dim = kv_dim or hidden
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden),
              "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    return {f"model.layers.0.{'mlp' if n in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{n}":
            vllm.LayerShape(N, K, group_size) for n, (N, K) in shapes.items()}


def test_roles_follow_the_name_ending():
    assert vllm.role("model.layers.3.self_attn.q_proj") == "column"
    assert vllm.role("model.layers.3.mlp.down_proj") == "row"
    assert vllm.role("encoder.layer.0.intermediate.dense") == "column"  # BERT: longest ending
    assert vllm.role("encoder.layer.0.output.dense") == "row"
    assert vllm.role("encoder.layer.0.attention.self.query") == "column"
    assert vllm.role("classifier") is None


def test_llama2_7b_group_128():
    """down_proj's K = 11008 = 86 groups of 128: 43 per rank at TP 2, 21.5 at TP 4 (vLLM refuses
    the checkpoint: the failure users report), 10.75 at TP 8."""
    support = vllm.tp_support(llama_layers(4096, 11008, 128), LLAMA2_7B)
    assert support[1] == [] and support[2] == []
    assert support[4] == ["error: model.layers.0.mlp.down_proj: in_features per rank 2752 is not "
                          "a whole number of groups of 128"]
    # TP 8: gate/up's 1376 rows per rank are off Marlin's 64 too (slower, but they would load)
    assert [p.split(":")[0:2] for p in support[8]] == [
        ["error", " model.layers.0.mlp.down_proj"], ["slow", " model.layers.0.mlp.gate_proj"],
        ["slow", " model.layers.0.mlp.up_proj"]]
    summary = vllm.summary(support).splitlines()
    assert summary[0] == "TP 1: yes (Marlin)" and summary[2].startswith("TP 4: no - ")


def test_llama3_8b_gqa_group_128():
    """K = 14336 = 112 groups: whole at 2, 4 and 8; 8 key/value heads divide every TP size."""
    support = vllm.tp_support(llama_layers(4096, 14336, 128, kv_dim=1024),
                              {"num_attention_heads": 32, "num_key_value_heads": 8},
                              sizes=(1, 2, 4, 8, 16))
    assert all(support[tp] == [] for tp in (1, 2, 4, 8))
    # at 16, 8 kv heads are replicated (16 % 8 == 0); the k/v projections' 64 rows per rank are
    # still a Marlin multiple, and down_proj's 896 columns are 7 groups of 128
    assert support[16] == []


def test_per_channel_and_marlin_only_problems():
    """Per channel: no group rule, only Marlin's tiles (N per rank % 64, K per rank % 128): a
    layer that misses them loads on a slower kernel. Heads that do not divide: an error."""
    layers = llama_layers(384, 1536, -1)
    support = vllm.tp_support(layers, {"num_attention_heads": 12}, sizes=(1, 2, 4, 8))
    assert support[1] == []
    # TP 2: o_proj K 192 and down_proj's N stays 384 but K 768: o_proj is off Marlin's 128
    assert support[2] == ["slow: model.layers.0.self_attn.o_proj: 384 x 192 per rank is not a "
                          "multiple of Marlin's 64 x 128"]
    assert len(support[4]) == 4  # q/k/v: 96 rows, o_proj: 96 columns per rank
    assert "error: num_attention_heads 12 does not divide by 8" in support[8]
    odd = vllm.layer_problems("x.q_proj", vllm.LayerShape(100, 64, 32), 2)
    assert odd == ["slow: x.q_proj: 50 x 64 per rank is not a multiple of Marlin's 64 x 128"]
    assert vllm.layer_problems("x.q_proj", vllm.LayerShape(101, 64, 32), 2)[0].startswith("error")
    assert vllm.layer_problems("x.unknown", vllm.LayerShape(128, 240, 48), 1) == \
        ["slow: x.unknown: Marlin has no group size 48"] * 2  # checked as column and as row
    # a tail group (K = 100 is 3 groups of 32 and 4 columns): vLLM refuses it even at TP 1
    assert vllm.layer_problems("x.q_proj", vllm.LayerShape(64, 100, 32), 1)[0].startswith("error")


class Block(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(hidden, hidden, bias=False)
                                        for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(hidden, intermediate, bias=False),
                                  "up_proj": nn.Linear(hidden, intermediate, bias=False),
                                  "down_proj": nn.Linear(intermediate, hidden, bias=False)})


@pytest.mark.parametrize("target", ["gptq_v2", "compressed-tensors"])
def test_exported_files_give_the_same_answer(tmp_path, target):
    """An exported checkpoint's shapes (read from GPTQ's qweight/g_idx, compressed-tensors'
    weight_shape/weight_scale) give the native checkpoint's answer, and the export report and
    `info` say it."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([Block(256, 768)])
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=64, symmetric=False))
    int4kit.save_quantized(model, tmp_path / "native")
    (tmp_path / "native" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 4}))
    native = vllm.tp_support(vllm.native_layer_shapes(CheckpointReader(tmp_path / "native")),
                             {"num_attention_heads": 4})
    # the row-parallel layers' K per rank: o_proj 256 / TP, down_proj 768 / TP (groups of 64):
    # TP 2 128 and 384 (Marlin); TP 4 64 and 192 (whole groups, off Marlin's 128); TP 8 32 and
    # 96 (not whole groups: refused, and 4 heads do not divide by 8)
    assert native[1] == [] and native[2] == []
    assert native[4] == [f"slow: model.layers.0.{name}: 256 x {k} per rank is not a multiple "
                         f"of Marlin's 64 x 128"
                         for name, k in (("mlp.down_proj", 192), ("self_attn.o_proj", 64))]
    assert [p for p in native[8] if p.startswith("error")] == [
        "error: model.layers.0.mlp.down_proj: in_features per rank 96 is not a whole number of "
        "groups of 64",
        "error: model.layers.0.self_attn.o_proj: in_features per rank 32 is not a whole number "
        "of groups of 64",
        "error: num_attention_heads 4 does not divide by 8"]
    report = int4kit.convert_checkpoint(tmp_path / "native", tmp_path / "out", to=target)
    assert "vLLM tensor parallel:" in str(report) and report.vllm_tp == \
        vllm.summary(native).splitlines()
    reader = CheckpointReader(tmp_path / "out")
    shapes = vllm.foreign_layer_shapes(reader, detect_format(str(tmp_path / "out"), reader))
    assert shapes == vllm.native_layer_shapes(CheckpointReader(tmp_path / "native"))
    from int4kit.cli import describe_checkpoint
    info = describe_checkpoint(str(tmp_path / "out"))
    assert "vLLM tensor parallel:" in info and "TP 1: yes (Marlin)" in info
