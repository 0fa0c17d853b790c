"""How far new data is from the data a model was calibrated on (docs/ACCURACY.md, "Shift").

    report = int4kit.shift_report(model, batches)     # model: quantized with calib_data
    print(report)                                     # overall, by layer group, worst layers

Calibration leaves each calibrated Int4Linear its input's mean square per channel (m_c, the
optional `input_sq_mean` tensor, saved with the model). shift_report runs the new data through
the model, measures the same statistic m_d, and scores each layer twice:

* **divergence**: the total variation distance between the two energy profiles,
  0.5 * sum_k |m_d[k] / sum m_d - m_c[k] / sum m_c| (0: the same shape; 1: disjoint channels).
  A change of overall scale (louder inputs) does not count.
* **error ratio**: how much larger the layer's relative output error is expected to be on the
  new data than on the calibration data. With the layer objective's diagonal approximation the
  relative error on data with profile m is sum_k m[k] e_k / sum_k m[k] w_k, where e_k is the
  weights' expected squared rounding error in column k (s^2 / 12 per weight, from the stored
  scales) and w_k the column's squared norm (dequantized weight); the ratio of the new data's to
  the calibration's is above 1 when the new data puts its energy where the grid is coarse
  relative to the weights.

Layers are grouped by their name with the block index left out (`encoder.layer.*.output.dense`)
so that shifts can be compared per kind of layer.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..nn import INPUT_STATS, Int4Linear, QuantLinear
from . import calibration
from .rtn import group_size_of


@dataclass
class LayerShift:
    divergence: float
    error_ratio: float
    tokens: int


@dataclass
class ShiftReport:
    layers: Dict[str, LayerShift] = field(default_factory=dict)
    weights: Dict[str, int] = field(default_factory=dict)  # N x K per layer: the overall weights

    @property
    def divergence(self) -> float:
        """The layers' divergence, weighted by their weights."""
        return self._weighted("divergence")

    @property
    def error_ratio(self) -> float:
        """The layers' error ratio, weighted by their weights."""
        return self._weighted("error_ratio")

    def _weighted(self, what: str) -> float:
        total = sum(self.weights.values())
        return sum(getattr(s, what) * self.weights[n] for n, s in self.layers.items()) / total

    def groups(self) -> Dict[str, LayerShift]:
        """Mean scores per layer group (the name with the block index replaced by *)."""
        members: Dict[str, List[str]] = {}
        for name in self.layers:
            members.setdefault(group_of(name), []).append(name)
        return {group: LayerShift(
            sum(self.layers[n].divergence for n in names) / len(names),
            sum(self.layers[n].error_ratio for n in names) / len(names),
            sum(self.layers[n].tokens for n in names) // len(names))
            for group, names in members.items()}

    def worst(self, n: int = 5) -> List[str]:
        """The n layers whose expected error grows most."""
        return sorted(self.layers, key=lambda name: -self.layers[name].error_ratio)[:n]

    def __str__(self) -> str:
        lines = [f"shift from the calibration data over {len(self.layers)} layers: divergence "
                 f"{self.divergence:.4f}, expected error ratio {self.error_ratio:.3f}",
                 "| layer group | divergence | error ratio |", "|---|---|---|"]
        lines += [f"| {g} | {s.divergence:.4f} | {s.error_ratio:.3f} |"
                  for g, s in self.groups().items()]
        lines.append("most affected: " + ", ".join(
            f"{n} ({self.layers[n].error_ratio:.2f}x)" for n in self.worst()))
        return "\n".join(lines)


def group_of(name: str) -> str:
    """A layer's group: its name with the block indices replaced by *."""
    return re.sub(r"\.\d+\.", ".*.", f".{name}.")[1:-1]


def _column_energies(layer: Int4Linear):
    """(e_k, w_k) in x's column order: the expected squared rounding error (s^2 / 12 per weight)
    and the squared norm of each column of the dequantized weight."""
    _, scales, _ = layer.canonical()
    K = layer.in_features
    G = group_size_of(layer.group_size, K)
    per_group = scales.float().square().sum(0) / 12  # [groups]
    e = per_group.repeat_interleave(G)[:K]
    if layer.input_scale is not None:
        e = e * layer.input_scale.float().square()
    if layer.input_perm is not None:  # stored column k reads x[input_perm[k]]
        e = torch.empty_like(e).index_copy_(0, layer.input_perm, e)
    w = layer.dequantized_weight().square().sum(0)
    return e.double(), w.double()


def _relative_error(m: torch.Tensor, e: torch.Tensor, w: torch.Tensor) -> float:
    signal = float((m * w).sum())
    return float((m * e).sum()) / signal if signal > 0 else 0.0


def shift_report(model: nn.Module, data, layers: Optional[List[str]] = None) -> ShiftReport:
    """Scores how far `data` (model inputs, as calib_data) is from the calibration data of each
    Int4Linear that carries calibration statistics (module docstring). layers: only these
    names. Raises when no layer has statistics, or when data is empty, non-finite or does not
    fit the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    carrying = {name: m for name, m in model.named_modules()
                if isinstance(m, QuantLinear) and getattr(m, INPUT_STATS) is not None}
    if layers is not None:
        unknown = [n for n in layers if n not in carrying]
        if unknown:
            raise ValueError(f"layers: {unknown} are not Int4Linear layers with calibration "
                             f"statistics")
        carrying = {n: carrying[n] for n in layers}
    if not carrying:
        raise ValueError("model has no Int4Linear with calibration statistics (input_sq_mean): "
                         "they are recorded when a calibrated method (gptq, awq, adaround) "
                         "quantizes the model with calib_data")
    batches = None if data is None else list(data)
    if not batches:
        raise ValueError("data is empty or None: shift_report needs model inputs")
    calibration.check_batches(model, batches)
    was_training = model.training
    model.eval()
    try:
        stats = calibration.collect(model, batches, carrying, hessian=False, absmean=False)
    finally:
        model.train(was_training)
    report = ShiftReport()
    for name, layer in carrying.items():
        if stats[name].count == 0:
            continue
        m_c = getattr(layer, INPUT_STATS).double().cpu()
        m_d = stats[name].sq_mean.double()
        if not (math.isfinite(float(m_d.sum())) and float(m_d.sum()) >= 0):
            raise ValueError(f"data: layer {name!r} saw non-finite inputs")
        p_c = m_c / m_c.sum().clamp_min(1e-30)
        p_d = m_d / m_d.sum().clamp_min(1e-30)
        e, w = _column_energies(layer)
        base = _relative_error(m_c, e, w)
        report.layers[name] = LayerShift(
            divergence=float(0.5 * (p_d - p_c).abs().sum()),
            error_ratio=_relative_error(m_d, e, w) / base if base > 0 else 1.0,
            tokens=stats[name].count)
        report.weights[name] = layer.in_features * layer.out_features
    if not report.layers:
        raise ValueError("data reached none of the layers with calibration statistics")
    return report


# ---- re-calibration ------------------------------------------------------------------------------

RECALIBRATION_MODES = ("qparams", "full")


@dataclass
class RecalibrationReport:
    mode: str
    fit: str = "weights"
    # qparams: name -> (objective before, after) summed over the rows, on the recalibration data
    objectives: Dict[str, tuple] = field(default_factory=dict)
    rows_refit: int = 0  # qparams: rows whose new scales and zero points fit better (kept)
    rows: int = 0
    quant_report: Optional[object] = None  # full: quantize_model's report

    def __str__(self) -> str:
        if self.mode == "full":
            return f"recalibrated (full):\n{self.quant_report}"
        before = sum(b for b, _ in self.objectives.values())
        after = sum(a for _, a in self.objectives.values())
        return (f"recalibrated (qparams, fit {self.fit}) {len(self.objectives)} layers: "
                f"{self.rows_refit} of {self.rows} rows refit; summed objective {before:.4g} -> "
                f"{after:.4g}")


RECALIBRATION_FITS = ("weights", "outputs")


def recalibrate(model: nn.Module, data, teacher: nn.Module, mode: str = "qparams",
                calib_data=None, config=None, fit: str = "weights") -> RecalibrationReport:
    """Adapts a quantized model to new data, in place.

    mode "qparams": every Int4Linear keeps its codes; each row's scales and zero points are
      refit by least squares on the data (plus calib_data, if given), x_t being the quantized
      model's own input to the layer. Closed form per row (the GridSystem of GPTQ's
      refinement); a row keeps its old parameters unless the new ones fit better. Memory:
      K x K (+ N x K with fit="outputs") per layer, all at once. What is fit:
        fit "weights": the teacher layer's weight W, sum_t ||(W - W_hat) x_t||^2 (the layer
          objective on the new inputs);
        fit "outputs": the teacher layer's outputs y_t, sum_t ||W_hat x_t - (y_t - b)||^2:
          needs no teacher weights (any model with the same layer names) and also corrects
          the earlier layers' errors, which on MiniLM generalised worse (docs/ACCURACY.md).
    mode "full": re-quantizes every Int4Linear from the teacher's weights (the full-precision
      model, deep-copied), calibrated on data followed by calib_data, each layer with its
      method, group size, symmetry, scale dtype and act_quant, the other options from `config`
      (a QuantConfig; default QuantConfig(method="gptq")).
    The new calibration statistics (shift_report) are those of the data used."""
    from .config import QuantConfig
    if mode not in RECALIBRATION_MODES:
        raise ValueError(f"mode must be 'qparams' or 'full', got {mode!r}")
    if fit not in RECALIBRATION_FITS:
        raise ValueError(f"fit must be 'weights' or 'outputs', got {fit!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be the full-precision model (an nn.Module with the same "
                        f"layer names), got {type(teacher).__name__}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("model has no Int4Linear layer to recalibrate")
    int8 = [n for n, m in layers.items() if not isinstance(m, Int4Linear)]
    if int8:
        raise ValueError(f"recalibrate refits int4 layers; {int8[0]!r} is an Int8Linear (a mixed "
                         f"plan's): re-quantize the model with quantize_model instead")
    targets = {}
    for name, layer in layers.items():
        try:
            target = teacher.get_submodule(name)
        except AttributeError:
            raise ValueError(f"teacher has no layer {name!r}") from None
        if not isinstance(target, (nn.Linear, QuantLinear)) or (
                target.in_features, target.out_features) != (layer.in_features,
                                                             layer.out_features):
            raise ValueError(f"teacher's {name!r} is not a {layer.out_features} x "
                             f"{layer.in_features} linear layer")
        targets[name] = target
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an int4kit.QuantConfig, got {type(config).__name__}")
    batches = list(data if data is not None else []) + list(calib_data or [])
    if not batches:
        raise ValueError("data is empty or None: recalibrate needs model inputs")
    calibration.check_batches(model, batches)
    if mode == "full":
        return _recalibrate_full(model, teacher, layers, batches, config or QuantConfig(
            method="gptq"))
    return _recalibrate_qparams(model, teacher, layers, targets, batches, fit)


def _recalibrate_full(model, teacher, layers, batches, config) -> RecalibrationReport:
    import copy
    import dataclasses
    from ..nn import replace_module
    from .model import quantize_model
    fresh = copy.deepcopy(teacher)
    layer_configs = {name: dataclasses.replace(
        config, group_size=layer.group_size, symmetric=layer.symmetric,
        scale_dtype=layer.scale_dtype, act_quant=layer.act_quant,
        method=layer.method or config.method) for name, layer in layers.items()}
    report = quantize_model(fresh, config, batches, filter_fn=lambda n, m: n in layers,
                            layer_configs=layer_configs)
    # the layers, and any producer an AWQ fold rescaled along with them
    for name in set(report.swapped) | set(report.io_scales):
        replace_module(model, name, fresh.get_submodule(name))
    return RecalibrationReport("full", fit="", quant_report=report)


def _stored_order_weight(target: nn.Module, layer: Int4Linear) -> torch.Tensor:
    """The teacher layer's weight in `layer`'s stored column order and scale (stored column k
    multiplies x[input_perm[k]] * input_scale[k]), float64."""
    W = (target.dequantized_weight() if isinstance(target, QuantLinear)
         else target.weight.detach()).double().cpu()
    if layer.input_perm is not None:
        W = W[:, layer.input_perm.cpu()]
    if layer.input_scale is not None:
        W = W / layer.input_scale.double().cpu()
    return W


def _recalibrate_qparams(model, teacher, layers, targets, batches, fit) -> RecalibrationReport:
    from .. import reference
    from ..nn import replace_module, transform_input
    from .gptq import LayerTerms, refit_grid
    wide = fit == "outputs"  # the N x K cross products only when fitting outputs
    sums = {name: {"H": torch.zeros(l.in_features, l.in_features, dtype=torch.float64),
                   "C": torch.zeros(l.out_features if wide else 0, l.in_features,
                                    dtype=torch.float64),
                   "yy": torch.zeros(l.out_features if wide else 0, dtype=torch.float64),
                   "sq": torch.zeros(l.in_features, dtype=torch.float64), "count": 0}
            for name, l in layers.items()}
    for index, item in enumerate(batches):
        mask = calibration.attention_mask_of(item)
        inputs = _capture(model, item, index, layers, mask, outputs=False)
        outputs = (_capture(teacher, item, index, targets, mask, outputs=True)
                   if fit == "outputs" else {})
        for name, layer in layers.items():
            if name not in inputs:
                continue
            x = inputs[name]
            xs = transform_input(x.to(layer._device()), layer.input_perm,
                                 layer.input_scale).double().cpu()
            s = sums[name]
            s["H"] += xs.T @ xs
            s["sq"] += x.double().square().sum(0).cpu()
            s["count"] += x.shape[0]
            if fit == "weights":
                continue
            if name not in outputs or outputs[name].shape[0] != xs.shape[0]:
                raise ValueError(f"layer {name!r}: the teacher's layer did not see the tokens "
                                 f"the model's did")
            y = outputs[name].double()
            if layer.bias is not None:
                y = y - layer.bias.detach().double().cpu()
            s["C"] += y.T @ xs
            s["yy"] += y.square().sum(0)
    report = RecalibrationReport("qparams", fit)
    built: Dict[str, Int4Linear] = {}
    for name, layer in layers.items():
        s = sums[name]
        if s["count"] == 0:
            continue
        qweight, scales, zeros = layer.canonical()
        K, G = layer.in_features, group_size_of(layer.group_size, layer.in_features)
        Q = reference.unpack(qweight.cpu(), K)
        S = scales.float().cpu()
        Z = torch.full_like(S, 8.0) if zeros is None else zeros.float().cpu()
        terms = (LayerTerms(_stored_order_weight(targets[name], layer), s["H"], G,
                            layer.symmetric) if fit == "weights" else
                 LayerTerms.from_products(s["C"], s["yy"], s["H"], G, layer.symmetric))
        S_new, Z_new, before, after = refit_grid(terms, Q, S, Z, layer.scale_dtype)
        better = after < before
        S_new = torch.where(better[:, None], S_new, S)
        Z_new = torch.where(better[:, None], Z_new, Z)
        new = Int4Linear.from_quantized(
            qweight.cpu(), S_new.to(layer.scale_dtype),
            None if layer.symmetric else Z_new.to(layer.scale_dtype), layer.group_size, K,
            bias=None if layer.bias is None else layer.bias.detach(), device=layer._device(),
            act_quant=layer.act_quant)
        new.input_scale, new.input_perm, new.method = (layer.input_scale, layer.input_perm,
                                                       layer.method)
        setattr(new, INPUT_STATS, (s["sq"] / s["count"]).float().to(layer._device()))
        built[name] = new
        report.objectives[name] = (float(before.sum()), float(torch.where(better, after,
                                                                           before).sum()))
        report.rows_refit += int(better.sum())
        report.rows += layer.out_features
    for name, new in built.items():  # the model changes only once every layer is refit
        replace_module(model, name, new)
    return report


def _capture(model, item, index, modules, mask, outputs: bool) -> Dict[str, torch.Tensor]:
    """Each module's first input (or output) on one batch, padding rows left out."""
    seen: Dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, output=None):
            t = output if outputs else args[0]
            if name not in seen:
                seen[name] = calibration._rows(t.detach(), mask).float().cpu()
        return record
    registrations = (m.register_forward_hook(hook(n)) if outputs
                     else m.register_forward_pre_hook(hook(n)) for n, m in modules.items())
    was_training = model.training
    model.eval()
    try:
        with calibration.hooks(registrations), torch.no_grad():
            calibration.call_model(model, item, index)
    finally:
        model.train(was_training)
    return seen
