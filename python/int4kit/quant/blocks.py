"""Block-wise AdaRound (BRECQ): every layer of a transformer block learns its rounding at once,
against the block's full-precision output.

A block is an element of an nn.ModuleList that holds target layers (BERT's `encoder.layer.3`,
Llama's `model.layers.3`). Blocks are done in model order, each with every earlier block already
quantized (through dense stand-ins), so a block learns to absorb the error that reaches it:
  1. one pass over the calibration batches records each block's full-precision output (the
     target; kept on the CPU: batches x tokens x hidden floats per block);
  2. per block: one pass records the block's inputs (positional and keyword arguments, cache
     arguments dropped) as the partly quantized model produces them, and the streaming engine
     collects its layers' Hessians for round-to-nearest's grid (clipping search as configured);
  3. the block's layers are replaced by soft-rounded ones (adaround.SoftRounding) and Adam
     minimises the block output's mean squared error (padding tokens left out), divided by that
     of plain rounding, plus reg times the rounding regulariser, one calibration batch per step,
     drawn with QuantConfig.seed, plus adaround_layer_weight times the mean over the block's
     layers of each one's own damped layer objective (layer-wise AdaRound's, relative to plain
     rounding's): the block loss alone, fitted to the calibration batches' block outputs, over-fits
     them (MiniLM out of domain 0.9755 without the layer term, 0.9782 with weight 1; docs/QAT.md);
     each layer's hard codes are polished on its own damped layer objective (as layer-wise
     AdaRound's), its grid refitted refine_rounds times (0.9793 with 2), and kept unless plain
     rounding reconstructs the block better.
Layers outside every block (a pooler, a classifier head) get layer-wise AdaRound (quant.model).
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import replace_module
from . import calibration
from .adaround import WARMUP, SoftRounding, beta_at, grid, polish_and_refine
from .gptq import damped
from .rtn import codes_objective, group_size_of, to_int4linear

CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")


def find_blocks(model: nn.Module, targets: List[str]) -> Tuple[List[Tuple[str, List[str]]],
                                                                List[str]]:
    """([(block name, its target layers)] in model order, targets in no block)."""
    lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    blocks: Dict[str, List[str]] = {}
    loose = []
    for name in targets:
        parts = name.split(".")
        block = next((".".join(parts[:i + 1]) for i in range(len(parts) - 2, 0, -1)
                      if ".".join(parts[:i]) in lists), None)
        if block is None:
            loose.append(name)
        else:
            blocks.setdefault(block, []).append(name)
    return list(blocks.items()), loose


def _first_tensor(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if torch.is_tensor(hidden):
        return hidden
    raise TypeError(f"a block returned {type(output).__name__}; block reconstruction needs a "
                    f"tensor or a tuple starting with one")


def _block_outputs(model, batches, blocks) -> Dict[str, List[torch.Tensor]]:
    outputs = {name: [] for name, _ in blocks}

    def make_hook(name):
        def hook(module, args, output):
            outputs[name].append(_first_tensor(output).detach().float().cpu())
        return hook
    with calibration.hooks(model.get_submodule(name).register_forward_hook(make_hook(name))
                            for name, _ in blocks), torch.no_grad():
        for i, item in enumerate(batches):
            calibration.call_model(model, item, i)
    return outputs


def _is_cache(name: str, value) -> bool:
    """A key/value cache argument: replaying the block with it would append to it every step."""
    return name in CACHE_ARGUMENTS or type(value).__name__.endswith("Cache")


def _detached(value):
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def _block_inputs(model, batches, block: nn.Module) -> List[Tuple[tuple, dict]]:
    inputs = []

    def hook(module, args, kwargs):
        kwargs = {k: (None if _is_cache(k, v) else _detached(v)) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.append((_detached(args), kwargs))
        raise calibration.StopForward
    with calibration.hooks([block.register_forward_pre_hook(hook, with_kwargs=True)]), \
            torch.no_grad():
        for i, item in enumerate(batches):
            try:
                calibration.call_model(model, item, i)
            except calibration.StopForward:
                pass
    return inputs


class _SoftLinear(nn.Module):
    """A Linear computing with its SoftRounding's current soft weight."""

    def __init__(self, soft: SoftRounding, bias):
        super().__init__()
        self.soft = soft
        self.bias_value = None if bias is None else bias.detach().float()

    def forward(self, x):
        w = self.soft.soft_weight()
        b = self.bias_value
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _masked_mse(out: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
    d = (out.float() - target) ** 2
    if mask is not None and d.dim() >= 3 and tuple(d.shape[:2]) == tuple(mask.shape):
        keep = (mask != 0).float()[..., None]
        return (d * keep).sum() / (keep.sum() * d.shape[-1]).clamp_min(1)
    return d.mean()


def _block_loss(block, inputs, targets, masks, index) -> torch.Tensor:
    args, kwargs = inputs[index]
    return _masked_mse(_first_tensor(block(*args, **kwargs)), targets[index], masks[index])


def quantize_blocks(model: nn.Module, blocks: List[Tuple[str, List[str]]], batches: List, config,
                    report) -> Dict[str, nn.Module]:
    """Block-wise AdaRound of the layers of `blocks` (find_blocks; module docstring), in eval
    mode. Returns name -> Int4Linear; the model holds dense stand-ins of them when it returns
    (the caller swaps the Int4Linear layers in)."""
    was_training = model.training
    model.eval()
    try:
        return _quantize_blocks(model, blocks, batches, config, report)
    finally:
        model.train(was_training)


def _stand_in(model: nn.Module, layers: Dict[str, nn.Module],
              dense: Dict[str, nn.Module]) -> None:
    """Puts dense stand-ins of these Int4Linear layers into the model (quant.model's reason),
    each in the dtype of the dense layer it quantizes."""
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear(dense[name].weight.dtype))


