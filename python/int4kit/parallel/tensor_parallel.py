"""Tensor-parallel Int4Linear for torch.distributed (docs/SCALE.md).

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh("cpu", (world,))          # or "cuda" (NCCL)
    parallelize_module(model, mesh, int4kit.parallel.llama_plan(model))

PyTorch's ColwiseParallel / RowwiseParallel accept nn.Linear only (they turn its weight into a
DTensor); these styles instead cut an Int4Linear's canonical tensors into a smaller local
Int4Linear in place (sharding.py: group boundaries, padding) and hook its forward:

  colwise: input replicated; output the local slice of N (Shard(-1), the default) or gathered
    and trimmed to N (Replicate()).
  rowwise: input the local slice of K (Shard(-1), the default: a colwise producer's output) or
    replicated (Replicate(): the hook gathers by input_perm, slices and pads); output the sum of
    every rank's partial product, reduced in float32 (bf16/fp16 partials are widened first) with
    the bias added once, by rank 0, before the reduction.

W4A8 (act_quant="int8") quantizes activations per token over the K a layer sees: colwise layers
see all of K (the same scale as one process), rowwise layers only their shard (a scale per
shard: a different rounding, within the same error bound; docs/SCALE.md).
"""
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard as ShardPlacement
from torch.distributed.tensor.parallel.style import ParallelStyle

from ..formats.native import layer_settings
from ..nn import INPUT_STATS, Int4Linear
from .sharding import Shard, local_settings, rowwise_unit, shard_of, shard_tensors, tensor_reader


class TensorParallelError(ValueError):
    """A tensor-parallel plan, mesh or input that cannot work; raised on every rank."""


def _placement(value, argument: str) -> str:
    if isinstance(value, Replicate):
        return "replicate"
    if isinstance(value, ShardPlacement) and value.dim == -1:
        return "shard"
    raise TensorParallelError(f"{argument} must be Shard(-1) or Replicate(), got {value!r}")


def _check_unit(unit) -> int:
    if not isinstance(unit, int) or isinstance(unit, bool) or unit < 1:
        raise TensorParallelError(f"unit must be a positive int, got {unit!r}")
    return unit


class _Int4Style(ParallelStyle):
    style = ""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, Int4Linear):
            raise TensorParallelError(
                f"Int4{self.style.capitalize()}Parallel shards an Int4Linear, got "
                f"{type(module).__name__}; use torch's {self.style.capitalize()}Parallel for "
                f"nn.Linear (the two shard differently and cannot feed each other)")
        if getattr(module, "tp_shard", None) is not None:
            raise TensorParallelError("this Int4Linear is already sharded")
        if device_mesh.ndim != 1:
            raise TensorParallelError(f"device_mesh must be 1-D (slice the tensor-parallel "
                                      f"dimension out of it), got {device_mesh.ndim}-D")
        settings = layer_settings(module)
        qweight, scales, zeros = module.canonical()
        tensors = {"qweight": qweight.cpu(), "scales": scales.cpu()}  # sliced on the CPU
        for name, tensor in (("zeros", zeros), ("bias", module.bias),
                             ("input_scale", module.input_scale),
                             ("input_perm", module.input_perm)):
            if tensor is not None:
                tensors[name] = tensor.detach().cpu()
        shard = self.shard(settings, device_mesh.get_local_rank(), device_mesh.size())
        check_agreement(settings, shard, self, device_mesh.get_group())
        local = shard_tensors(tensor_reader(tensors), settings, shard)
        become_local(module, local_settings(settings, shard), local, module._device())
        attach(module, self, shard, settings, tensors.get("bias"), tensors.get("input_perm"),
               device_mesh.get_group())
        return module


class Int4ColwiseParallel(_Int4Style):
    """Shards an Int4Linear's output features across the mesh (see the module docstring).

    output_layouts: Shard(-1) keeps each rank's slice (padded to the shard size: the input of a
      row-wise layer), Replicate() gathers the full output on every rank.
    unit: shard sizes are multiples of it (whole heads for attention, the consumer's row-wise
      unit), so that a row-wise consumer's input shards line up with this layer's output."""
    style = "colwise"

    def __init__(self, *, output_layouts=None, unit: int = 1):
        self.output = _placement(output_layouts or ShardPlacement(-1), "output_layouts")
        self.unit = _check_unit(unit)

    def shard(self, settings: dict, rank: int, world: int) -> Shard:
        return shard_of("colwise", settings["out_features"], self.unit, rank, world)

    def __repr__(self):
        return f"Int4ColwiseParallel(output={self.output}, unit={self.unit})"


