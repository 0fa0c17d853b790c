"""compressed-tensors "pack-quantized" checkpoints (llm-compressor's int4 format, which vLLM
serves), one layer at a time, to and from int4kit's canonical tensors.

A layer with in_features K, out_features N and g groups holds:
  weight_packed      int32 [N, ceil(K/8)]  codes packed along K, least significant nibble first
  weight_scale       fp32/bf16/fp16 [N, g] (channel strategy: g = 1)
  weight_zero_point  int32 [ceil(N/8), g]  asymmetric only: zero points packed along N
  weight_shape       int [2]               (N, K)
  weight_g_idx       int [K]               older files with actorder "group": each column's
                                           group (read, never written: 0.20 removed it)
Values are signed int4 v in -8..7 stored as the nibble v + 8, and the zero point zp likewise, so
the nibbles are int4kit's codes and zero points as they are: w = (v - zp) * s = (q - z) * s.
Symmetric schemes store no zero point (zp = 0, z = 8).
"""
import re
from typing import Dict, Optional

import torch

from .. import ops
from .files import CheckpointError
from .native import canonical_settings
from .packing import NotRepresentable, group_permutation, pack_int32, unpack_int32

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
            "bias")
FORMAT = "pack-quantized"
STRATEGIES = ("group", "channel")


def _weights_args(scheme: dict, where: str) -> dict:
    weights = scheme.get("weights")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: config group has no 'weights' arguments")
    if weights.get("num_bits") != 4 or weights.get("type", "int") != "int":
        raise CheckpointError(f"{where}: weights are {weights.get('type', 'int')}"
                              f"{weights.get('num_bits')}; int4kit reads int4 only")
    if weights.get("strategy") not in STRATEGIES:
        raise CheckpointError(f"{where}: weight strategy {weights.get('strategy')!r} is not "
                              f"supported (supported: {', '.join(STRATEGIES)})")
    if weights.get("actorder") not in (None, "group", "static", "weight"):
        raise CheckpointError(f"{where}: actorder {weights.get('actorder')!r} is not supported")
    if scheme.get("input_activations") is not None:
        raise CheckpointError(f"{where}: activation quantization ({scheme['input_activations']}) "
                              f"is not an int4kit weight format")
    return weights


def check_config(config: dict, source: str) -> None:
    """A compressed-tensors quantization_config int4kit can import: pack-quantized int4 groups."""
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{source}: compressed-tensors config has no config_groups")
    for name, scheme in groups.items():
        fmt = scheme.get("format") or config.get("format")
        if fmt != FORMAT:
            raise CheckpointError(f"{source}: config group {name!r} has format {fmt!r}; int4kit "
                                  f"reads {FORMAT!r}")
        _weights_args(scheme, f"{source}: config group {name!r}")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"{source}: quantization_status is {status!r}; only compressed "
                              f"checkpoints hold packed weights")


def _targets_match(targets, name: str) -> int:
    """How well a config group's targets name a layer: 2 by name, 1 by pattern or class, 0 not."""
    best = 0
    for target in targets or ():
        if target == name:
            return 2
        if target.startswith("re:") and re.fullmatch(target[3:], name):
            best = max(best, 1)
        elif target in ("Linear", "torch.nn.Linear", "nn.Linear"):
            best = max(best, 1)
    return best


def scheme_of(config: dict, layer: str, where: str) -> dict:
    """The weights arguments of the config group that targets `layer`."""
    ranked = sorted(((_targets_match(s.get("targets"), layer), name)
                     for name, s in config["config_groups"].items()), reverse=True)
    if not ranked or ranked[0][0] == 0:
        raise CheckpointError(f"{where}: no config group targets this layer")
    return _weights_args(config["config_groups"][ranked[0][1]], where)


