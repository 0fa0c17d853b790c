"""Mixed precision chosen by sensitivity under a size budget (docs/MIXED_PRECISION.md).

    table = int4kit.measure_sensitivity(model, candidates, calib_data)   # damage per layer, format
    plan = int4kit.plan_mixed_precision(table, bits_per_weight=4.5)       # exact knapsack
    report = int4kit.quantize_model(model, base, calib_data, layer_configs=plan)

measure_sensitivity quantizes one layer at a time with each candidate format, the rest of the
model in full precision, and records what it costs: the stored bytes of the layer (codes,
scales, zero points, bias) and the damage, by default the relative squared error of the model's
output on the calibration data (padding left out), or `eval_fn(model)` minus its value on the
unquantized model. The plan takes one candidate per layer so that the summed damage is least
within the budget (the damages are assumed to add up, as in HAWQ; quantize_model's report then
shows the measured error next to the predicted one). Layers that read the same input (query, key
and value; gate and up) can be tied to one candidate: serving stacks fuse them.
"""
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..formats.native import dtype_name
from ..nn import replace_module
from . import calibration
from .blocks import find_blocks
from .config import QuantConfig
from .model import (QuantReport, _calibrated, _data_free, _refuse_fake_quant, dense_stand_in,
                    select_layers, stored_bytes)
from .rtn import wider_than

OUTPUT_ERROR = "output relative squared error"
FORMAT_VERSION = 1


def candidate_label(config: Optional[QuantConfig]) -> str:
    """A short name for a candidate format: "gptq g128 asym", "rtn channel sym bfloat16
    scales", "int8 rtn channel sym", "dense"."""
    if config is None:
        return "dense"
    group = {-1: "channel", "tensor": "tensor"}.get(config.group_size, f"g{config.group_size}")
    parts = ([] if config.bits == 4 else [f"int{config.bits}"]) + [
        config.method, group, "sym" if config.symmetric else "asym"]
    if config.scale_dtype is not None:
        parts.append(f"{dtype_name(config.scale_dtype)} scales")
    if config.act_quant is not None:
        parts.append(f"act {config.act_quant}")
    return " ".join(parts)


# ---- the table -----------------------------------------------------------------------------------