class Int4RowwiseParallel(_Int4Style):
    """Shards an Int4Linear's input features across the mesh on group boundaries (see the module
    docstring).

    input_layouts: Shard(-1) (each rank gets its slice, padded to the shard size, e.g. from an
      Int4ColwiseParallel producer with the same unit) or Replicate() (the full input; needed
      when the layer has input_perm).
    unit: shard sizes are multiples of it and of the group size."""
    style = "rowwise"

    def __init__(self, *, input_layouts=None, unit: int = 1):
        self.input = _placement(input_layouts or ShardPlacement(-1), "input_layouts")
        self.unit = _check_unit(unit)

    def shard(self, settings: dict, rank: int, world: int) -> Shard:
        if settings["input_perm"] and self.input == "shard":
            raise TensorParallelError(
                "a row-wise layer with input_perm (a GPTQ act-order checkpoint with a shuffled "
                "g_idx) reads input columns from every shard: use "
                "Int4RowwiseParallel(input_layouts=Replicate())")
        unit = rowwise_unit(settings["group_size"], self.unit)
        return shard_of("rowwise", settings["in_features"], unit, rank, world)

    def __repr__(self):
        return f"Int4RowwiseParallel(input={self.input}, unit={self.unit})"


def check_agreement(settings: dict, shard: Shard, style, group) -> None:
    """Every rank must shard the same layer the same way: a plan that differs between ranks
    would otherwise pair unrelated partial sums. Raises on every rank when they differ (a rank
    that skips the layer entirely makes the others time out in this collective)."""
    mine = (repr(style), settings["out_features"], settings["in_features"],
            settings["group_size"], shard.world, shard.size)
    every = [None] * shard.world
    dist.all_gather_object(every, mine, group=group)
    if any(other != mine for other in every):
        raise TensorParallelError(f"the ranks disagree on how to shard a layer: "
                                  f"{[tuple(map(str, e)) for e in every]} "
                                  f"(style, N, K, group size, world size, shard size by rank)")


def become_local(module: Int4Linear, settings: dict, tensors: Dict[str, torch.Tensor],
                 device) -> None:
    """Turns `module` in place into the local layer of a shard (parallelize_module keeps the
    module object it passed to the style)."""
    module.in_features, module.out_features = settings["in_features"], settings["out_features"]
    module.group_size = settings["group_size"]
    module._store(tensors["qweight"], tensors["scales"], tensors.get("zeros"), device)
    bias = tensors.get("bias")
    module.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)
    for name in ("input_scale", "input_perm", INPUT_STATS):
        value = tensors.get(name)
        setattr(module, name, None if value is None else value.to(device))


class TPState:
    """What a sharded Int4Linear's hooks need: its shard, the full sizes, the process group and
    (row-wise) the bias it adds once and the input columns it gathers when its input is
    replicated."""

    def __init__(self, style, shard: Shard, settings: dict, bias: Optional[torch.Tensor],
                 input_perm: Optional[torch.Tensor], group, device):
        self.style, self.shard, self.group = style, shard, group
        self.full_in, self.full_out = settings["in_features"], settings["out_features"]
        self.bias = None
        self.gather_index = None
        if shard.style == "rowwise":
            if bias is not None and shard.rank == 0:
                self.bias = bias.to(device=device, dtype=torch.float32)
            if input_perm is not None:
                self.gather_index = input_perm[shard.start:shard.stop].to(device)
            elif style.input == "replicate":
                self.gather_index = torch.arange(shard.start, shard.stop, device=device)


def attach(module: Int4Linear, style, shard: Shard, settings: dict, bias: Optional[torch.Tensor],
           input_perm: Optional[torch.Tensor], group) -> None:
    """Gives a local layer its communication: state in `module.tp_shard`, forward hooks. bias and
    input_perm are the full layer's (a row-wise shard adds the bias on rank 0 only and gathers
    its input columns by the permutation)."""
    module.tp_shard = TPState(style, shard, settings, bias, input_perm, group, module._device())
    if shard.style == "colwise":
        module.register_forward_pre_hook(_colwise_input)
        module.register_forward_hook(_colwise_output)
    else:
        module.register_forward_pre_hook(_rowwise_input)
        module.register_forward_hook(_rowwise_output)