def _quantize_blocks(model, blocks, batches, config, report) -> Dict[str, nn.Module]:
    fp_outputs = _block_outputs(model, batches, blocks)
    masks = [calibration.attention_mask_of(item) for item in batches]
    generator = torch.Generator().manual_seed(config.seed)
    final: Dict[str, nn.Module] = {}
    for block_name, names in calibration.progress(blocks, config.show_progress, desc="blocks"):
        block = model.get_submodule(block_name)
        inputs = _block_inputs(model, batches, block)
        layers = {n: model.get_submodule(n) for n in names}
        stats = calibration.collect(model, batches, layers, absmean=False,
                                    max_tokens=config.calib_max_tokens)
        grids = {n: grid(layers[n].weight.detach().float().cpu(), stats[n].hessian,
                         config.group_size, config.symmetric,
                         config.scale_dtype_for(layers[n].weight),
                         config.clip_search) for n in names}
        soft = {n: SoftRounding(layers[n].weight.detach().float(), grids[n][1], grids[n][2],
                                group_size_of(config.group_size, layers[n].in_features))
                for n in names}
        targets = fp_outputs[block_name]

        def total_loss():
            with torch.no_grad():
                return sum(float(_block_loss(block, inputs, targets, masks, i))
                           for i in range(len(inputs))) / len(inputs)
        nearest = {n: to_int4linear(layers[n], *grids[n], config.group_size, config.symmetric,
                                    scale_dtype=config.scale_dtype_for(layers[n].weight))
                   for n in names}
        _stand_in(model, nearest, layers)
        base = total_loss()
        for n in names:
            replace_module(model, n, _SoftLinear(soft[n], layers[n].bias))
        if base > 0 and config.adaround_iters > 0:
            _optimise(block, inputs, targets, masks, soft, base, config, generator, block_name,
                      _layer_objectives(layers, grids, stats, config))
        learned = {n: to_int4linear(layers[n], *_polished(soft[n], layers[n], grids[n],
                                                          stats[n].hessian, config),
                                    config.group_size, config.symmetric,
                                    scale_dtype=config.scale_dtype_for(layers[n].weight))
                    for n in names}
        _stand_in(model, learned, layers)
        if base > 0 and total_loss() > base:
            report.notes.append((block_name, "plain rounding reconstructed the block better than "
                                             "the learned rounding; kept plain rounding"))
            learned = nearest
            _stand_in(model, nearest, layers)
        final.update(learned)
    return final


def _polished(soft, layer, grid_params, H, config):
    """The block's learned codes of one layer, polished (and refined: refine_rounds) on its damped
    layer objective, with the layer's inputs as the partly quantized model gives them
    (adaround.polish_and_refine). Returns (codes, s, z)."""
    _, s, z = grid_params
    return polish_and_refine(layer.weight.detach().float().cpu(), damped(H, config.damp),
                             soft.codes(), s, z, group_size_of(config.group_size, layer.in_features),
                             config.symmetric, config.scale_dtype_for(layer.weight),
                             config.adaround_polish_sweeps, config.refine_rounds)


def _layer_objectives(layers, grids, stats, config) -> Dict[str, Tuple]:
    """name -> (W, damped H, plain rounding's damped layer objective) for the block's layers
    whose plain rounding is not exact; empty when adaround_layer_weight is 0."""
    if not config.adaround_layer_weight:
        return {}
    terms = {}
    for n, layer in layers.items():
        W = layer.weight.detach().float()
        Hd = damped(stats[n].hessian, config.damp).float()
        codes, s, z = grids[n]
        nearest = codes_objective(W, codes, s, z, group_size_of(config.group_size, W.shape[1]), Hd)
        if nearest > 0:
            terms[n] = (W, Hd, nearest)
    return terms


def _optimise(block, inputs, targets, masks, soft, base, config, generator, block_name,
              layer_objectives):
    params = [s.v for s in soft.values()]
    optimizer = torch.optim.Adam(params, lr=config.adaround_lr)
    total = sum(p.numel() for p in params)
    iters = config.adaround_iters
    with torch.enable_grad():
        for step in range(iters):
            index = int(torch.randint(len(inputs), (1,), generator=generator))
            loss = _block_loss(block, inputs, targets, masks, index) / base
            if layer_objectives:  # each layer's own damped objective, relative to plain rounding's
                layer_loss = sum(soft[n].objective(W, Hd) / nearest
                                 for n, (W, Hd, nearest) in layer_objectives.items())
                loss = loss + config.adaround_layer_weight * layer_loss / len(layer_objectives)
            beta = beta_at(step, iters, WARMUP)
            if beta is not None:
                loss = loss + config.adaround_reg * sum(
                    s.regulariser(beta) * (s.v.numel() / total) for s in soft.values())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise calibration.CalibrationError(
                    f"AdaRound: block {block_name!r}'s reconstruction loss is {value} at step "
                    f"{step} (NaN or inf activations)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