@dataclass
class SensitivityTable:
    """What measure_sensitivity found. candidates: the formats (None: dense), in column order;
    layers: name -> {"weights": N x K, "in_features": K, "bytes": [stored bytes per candidate],
    "damage": [damage per candidate]} (None where a candidate does not apply to the layer: a
    group wider than K); groups: layers reading the same input; metric: what damage measures."""
    candidates: List[Optional[QuantConfig]]
    layers: Dict[str, dict]
    groups: List[List[str]] = field(default_factory=list)
    metric: str = OUTPUT_ERROR
    seconds: float = 0.0

    @property
    def labels(self) -> List[str]:
        labels = [candidate_label(c) for c in self.candidates]
        return [f"{label} #{i}" if labels.count(label) > 1 else label
                for i, label in enumerate(labels)]

    @property
    def weights(self) -> int:
        return sum(row["weights"] for row in self.layers.values())

    def __str__(self) -> str:
        labels = self.labels
        lines = [f"sensitivity of {len(self.layers)} layers ({self.metric}; "
                 f"{self.seconds:.1f} s)",
                 "| layer | " + " | ".join(labels) + " |",
                 "|---|" + "---|" * len(labels)]
        for name, row in self.layers.items():
            cells = ["-" if d is None else f"{d:.2e}" for d in row["damage"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        bits = []
        for i in range(len(labels)):
            sized = [(row["bytes"][i], row["weights"]) for row in self.layers.values()
                     if row["bytes"][i] is not None]
            bits.append(f"{8 * sum(b for b, _ in sized) / sum(w for _, w in sized):.2f}"
                        if sized else "-")
        lines.append("| bits per weight | " + " | ".join(bits) + " |")
        if self.groups:
            lines.append("tied (same input): " + "; ".join(", ".join(g) for g in self.groups))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "metric": self.metric, "seconds": self.seconds,
                "candidates": [None if c is None else c.to_dict() for c in self.candidates],
                "layers": self.layers, "groups": self.groups}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityTable":
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a sensitivity table of format version {FORMAT_VERSION}")
        candidates = [None if c is None else QuantConfig.from_dict(c) for c in data["candidates"]]
        table = cls(candidates, data["layers"], [list(g) for g in data.get("groups", [])],
                    data.get("metric", OUTPUT_ERROR), float(data.get("seconds", 0.0)))
        _check_table(table)
        return table

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the table as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SensitivityTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _check_table(table: SensitivityTable) -> None:
    """Every row has one bytes and one damage entry per candidate, finite where present."""
    width = len(table.candidates)
    for name, row in table.layers.items():
        for key in ("bytes", "damage"):
            if len(row.get(key, ())) != width:
                raise ValueError(f"sensitivity table: layer {name!r} has {len(row.get(key, ()))} "
                                 f"{key} entries for {width} candidates")
        for size, damage in zip(row["bytes"], row["damage"]):
            if (size is None) != (damage is None):
                raise ValueError(f"sensitivity table: layer {name!r} has a size without a damage "
                                 f"or a damage without a size")
            if damage is not None and not math.isfinite(damage):
                raise ValueError(f"sensitivity table: layer {name!r} has a damage of {damage}")


# ---- measuring -----------------------------------------------------------------------------------

def _output_tensor(output) -> torch.Tensor:
    """The model output the default metric compares: the output itself, or the first tensor of
    a tuple or a Hugging Face output (last_hidden_state, logits)."""
    if torch.is_tensor(output):
        return output
    values = output.values() if isinstance(output, Mapping) else output
    if isinstance(values, Iterable):
        for value in values:
            if torch.is_tensor(value):
                return value
    raise TypeError(f"the model returned {type(output).__name__} without a tensor; pass eval_fn "
                    f"to measure the damage another way")


class BlockReplay:
    """Skips recomputing blocks whose outputs cannot change while one layer is being measured.

    A block of an nn.ModuleList (find_blocks: BERT's `encoder.layer.3`) that runs before the block
    holding the changed layer sees the unquantized model's inputs, so it returns what it returned
    then. While `skipping_to(block)` is active, blocks 0 .. b-1 of b's list are stand-ins that
    return block b-1's recorded output for the batch being run (a copy: nothing downstream can
    change the recording), and only block b onwards is computed: the outputs are bit-identical
    to a full forward, at about half the cost averaged over the blocks. That holds when every
    forward calls the list's blocks once each, in index order, which the reference pass checks
    (`checking_order`) for every batch; a list called any other way runs in full. Memory: one
    block's outputs on every batch (two while the next is recorded)."""

    def __init__(self, model: nn.Module, batches: List, blocks: Iterable[str]):
        self.model, self.batches = model, batches
        self.lists: Dict[str, nn.ModuleList] = {}
        for name in blocks:
            parent = name.rpartition(".")[0]
            self.lists[parent] = model.get_submodule(parent)
        self.in_order: Dict[str, bool] = {}
        self.batch = 0  # the batch the model is running, set by the caller
        self.recorded: Optional[Tuple[str, int]] = None  # (list, block index) of `outputs`
        self.outputs: List = []

    @contextlib.contextmanager
    def checking_order(self):
        """Around a pass over every batch: records which lists call their blocks in order."""
        calls: Dict[str, List[int]] = {name: [] for name in self.lists}

        def hook(name, index):
            return lambda module, args: calls[name].append(index)
        with calibration.hooks(block.register_forward_pre_hook(hook(name, i))
                               for name, blocks in self.lists.items()
                               for i, block in enumerate(blocks)):
            yield
        for name, blocks in self.lists.items():
            self.in_order[name] = calls[name] == list(range(len(blocks))) * len(self.batches)

    @contextlib.contextmanager
    def skipping_to(self, block: Optional[str]):
        """Within: the blocks before `block` (a name given at construction, or None for none)
        are replayed, not computed."""
        parent, _, index = (block or "").rpartition(".")
        if not block or not self.in_order.get(parent) or int(index) == 0:
            yield
            return
        index = int(index)
        if self.recorded != (parent, index - 1):
            # recorded while the previous recording (block index-2's) still replays
            self.outputs, self.recorded = self._record(parent, index - 1), (parent, index - 1)
        with self._replaying(parent, index):
            yield

    @contextlib.contextmanager
    def _replaying(self, parent: str, count: int):
        """Blocks 0 .. count-1 of list `parent` replaced by stand-ins returning the recording."""
        blocks = self.lists[parent]
        originals = [blocks[i] for i in range(count)]
        try:
            for i in range(count):
                blocks[i] = _Replayed(self)
            yield
        finally:
            for i, original in enumerate(originals):
                blocks[i] = original

    def _record(self, parent: str, index: int) -> List:
        """Block `index`'s output on every batch, running only what comes before it (replaying the
        recording of block index-1 when that is the one held)."""
        outputs = []

        def hook(module, args, output):
            outputs.append(pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, output))
            raise calibration.StopForward
        replay = (self._replaying(parent, index) if self.recorded == (parent, index - 1)
                  else contextlib.nullcontext())
        with replay, calibration.hooks([self.lists[parent][index].register_forward_hook(hook)]), \
                torch.no_grad():
            for i, item in enumerate(self.batches):
                self.batch = i
                try:
                    calibration.call_model(self.model, item, i)
                except calibration.StopForward:
                    pass
        return outputs


