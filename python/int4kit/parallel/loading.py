"""Loading a native int4kit checkpoint straight into a tensor-parallel model: each rank reads
only its shard of every planned layer from the safetensors files (sharding.py), so no rank holds
the full quantized weights; the same checkpoint loads at any world size.

    with int4kit.skeleton():
        model = AutoModelForCausalLM.from_config(config)
    plan = int4kit.parallel.llama_plan(model, int4kit.parallel.checkpoint_layers(directory))
    int4kit.parallel.load_sharded(model, directory, mesh, plan)
"""
import os
from fnmatch import fnmatch
from typing import Dict, Union

import torch.nn as nn

from ..formats.files import CheckpointReader
from ..formats.native import (build_layer, check_layer_tensors, layer_bits, layer_keys, load_with,
                              read_and_build, read_quantization_config)
from .sharding import local_settings, shard_tensors
from .tensor_parallel import TensorParallelError, _Int4Style, attach, check_agreement


def checkpoint_layers(directory: Union[str, os.PathLike]) -> Dict[str, dict]:
    """The quantized layers of a native checkpoint: name -> settings (shape, group size, ...),
    read from its config without touching the weights."""
    return read_quantization_config(CheckpointReader(directory))["layers"]


def plan_matches(name: str, key: str) -> bool:
    """Whether plan key `key` names module `name`, as parallelize_module resolves it: the same
    number of dot-separated parts, each matching its fnmatch pattern."""
    parts, patterns = name.split("."), key.split(".")
    return len(parts) == len(patterns) and all(fnmatch(p, q) for p, q in zip(parts, patterns))


def resolve_plan(model: nn.Module, plan: Dict[str, _Int4Style]) -> Dict[str, _Int4Style]:
    """Module name -> style for every module a plan key names (the first matching key wins).
    A key naming no module of `model` is an error: a plan written for another model."""
    if not isinstance(plan, dict):
        raise TypeError(f"plan must be a dict of module name pattern -> Int4ColwiseParallel / "
                        f"Int4RowwiseParallel, got {type(plan).__name__}")
    names = [name for name, _ in model.named_modules() if name]
    resolved: Dict[str, _Int4Style] = {}
    for key, style in plan.items():
        if not isinstance(style, _Int4Style):
            raise TypeError(f"plan[{key!r}] must be an Int4ColwiseParallel or "
                            f"Int4RowwiseParallel, got {type(style).__name__}")
        matched = [name for name in names if plan_matches(name, key)]
        if not matched:
            raise TensorParallelError(f"plan key {key!r} names no module of "
                                      f"{type(model).__name__}")
        for name in matched:
            resolved.setdefault(name, style)
    return resolved


def load_sharded(model: nn.Module, directory: Union[str, os.PathLike], device_mesh,
                 plan: Dict[str, _Int4Style], device=None, strict: bool = True,
                 verify: bool = True) -> nn.Module:
    """Loads a native checkpoint into `model` (a skeleton, see int4kit.skeleton) with every layer
    the plan names sharded across `device_mesh` (1-D) as its style says; returns the model.

    Each rank reads only its slice of a planned layer's qweight, scales and zeros (plus the small
    full-length bias, input_scale and input_perm vectors the style needs); every other tensor
    loads whole, as in int4kit.load_quantized. verify=True checks each planned tensor against the
    CRC-32 its file recorded by streaming it in slices (bounded memory, but every rank reads the
    whole tensor once); verify=False reads only the shard, with the shapes, dtypes and finite
    scales still checked. Must be called by every rank with the same plan."""
    if device_mesh.ndim != 1:
        raise TensorParallelError(f"device_mesh must be 1-D, got {device_mesh.ndim}-D")
    styles = resolve_plan(model, plan)
    rank, world, group = device_mesh.get_local_rank(), device_mesh.size(), device_mesh.get_group()
    layers = checkpoint_layers(directory)
    unquantized = sorted(name for name in styles if name not in layers)
    if unquantized:
        raise TensorParallelError(f"the plan shards {unquantized[0]!r}, which the checkpoint "
                                  f"{os.fspath(directory)!r} does not quantize")

    def build(reader: CheckpointReader, name: str, settings: dict, target) -> nn.Module:
        style = styles.get(name)
        if style is None:
            return read_and_build(reader, name, settings, target)
        if layer_bits(settings) != 4:
            raise TensorParallelError(f"the plan shards {name!r}, an int8 layer (bits 8) in the "
                                      f"checkpoint; tensor parallelism shards int4 layers only: "
                                      f"leave it out of the plan (it loads whole on every rank)")
        shard = style.shard(settings, rank, world)
        check_agreement(settings, shard, style, group)
        prefix = f"{name}."
        if verify:
            for key in layer_keys(name, settings):
                reader.verify(key)

        def read(short, dim, start, stop):
            key = prefix + short
            return reader.get(key) if dim is None else reader.get_slice(key, dim, start, stop)

        local = local_settings(settings, shard)
        tensors = shard_tensors(read, settings, shard)
        check_layer_tensors(tensors, local, lambda short: f"{reader.file_of(prefix + short)}: "
                                                          f"tensor {prefix + short!r} (shard)")
        module = build_layer(local, tensors, target)
        bias = reader.get(prefix + "bias") if settings["bias"] else None
        perm = reader.get(prefix + "input_perm") if settings["input_perm"] else None
        if perm is not None:
            check_layer_tensors({"input_perm": perm}, settings,
                                lambda short: f"{reader.file_of(prefix + short)}: tensor "
                                              f"{prefix + short!r}")
        attach(module, style, shard, settings, bias, perm, group)
        return module

    return load_with(model, directory, device, strict, build)