def _check_width(x: torch.Tensor, expected: int, what: str) -> None:
    if x.shape[-1] != expected:
        raise TensorParallelError(f"input has {x.shape[-1]} features in its last dimension; this "
                                  f"rank's shard expects {expected} ({what}: was the producer "
                                  f"sharded for another world size or unit?)")


def _colwise_input(module, args):
    _check_width(args[0], module.tp_shard.full_in, "the full input of a column-wise layer")


def _colwise_output(module, args, output):
    state = module.tp_shard
    if state.style.output == "shard":
        return output
    pieces = [torch.empty_like(output) for _ in range(state.shard.world)]
    dist.all_gather(pieces, output.contiguous(), group=state.group)
    return torch.cat(pieces, -1)[..., :state.full_out]


def _rowwise_input(module, args):
    state = module.tp_shard
    x = args[0]
    if state.gather_index is None:
        _check_width(x, state.shard.size, "its slice of a row-wise layer's input")
        return None
    _check_width(x, state.full_in, "the full input of a row-wise layer with Replicate() input")
    x = x.index_select(-1, state.gather_index)
    if state.shard.padding:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], state.shard.padding)], -1)
    return (x,) + tuple(args[1:])


def _rowwise_output(module, args, output):
    state = module.tp_shard
    total = output.float()
    if state.bias is not None:
        total = total + state.bias
    dist.all_reduce(total, group=state.group)
    return total.to(output.dtype)


def llama_plan(model: nn.Module, checkpoint_layers: Optional[Dict[str, dict]] = None
               ) -> Dict[str, ParallelStyle]:
    """The Megatron split of a Llama-style decoder: q/k/v/gate/up column-wise, o/down row-wise,
    everything else (embeddings, norms, lm_head) replicated. One entry per layer, its units set
    so that each producer's output shard is its consumer's input shard: whole key/value heads
    (with their query heads) for attention, whole groups of the consumer.

    model: a transformers Llama-style model (config with num_attention_heads, num_key_value_heads,
      head_dim or hidden_size), quantized, or a skeleton when `checkpoint_layers` (the native
      config's "layers", e.g. from int4kit.parallel.checkpoint_layers(dir)) gives the group sizes.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise TensorParallelError("llama_plan needs a transformers model whose config has "
                                  "num_attention_heads (a Llama-style decoder)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise TensorParallelError(f"num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
    n_rep = heads // kv_heads
    names = [name for name, m in model.named_modules() if name.endswith(".self_attn")]
    if not names:
        raise TensorParallelError(f"{type(model).__name__} has no '*.self_attn' module: not a "
                                  f"Llama-style decoder")

    def group_size(name: str) -> int:
        if checkpoint_layers is not None:
            if name not in checkpoint_layers:
                raise TensorParallelError(f"the checkpoint does not quantize {name!r}, which the "
                                          f"Llama plan shards")
            return checkpoint_layers[name]["group_size"]
        module = model.get_submodule(name)
        if not isinstance(module, Int4Linear):
            raise TensorParallelError(f"{name} is a {type(module).__name__}, not an Int4Linear: "
                                      f"quantize it, or pass checkpoint_layers")
        return module.group_size

    plan: Dict[str, ParallelStyle] = {}
    for attn in names:
        block = attn.rpartition(".")[0]
        o_unit = rowwise_unit(group_size(f"{attn}.o_proj"), n_rep * head_dim)
        for proj in ("q_proj", "k_proj", "v_proj"):
            unit = o_unit if proj == "q_proj" else o_unit // n_rep
            plan[f"{attn}.{proj}"] = Int4ColwiseParallel(unit=unit)
        plan[f"{attn}.o_proj"] = Int4RowwiseParallel(unit=o_unit)
        down_unit = rowwise_unit(group_size(f"{block}.mlp.down_proj"))
        for proj in ("gate_proj", "up_proj"):
            plan[f"{block}.mlp.{proj}"] = Int4ColwiseParallel(unit=down_unit)
        plan[f"{block}.mlp.down_proj"] = Int4RowwiseParallel(unit=down_unit)
    return plan