class _Replayed(nn.Module):
    """A block's stand-in under BlockReplay: returns a copy of the recorded output for the batch
    being run, whatever its inputs."""

    def __init__(self, replay: BlockReplay):
        super().__init__()
        self.replay = replay

    def forward(self, *args, **kwargs):
        return pytree.tree_map_only(torch.Tensor, torch.clone,
                                    self.replay.outputs[self.replay.batch])


class OutputError:
    """The default damage metric: sum over the batches of ||y - y_ref||^2 / ||y_ref||^2 over the
    tokens the attention mask keeps, y_ref being the output when this object was made.
    `blocks` (names of nn.ModuleList elements): `self.replay.skipping_to(block)` then skips the
    blocks before `block` (BlockReplay) for measurements that only change `block` or later."""

    def __init__(self, model: nn.Module, batches: List, blocks: Iterable[str] = ()):
        self.model, self.batches = model, batches
        self.masks = [calibration.attention_mask_of(item) for item in batches]
        self.replay = BlockReplay(model, batches, blocks)
        with self.replay.checking_order():
            self.refs = self._outputs()
        self.norm = sum(float(r.double().pow(2).sum()) for r in self.refs)
        if not math.isfinite(self.norm):
            raise ValueError("calib_data: the unquantized model's output holds NaN or inf")
        self.norm = self.norm or 1.0

    def _kept(self, y: torch.Tensor, index: int) -> torch.Tensor:
        mask = self.masks[index]
        y = y.detach().float()
        if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
            return y[mask.to(y.device) != 0]
        return y

    def _outputs(self) -> List[torch.Tensor]:
        """The model's outputs on the batches, in eval mode, padding left out."""
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = []
            with torch.no_grad():
                for i, item in enumerate(self.batches):
                    self.replay.batch = i
                    output = calibration.call_model(self.model, item, i)
                    outputs.append(self._kept(_output_tensor(output), i))
            return outputs
        finally:
            self.model.train(was_training)

    def __call__(self) -> float:
        total = sum(float((y - ref).double().pow(2).sum())
                    for y, ref in zip(self._outputs(), self.refs))
        return total / self.norm


