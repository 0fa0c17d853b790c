"""The tensor-parallel sizes vLLM can serve a checkpoint at (docs/SCALE.md).

vLLM splits column-parallel layers (q/k/v, gate/up, ...) along the output features N and
row-parallel ones (o, down, ...) along the input features K, without padding, and its int4
kernels need each rank's part aligned:
  * every split divides evenly (N or K by the TP size), and a grouped layer's K per rank holds
    whole groups (also at TP 1: vLLM reads no tail group);
  * the Marlin kernels (vLLM's default for 4-bit GPTQ and compressed-tensors on Ampere and
    newer) also need N per rank a multiple of 64, K per rank a multiple of 128 and a group size
    of -1, 32, 64 or 128; a layer that misses only these runs on a slower kernel, where vLLM
    has one for the format;
  * attention heads: num_attention_heads divisible by the TP size, and key/value heads either
    divisible by it or dividing it (vLLM replicates them then).
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .files import CONFIG_FILE, CheckpointReader, read_json
from .native import read_quantization_config

MARLIN_N, MARLIN_K = 64, 128
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
TP_SIZES = (1, 2, 4, 8)
# how vLLM splits a layer, by the end of its name (Llama, Mistral, Qwen, Mixtral experts, Falcon,
# GPT-2, GPT-NeoX, Phi, BERT); the longest matching ending decides
COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
          "query_key_value", "c_attn", "c_fc", "fc1", "w1", "w3", "dense_h_to_4h", "Wqkv",
          "query", "key", "value", "intermediate.dense")
ROW = ("o_proj", "down_proj", "dense", "c_proj", "fc2", "w2", "dense_4h_to_h", "out_proj",
       "output.dense")
_ENDINGS = sorted([(e, "column") for e in COLUMN] + [(e, "row") for e in ROW],
                  key=lambda item: -len(item[0]))


@dataclass(frozen=True)
class LayerShape:
    out_features: int  # N
    in_features: int  # K
    group_size: int  # -1: per channel


def role(name: str) -> Optional[str]:
    """"column", "row" or None (unknown: checked both ways) for a layer name."""
    return next((split for ending, split in _ENDINGS
                 if name == ending or name.endswith("." + ending)), None)


def layer_problems(name: str, layer: LayerShape, tp: int) -> List[str]:
    """What keeps vLLM from splitting `layer` over `tp` ranks: "error: ..." (it refuses to load)
    or "slow: ..." (no Marlin kernel for that layer)."""
    N, K, G = layer.out_features, layer.in_features, layer.group_size
    grouped = G != -1 and G < K
    problems = []
    for split in (("column", "row") if role(name) is None else (role(name),)):
        if split == "column":
            n_part, k_part = N // tp, K
            if N % tp:
                problems.append(f"error: {name}: out_features {N} does not divide by {tp}")
                continue
        else:
            n_part, k_part = N, K // tp
            if K % tp:
                problems.append(f"error: {name}: in_features {K} does not divide by {tp}")
                continue
        if grouped and k_part % G:  # vLLM asks it of every layer, at TP 1 too (no tail group)
            problems.append(f"error: {name}: in_features per rank {k_part} is not a whole "
                            f"number of groups of {G}")
            continue
        if G not in MARLIN_GROUP_SIZES:
            problems.append(f"slow: {name}: Marlin has no group size {G}")
        elif n_part % MARLIN_N or k_part % MARLIN_K:
            problems.append(f"slow: {name}: {n_part} x {k_part} per rank is not a multiple of "
                            f"Marlin's {MARLIN_N} x {MARLIN_K}")
    return problems


def head_problems(hf_config: dict, tp: int) -> List[str]:
    heads = hf_config.get("num_attention_heads")
    kv = hf_config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv, int):
        return []
    problems = []
    if heads % tp:
        problems.append(f"error: num_attention_heads {heads} does not divide by {tp}")
    if kv % tp and tp % kv:
        problems.append(f"error: num_key_value_heads {kv} neither divides by {tp} nor divides it")
    return problems


def tp_support(layers: Dict[str, LayerShape], hf_config: Optional[dict] = None,
               sizes: Sequence[int] = TP_SIZES) -> Dict[int, List[str]]:
    """TP size -> the problems vLLM would have at it (empty: loads, every layer on Marlin)."""
    return {tp: [p for name in sorted(layers) for p in layer_problems(name, layers[name], tp)]
            + head_problems(hf_config or {}, tp) for tp in sizes}


def hf_config_of(directory: str) -> dict:
    """The folder's config.json (heads per layer), or {} without one."""
    path = os.path.join(directory, CONFIG_FILE)
    config = read_json(path) if os.path.isfile(path) else {}
    return config if isinstance(config, dict) else {}


def native_layer_shapes(reader: CheckpointReader) -> Dict[str, LayerShape]:
    """The quantized layers of a native int4kit checkpoint, from its config."""
    return {name: LayerShape(s["out_features"], s["in_features"], s["group_size"])
            for name, s in read_quantization_config(reader)["layers"].items()}


def foreign_layer_shapes(reader: CheckpointReader, fmt) -> Dict[str, LayerShape]:
    """The quantized layers of a GPTQ or compressed-tensors checkpoint (convert.SourceFormat),
    from tensor shapes (and compressed-tensors' small weight_shape tensors)."""
    shapes = {}
    if fmt.name in ("gptq", "gptq_v2"):
        for key in reader.keys():
            if key.endswith(".qweight") and key[:-len("qweight")] + "g_idx" in reader:
                prefix = key[:-len(".qweight")]
                K = reader.shape_dtype(prefix + ".g_idx")[0][0]
                N = reader.shape_dtype(key)[0][1]
                shapes[prefix] = LayerShape(N, K, fmt.group_size)
        return shapes
    sizes = {w.get("group_size") for scheme in fmt.config.get("config_groups", {}).values()
             for w in [scheme.get("weights") or {}] if w.get("strategy") == "group"}
    for key in reader.keys():
        if key.endswith(".weight_packed") and key[:-len("packed")] + "shape" in reader:
            prefix = key[:-len(".weight_packed")]
            N, K = (int(v) for v in reader.get(prefix + ".weight_shape").tolist())
            groups = reader.shape_dtype(prefix + ".weight_scale")[0][1]
            G = -1 if groups == 1 else next((g for g in sorted(sizes) if -(-K // g) == groups), -1)
            shapes[prefix] = LayerShape(N, K, G)
    return shapes


def summary(support: Dict[int, List[str]]) -> str:
    """One line per TP size: "ok (Marlin)", "ok, N layers on a slower kernel", or the first
    error and how many there are."""
    lines = []
    for tp, problems in support.items():
        errors = [p for p in problems if p.startswith("error")]
        slow = [p for p in problems if p.startswith("slow")]
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            lines.append(f"TP {tp}: no - {errors[0][len('error: '):]}{more}")
        elif slow:
            lines.append(f"TP {tp}: yes, {len(slow)} layer(s) without Marlin - "
                         f"{slow[0][len('slow: '):]}")
        else:
            lines.append(f"TP {tp}: yes (Marlin)")
    return "\n".join(lines)