def ct_to_canonical(tensors: Dict[str, torch.Tensor], weights: dict, where: str):
    """One pack-quantized layer -> (canonical tensors, layer settings)."""
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"{where}.weight_packed: expected a 2-D int32 tensor, got "
                         f"{list(packed.shape)} {packed.dtype}")
    shape = tensors.get("weight_shape")
    if shape is None or shape.numel() != 2:
        raise ValueError(f"{where}.weight_shape: expected 2 values (out, in features)")
    N, K = (int(v) for v in shape.tolist())
    if N <= 0 or K <= 0:
        raise ValueError(f"{where}.weight_shape: expected positive sizes, got [{N}, {K}]")
    if N != packed.shape[0] or -(-K // 8) != packed.shape[1]:
        raise ValueError(f"{where}.weight_packed: shape {list(packed.shape)} does not hold a "
                         f"weight_shape of [{N}, {K}]")
    if weights["strategy"] == "channel":
        group_size, G = -1, K
    else:
        group_size = G = int(weights.get("group_size") or 0)
        if G <= 0 or G % 2 or G > K:
            raise ValueError(f"{where}: group_size {G} cannot be stored by int4kit (an even size "
                             f"up to in_features = {K})")
    groups = -(-K // G)
    if tuple(scale.shape) != (N, groups) or not scale.dtype.is_floating_point:
        raise ValueError(f"{where}.weight_scale: expected a float tensor of shape [{N}, {groups}], "
                         f"got {list(scale.shape)} {scale.dtype}")
    codes = unpack_int32(packed, 1, K)
    out = {"scales": scale.contiguous()}
    symmetric = bool(weights.get("symmetric", True))
    if not symmetric:
        zp = tensors.get("weight_zero_point")
        if zp is None or zp.dtype != torch.int32 or tuple(zp.shape) != (-(-N // 8), groups):
            raise ValueError(f"{where}.weight_zero_point: expected int32 [{-(-N // 8)}, {groups}] "
                             f"(zero points packed along out_features), got "
                             f"{None if zp is None else (list(zp.shape), zp.dtype)}")
        out["zeros"] = unpack_int32(zp, 0, N).to(scale.dtype).contiguous()
    perm = None
    if "weight_g_idx" in tensors:
        perm = group_permutation(tensors["weight_g_idx"], G, f"{where}.weight_g_idx")
    if perm is not None:
        codes = codes[:, perm]
        out["input_perm"] = perm
    out["qweight"] = ops.pack(codes.contiguous())
    if tensors.get("bias") is not None:
        out["bias"] = tensors["bias"]
    return out, canonical_settings(out, K, group_size, "compressed-tensors")


def canonical_to_ct(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, K: int, input_perm: Optional[torch.Tensor], where: str):
    """Canonical tensors -> one pack-quantized layer, exactly; ValueError (naming the layer) for
    zero points that are not integers in 0..15."""
    N = qweight.shape[0]
    if input_perm is not None:
        raise NotRepresentable(f"{where}: has act-order groups (input_perm), which compressed-"
                               f"tensors no longer stores (actorder='group' with a g_idx was "
                               f"removed in 0.20)")
    codes = ops.unpack(qweight, K)
    out = {"weight_scale": scales.contiguous(), "weight_shape": torch.tensor([N, K])}
    if zeros is not None:
        z = zeros.float()
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 15:
            bad = z[(z != z.round()) | (z < 0) | (z > 15)][0].item()
            raise NotRepresentable(f"{where}: compressed-tensors stores integer zero points in -8..7 "
                             f"(int4kit's 0..15); this layer has {bad:g}")
        out["weight_zero_point"] = pack_int32(z.to(torch.int64), 0)
    out["weight_packed"] = pack_int32(codes, 1)
    return out


def make_config(layers: Dict[str, dict]) -> dict:
    """A quantization_config naming every layer in a config group of its settings."""
    groups: Dict[tuple, list] = {}
    for name, s in layers.items():
        groups.setdefault((s["group_size"], s["symmetric"]), []).append(name)
    config_groups = {}
    for i, ((group_size, symmetric), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                        "strategy": "channel" if group_size == -1 else "group",
                        "group_size": None if group_size == -1 else group_size,
                        "dynamic": False, "actorder": None,
                        "observer": "minmax", "block_structure": None},
            "input_activations": None, "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT,
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}