def shared_input_groups(model: nn.Module, batch, layers: Dict[str, nn.Module]) -> List[List[str]]:
    """Groups (of two or more) of `layers` that read the very same input tensor on `batch`."""
    keys: Dict[str, tuple] = {}
    held: List[torch.Tensor] = []  # kept alive for the pass: a freed input's address is reused

    def hook(name):
        def record(module, args):
            x = args[0]
            if name not in keys:
                held.append(x)
                keys[name] = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        return record
    with calibration.hooks(m.register_forward_pre_hook(hook(n)) for n, m in layers.items()), \
            torch.no_grad():
        calibration.call_model(model, batch)
    groups: Dict[tuple, List[str]] = {}
    for name in layers:  # the model's order
        if name in keys:
            groups.setdefault(keys[name], []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _check_candidates(candidates) -> List[Optional[QuantConfig]]:
    if isinstance(candidates, (QuantConfig, str)) or not isinstance(candidates, Iterable):
        raise TypeError("candidates must be a list of int4kit.QuantConfig (and None for dense)")
    candidates = list(candidates)
    for c in candidates:
        if c is not None and not isinstance(c, QuantConfig):
            raise TypeError(f"candidates: each must be an int4kit.QuantConfig or None (dense), "
                            f"got {type(c).__name__}")
    if not any(isinstance(c, QuantConfig) and c.bits == 4 for c in candidates):
        raise ValueError("candidates holds no int4 format (a QuantConfig with bits=4): a plan "
                         "could only choose int8 and dense")
    if len(set(map(_config_key, candidates))) != len(candidates):
        raise ValueError("candidates lists the same format twice")
    weighting = {c.norm_weighting for c in candidates if c is not None and c.needs_calibration}
    if len(weighting) > 1:
        raise ValueError("candidates: the calibrated formats must agree on norm_weighting (their "
                         "statistics are collected once)")
    return candidates + ([None] if None not in candidates else [])


def _config_key(config: Optional[QuantConfig]):
    return None if config is None else json.dumps(config.to_dict(), sort_keys=True)


def measure_sensitivity(model: nn.Module, candidates, calib_data,
                        eval_fn: Optional[Callable[[nn.Module], float]] = None,
                        skip: Iterable[str] = (),
                        filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                        show_progress: bool = True, replay: bool = True) -> SensitivityTable:
    """Per linear layer and per candidate format, the damage of quantizing only that layer.

    candidates: QuantConfigs (int4 with different group sizes, methods, scale dtypes; int8 with
      bits=8; at least one int4) and None for dense (added when missing: every plan can keep a
      layer dense).
    calib_data: model inputs as for quantize_model: the calibration of gptq/awq candidates
      (statistics of every layer are collected once, from the unquantized model: memory K x K
      per layer) and the default metric's data.
    eval_fn(model) -> float: a loss to measure instead (lower is better); the damage is its
      increase over the unquantized model.
    skip, filter_fn: as in quantize_model. The model is left as it was.
    replay: with the default metric, blocks before the measured layer's block (elements of an
      nn.ModuleList, called once each in order) are replayed from a recording of their outputs
      instead of recomputed (BlockReplay): the same damages, about half the forward passes' time.
      False runs every forward in full.
    Returns a SensitivityTable (prints as a table; .save(path) writes JSON)."""
    t0 = time.perf_counter()
    if isinstance(model, nn.Linear) or not isinstance(model, nn.Module):
        raise TypeError("model must be an nn.Module holding nn.Linear layers")
    candidates = _check_candidates(candidates)
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable eval_fn(model) -> float, got "
                        f"{type(eval_fn).__name__}")
    _refuse_fake_quant(model)
    batches = None if calib_data is None else list(calib_data)
    if not batches:
        raise ValueError("calib_data is empty or None: measure_sensitivity needs model inputs")
    calibration.check_batches(model, batches)
    targets, _ = select_layers(model, -1, skip, filter_fn)
    if not targets:
        raise ValueError("model has no linear layer to measure (after skip and filter_fn)")
    layers = {name: model.get_submodule(name) for name in targets}
    blocks, _ = find_blocks(model, targets)
    block_of = {layer: block for block, members in blocks for layer in members}
    was_training = model.training
    model.eval()
    try:
        if eval_fn is None:
            metric = OutputError(model, batches, [block for block, _ in blocks] if replay else ())
            skipping_to = metric.replay.skipping_to
        else:
            skipping_to = lambda block: contextlib.nullcontext()  # noqa: E731
            def metric():
                with torch.no_grad():
                    value = float(eval_fn(model))
                if not math.isfinite(value):
                    raise ValueError(f"eval_fn returned {value}")
                return value
        base = metric()
        groups = shared_input_groups(model, batches[0], layers)
        stats = _statistics(model, batches, layers, candidates)
        rows = {}
        for name in calibration.progress(targets, show_progress, desc="sensitivity"):
            with skipping_to(block_of.get(name)):
                rows[name] = _measure_layer(model, name, layers[name], candidates, stats, metric,
                                            base)
    finally:
        for name, layer in layers.items():
            replace_module(model, name, layer)
        model.train(was_training)
    return SensitivityTable(candidates, rows, groups, OUTPUT_ERROR if eval_fn is None else
                            f"eval_fn {getattr(eval_fn, '__name__', 'callable')}",
                            time.perf_counter() - t0)


def _statistics(model, batches, layers, candidates) -> Dict[str, calibration.LayerStats]:
    calibrated = [c for c in candidates if c is not None and c.needs_calibration]
    if not calibrated:
        return {}
    norms = (calibration.plan_norms(model, batches[0], layers) if calibrated[0].norm_weighting
             else {})
    stats, _ = calibration.collect_weighted(
        model, batches, layers, norms, hessian=True,
        absmean=any(c.method in ("awq", "awq+gptq") for c in calibrated),
        max_tokens=calibrated[0].calib_max_tokens)
    return stats


def _measure_layer(model, name, linear, candidates, stats, metric, base) -> dict:
    row = {"weights": linear.in_features * linear.out_features,
           "in_features": linear.in_features, "bytes": [], "damage": []}
    for config in candidates:
        if config is None:
            row["bytes"].append(stored_bytes(linear))
            row["damage"].append(0.0)
            continue
        if wider_than(config.group_size, linear.in_features) or (
                config.needs_calibration and stats[name].count == 0):
            row["bytes"].append(None)
            row["damage"].append(None)
            continue
        if config.needs_calibration:
            layer = _calibrated(model, name, linear, stats[name].clone(), config, QuantReport(),
                                fold=False)
        else:
            layer = _data_free(linear, config)
        layer.act_quant = config.act_quant
        row["bytes"].append(stored_bytes(layer))
        # W4A8 runs as it will (its activations are rounded); W4A16 through a dense stand-in
        replace_module(model, name, layer if config.act_quant else
                       dense_stand_in(layer, linear.weight.dtype))
        try:
            row["damage"].append(metric() - base)
        finally:
            replace_module(model, name, linear)
    return row


# ---- planning ------------------------------------------------------------------------------------

class MixedPrecisionPlan(dict):
    """name -> QuantConfig (or None: dense) for every layer of the table: pass it to
    quantize_model as layer_configs. predicted_bytes / predicted_bits_per_weight /
    predicted_damage: what the table says the plan costs; budget_bytes: the limit it met."""

    def __init__(self, choices: Dict[str, int], table: SensitivityTable, budget_bytes: int):
        super().__init__((name, table.candidates[i]) for name, i in choices.items())
        self.labels = {name: table.labels[i] for name, i in choices.items()}
        self.weights = table.weights
        self.predicted_bytes = sum(table.layers[n]["bytes"][i] for n, i in choices.items())
        self.predicted_damage = sum(table.layers[n]["damage"][i] for n, i in choices.items())
        self.budget_bytes = budget_bytes
        self.metric = table.metric

    @property
    def predicted_bits_per_weight(self) -> float:
        return 8 * self.predicted_bytes / self.weights

    def __str__(self) -> str:
        counts: Dict[str, int] = {}
        for label in self.labels.values():
            counts[label] = counts.get(label, 0) + 1
        lines = [f"mixed-precision plan for {len(self)} layers: "
                 f"{self.predicted_bits_per_weight:.3f} bits per weight (budget "
                 f"{8 * self.budget_bytes / self.weights:.3f}), predicted damage "
                 f"{self.predicted_damage:.3e} ({self.metric})"]
        lines += [f"  {label}: {n} layers" for label, n in
                  sorted(counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def plan_mixed_precision(table: SensitivityTable, bits_per_weight: Optional[float] = None,
                         max_bytes: Optional[int] = None, tie_shared_inputs: bool = True,
                         ties: Iterable[Iterable[str]] = ()) -> MixedPrecisionPlan:
    """The candidate per layer with the least summed damage whose stored size fits the budget:
    bits_per_weight (over the table's layers, as QuantReport.total_bits_per_weight counts them)
    or max_bytes. Exact: a dynamic programme over the layers keeps every (size, damage) pair
    that no other beats on both (the multiple-choice knapsack's Pareto frontier).

    tie_shared_inputs: layers reading the same input (table.groups) take the same candidate.
    ties: more groups of layer names to tie (same in_features)."""
    if not isinstance(table, SensitivityTable):
        raise TypeError(f"table must be a SensitivityTable (int4kit.measure_sensitivity), got "
                        f"{type(table).__name__}")
    _check_table(table)
    items = _items(table, tie_shared_inputs, ties)
    smallest = sum(min(size for size, _, _ in options) for _, options in items)
    dense = sum(row["bytes"][table.candidates.index(None)] for row in table.layers.values()) \
        if None in table.candidates else None
    budget = _budget(table, bits_per_weight, max_bytes, smallest, dense)
    # frontier: (size, damage, back pointer); sizes ascending, damages strictly descending
    frontier: List[Tuple[int, float, Optional[tuple]]] = [(0, 0.0, None)]
    for _, options in items:
        grown = []
        for entry in frontier:
            for size, damage, choice in options:
                if entry[0] + size <= budget:
                    grown.append((entry[0] + size, entry[1] + damage, (entry, choice)))
        grown.sort(key=lambda e: (e[0], e[1]))
        frontier = []
        for entry in grown:  # keep what no smaller entry beats on damage
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
    best = frontier[-1]  # the largest size within the budget has the least damage
    choices: Dict[str, int] = {}
    entry = best
    for names, _ in reversed(items):
        entry, choice = entry[2]
        for name in names:
            choices[name] = choice
    return MixedPrecisionPlan({name: choices[name] for name in table.layers}, table, budget)


def _budget(table, bits_per_weight, max_bytes, smallest: int, dense: Optional[int]) -> int:
    if (bits_per_weight is None) == (max_bytes is None):
        raise ValueError("give exactly one budget: bits_per_weight or max_bytes")
    weights = table.weights
    if bits_per_weight is not None:
        if not isinstance(bits_per_weight, (int, float)) or isinstance(bits_per_weight, bool) \
                or not bits_per_weight > 0 or not math.isfinite(bits_per_weight):
            raise ValueError(f"bits_per_weight must be a positive number, got {bits_per_weight!r}")
        budget, asked = int(bits_per_weight * weights / 8), f"bits_per_weight={bits_per_weight}"
    else:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        budget, asked = max_bytes, f"max_bytes={max_bytes}"
    if budget < smallest:
        raise ValueError(f"{asked} is below the smallest model these candidates make: "
                         f"{8 * smallest / weights:.3f} bits per weight ({smallest} bytes)")
    if dense is not None and budget >= dense:
        raise ValueError(f"{asked} is at or above the dense model's size "
                         f"({8 * dense / weights:.3f} bits per weight, {dense} bytes): nothing "
                         f"needs quantizing")
    return budget


def _items(table: SensitivityTable, tie_shared_inputs: bool, ties
           ) -> List[Tuple[List[str], List[Tuple[int, float, int]]]]:
    """The knapsack's items: groups of tied layers (or single layers) with their options
    (summed size, summed damage, candidate index) over the candidates every member allows."""
    groups = [list(g) for g in table.groups] if tie_shared_inputs else []
    if isinstance(ties, str):
        raise TypeError("ties must be a list of groups of layer names")
    groups += [list(g) for g in ties]
    unit_of: Dict[str, List[str]] = {}  # layer -> every layer tied to it (overlapping groups merge)
    for group in groups:
        unknown = [n for n in group if n not in table.layers]
        if unknown:
            raise ValueError(f"ties: {unknown} are not layers of the table")
        members = list(dict.fromkeys(m for n in group for m in unit_of.get(n, [n])))
        shapes = {table.layers[n]["in_features"] for n in members}
        if len(shapes) > 1:
            raise ValueError(f"ties: the layers {members} have different in_features "
                             f"{sorted(shapes)}; only layers reading the same input can be tied")
        for n in members:
            unit_of[n] = members
    units = list({tuple(unit_of.get(n, [n])): None for n in table.layers})
    items = []
    for names in map(list, units):
        options = []
        for i in range(len(table.candidates)):
            rows = [table.layers[n] for n in names]
            if all(r["bytes"][i] is not None for r in rows):
                options.append((sum(r["bytes"][i] for r in rows),
                                sum(r["damage"][i] for r in rows), i))
        if not options:
            raise ValueError(f"layers {names}: no candidate applies to all of them")
        items.append((names, options))
    return items


def plan_check(model: nn.Module, layer_configs, calib_data: Optional[List]
               ) -> Optional[Callable[[QuantReport], None]]:
    """For quantize_model given a MixedPrecisionPlan: records the model's outputs on calib_data
    now (when the plan's damage is the default metric) and returns what fills
    report.plan_check once the model is quantized: predicted against measured size and error."""
    if not isinstance(layer_configs, MixedPrecisionPlan):
        return None
    plan = layer_configs
    error = (OutputError(model, calib_data) if calib_data and plan.metric == OUTPUT_ERROR
             else None)

    def finish(report: QuantReport) -> None:
        sizes = [report.layer_sizes[name][0] for name in plan if name in report.layer_sizes]
        report.plan_check = {
            "predicted_bits_per_weight": plan.predicted_bits_per_weight,
            "measured_bits_per_weight": 8 * sum(sizes) / plan.weights,
            "predicted_error": plan.predicted_damage,
            "measured_error": None if error is None else error(),
            "metric": plan.metric}
    return finish
