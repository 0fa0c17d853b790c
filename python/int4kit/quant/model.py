"""quantize_model: swap every eligible nn.Linear of a model for an Int4Linear, in place."""
import fnmatch
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import hf
from ..formats.native import model_tensor_aliases
from ..nn import INPUT_STATS, Int4Linear, QuantLinear, replace_module
from . import calibration
from .adaround import adaround
from .awq import awq, awq_scales, scaled_hessian
from .blocks import find_blocks, quantize_blocks
from .config import QuantConfig
from .gptq import HessianError, gptq
from .hqq import hqq
from .rtn import (PER_TENSOR, codes_objective, dequant, group_size_of, layer_objective, rtn,
                  to_int4linear, wider_than)

# (consumer suffix, producer suffix): the producer's output feeds only the consumer, through a map
# that is linear per channel (attention's weighted sum of values), so AWQ's 1/s can be folded into
# the producer's output rows. BERT's LayerNorms are not on this list on purpose: BERT is post-LN,
# so a LayerNorm's output is also the residual stream and scaling it would change the model.
FOLD_RULES = (("attention.output.dense", "attention.self.value"),
              ("self_attn.o_proj", "self_attn.v_proj"),
              ("self_attn.out_proj", "self_attn.v_proj"))


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of what model.state_dict() would save (for Int4Linear: the canonical format)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class QuantReport:
    swapped: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (layer name, reason)
    bytes_before: int = 0
    bytes_after: int = 0
    method: str = "rtn"
    # layers the configured method could not handle, and what was done instead: (name, reason)
    fallbacks: List[Tuple[str, str]] = field(default_factory=list)
    # other per-layer decisions worth knowing (e.g. GPTQ result replaced by a better RTN one)
    notes: List[Tuple[str, str]] = field(default_factory=list)
    # relative layer error on the calibration data, tr(D H D^T) / tr(W H W^T), where measured
    layer_errors: Dict[str, float] = field(default_factory=dict)
    # AWQ folds: name -> (input multiplier, output multiplier) that map the quantized layer back to
    # the original layer's coordinates: original(x) ~ quantized(x * in) * out (None: 1)
    io_scales: Dict[str, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = \
        field(default_factory=dict)
    seconds: float = 0.0
    # every linear layer of the model after the run, quantized or kept dense (not one whose weight
    # is tied to another tensor, which is stored there): name -> (stored bytes, weights), the
    # bytes counting codes, scales, zero points, bias and input_scale / input_perm
    layer_sizes: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    # with a mixed-precision plan as layer_configs: the plan's predicted bits per weight and
    # error next to the measured ones (measured_error on calib_data; None without it)
    plan_check: Optional[Dict[str, object]] = None

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    @property
    def bits_per_weight(self) -> Dict[str, float]:
        """Stored bits per weight of each linear layer (layer_sizes)."""
        return {name: 8 * size / weights for name, (size, weights) in self.layer_sizes.items()}

    @property
    def total_bits_per_weight(self) -> float:
        """Stored bits per weight over every linear layer (layer_sizes) together."""
        weights = sum(w for _, w in self.layer_sizes.values())
        return 8 * sum(b for b, _ in self.layer_sizes.values()) / weights if weights else float("nan")

    def __str__(self) -> str:
        lines = [f"int4kit: swapped {len(self.swapped)} Linear layers, skipped {len(self.skipped)}",
                 f"  model size {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} "
                 f"MiB ({self.compression:.2f}x smaller)"]
        if self.layer_sizes:
            lines.append(f"  linear layers: {self.total_bits_per_weight:.3f} bits per weight "
                         f"(codes, scales, zero points, bias)")
        if self.method != "rtn" or self.fallbacks:
            lines.append(f"  method {self.method}, {self.seconds:.1f} s")
        if self.plan_check is not None:
            check = self.plan_check
            measured = check["measured_error"]
            lines.append(f"  plan: {check['predicted_bits_per_weight']:.3f} bits per weight "
                         f"predicted, {check['measured_bits_per_weight']:.3f} measured; error "
                         f"{check['predicted_error']:.3e} predicted (sum of the layers'), "
                         + ("not measured (no calib_data or another metric)" if measured is None
                            else f"{measured:.3e} measured") + f" ({check['metric']})")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  fallback {name}: {reason}" for name, reason in self.fallbacks]
        lines += [f"  note {name}: {note}" for name, note in self.notes]
        return "\n".join(lines)


def stored_bytes(layer: nn.Module) -> int:
    """Bytes a linear layer's state dict stores to run: weights (or codes, scales and zero
    points), bias, input_scale / input_perm; not the calibration statistics (INPUT_STATS)."""
    return sum(t.numel() * t.element_size() for key, t in layer.state_dict().items()
               if key != INPUT_STATS)


def linear_layer_sizes(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """QuantReport.layer_sizes of `model`: name -> (stored_bytes, weights) for each nn.Linear,
    Int4Linear and Int8Linear whose weight is its own (tied ones are left out)."""
    tied = _tied_weights(model)
    return {name: (stored_bytes(m), m.in_features * m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and name not in tied}


def matches_any(name: str, patterns) -> bool:
    """name equals or fnmatches one of `patterns` (a string or an iterable of strings)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _data_free(linear: nn.Linear, config: QuantConfig) -> QuantLinear:
    dtype = config.scale_dtype_for(linear.weight)
    if (config.method == "rtn" and not config.clip_search and dtype == linear.weight.dtype
            and config.group_size != PER_TENSOR and config.bits == 4):
        return Int4Linear.from_linear(linear, config.group_size, config.symmetric)
    w = linear.weight.detach().cpu()
    if config.method == "hqq":
        codes, s, z = hqq(w, config.group_size, config.symmetric, dtype)
    else:
        codes, s, z = rtn(w, config.group_size, config.symmetric, dtype,
                          clip_search=config.clip_search, bits=config.bits)
    return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric,
                         scale_dtype=dtype, bits=config.bits)


def _rel(obj: float, w: torch.Tensor, H: torch.Tensor) -> float:
    base = _zero_objective(w, H)
    return obj / base if base > 0 else 0.0


def _zero_objective(w: torch.Tensor, H: torch.Tensor) -> float:
    """The layer objective of an all-zero w_hat: what report.layer_errors divides by."""
    return layer_objective(w, torch.zeros((), dtype=w.dtype).expand(w.shape), H)


def _gptq_guarded(name, w, H, config, report, dtype):
    """GPTQ, unless plain rounding (with the same clip setting) does better on the layer
    objective. Returns the codes, scales and zero points, and their objective relative to an
    all-zero weight's (report.layer_errors).

    H is consumed: without refine_rounds the solve runs in its memory (one K x K buffer less,
    docs/SCALE.md), so whatever needs H (the plain rounding's objective, the relative error's
    base) comes first, and GPTQ reports its own objective. A Hessian GPTQ cannot factorise keeps
    the plain rounding, with a note."""
    G = group_size_of(config.group_size, w.shape[1])
    # codes 0..15 as uint8: an eighth of int64's memory (two [N, K] sets are alive here)
    alt = rtn(w, config.group_size, config.symmetric, dtype, clip_search=config.clip_search,
              codes_dtype=torch.uint8, bits=config.bits)
    obj_alt = codes_objective(w, *alt, G, H)
    base = _zero_objective(w, H)
    row_objective = torch.empty(w.shape[0], dtype=torch.float64)
    try:
        cand = gptq(w, H, config.group_size, config.symmetric, dtype=dtype, damp=config.damp,
                    block_size=config.block_size, act_order=config.act_order,
                    clip_search=config.clip_search, refine_rounds=config.refine_rounds,
                    codes_dtype=torch.uint8, bits=config.bits, overwrite_hessian=True,
                    objective_out=row_objective)
    except HessianError as e:
        report.notes.append((name, f"{e}; kept RTN"))
        cand, obj = alt, obj_alt
    else:
        obj = float(row_objective.sum())
        if obj_alt < obj:
            report.notes.append((name, f"RTN beat GPTQ on the calibration objective "
                                       f"({obj_alt:.4g} < {obj:.4g}); kept RTN"))
            cand, obj = alt, obj_alt
    return cand, (obj / base if base > 0 else 0.0)


def _fold_into_producer(model, name, s, report, final=None,
                        configs: Optional[Dict[str, QuantConfig]] = None) -> bool:
    """Divides the producer's output rows by s (AWQ fold). Returns False if no producer fits.

    final: name -> Int4Linear already built but not yet in the model (the model holds a dense
    stand-in meanwhile); both are updated. configs: the run's layer configs; a producer
    quantized per tensor is not a fit (its rows must keep one scale)."""
    for consumer, producer in FOLD_RULES:
        if not name.endswith(consumer):
            continue
        pname = name[: len(name) - len(consumer)] + producer
        if configs is not None and pname in configs and \
                configs[pname].group_size == PER_TENSOR:
            continue
        try:
            prod = model.get_submodule(pname)
        except AttributeError:
            continue
        if not isinstance(prod, (nn.Linear, Int4Linear)) or prod.out_features != s.numel():
            continue
        with torch.no_grad():
            if isinstance(prod, nn.Linear):  # new tensors, not in place: quantize_model's undo
                sd = s.to(prod.weight.device, prod.weight.dtype)  # puts the old ones back
                prod.weight = nn.Parameter(prod.weight / sd[:, None],
                                           requires_grad=prod.weight.requires_grad)
                if prod.bias is not None:
                    prod.bias = nn.Parameter(prod.bias / sd, requires_grad=prod.bias.requires_grad)
            if final is not None and pname in final:
                final[pname] = _scale_rows(final[pname], s)
            elif isinstance(prod, Int4Linear):
                replace_module(model, pname, _scale_rows(prod, s))
        old_in, old_out = report.io_scales.get(pname, (None, None))
        out = s.detach().float().cpu()
        report.io_scales[pname] = (old_in, out if old_out is None else old_out * out)
        report.io_scales[name] = (1.0 / s.detach().float().cpu(), None)
        return True
    return False


def _scale_rows(prod: Int4Linear, s: torch.Tensor) -> Int4Linear:
    """An Int4Linear whose output row n is prod's divided by s[n]: its scales and bias rows are."""
    with torch.no_grad():
        qweight, scales, zeros = prod.canonical()
        sd = s.to(scales.device, torch.float32)
        new = Int4Linear.from_quantized(
            qweight, (scales.float() / sd[:, None]).to(scales.dtype), zeros,
            prod.group_size, prod.in_features,
            bias=None if prod.bias is None else (prod.bias.float() / sd).to(prod.bias.dtype),
            device=prod._device())
        new.input_scale = prod.input_scale
        setattr(new, INPUT_STATS, getattr(prod, INPUT_STATS))  # its input is unchanged
    return new


def _calibrated(model, name, linear, stats, config, report, final=None,
                configs: Optional[Dict[str, QuantConfig]] = None, fold: bool = True
                ) -> Int4Linear:
    """`linear` quantized with `config` from its calibration statistics (whose Hessian it takes),
    carrying their per-channel mean squares (INPUT_STATS, for shift_report). AWQ's input
    scaling is folded into the producer layer where one fits (`fold`), else kept as the layer's
    input_scale."""
    layer, folded = _quantized_from_stats(model, name, linear, stats, config, report, final,
                                          configs, fold)
    sq_mean = stats.sq_mean
    if folded is not None:  # the producer's rows were divided by s: the layer now sees x / s
        sq_mean = sq_mean / folded.float().square()
    setattr(layer, INPUT_STATS, sq_mean.to(layer._device()))
    return layer


def _quantized_from_stats(model, name, linear, stats, config, report, final, configs, fold
                          ) -> Tuple[Int4Linear, Optional[torch.Tensor]]:
    """_calibrated's layer, and AWQ's input scale s when it was folded into a producer."""
    w = linear.weight.detach().cpu()
    H = stats.take_hessian()
    dtype = config.scale_dtype_for(w)
    build = functools.partial(to_int4linear, linear, group_size=config.group_size,
                              symmetric=config.symmetric, scale_dtype=dtype, bits=config.bits)
    if config.method == "adaround":
        codes, s, z = adaround(w, H, config.group_size, config.symmetric, dtype,
                               config.adaround_iters, config.adaround_reg, config.adaround_lr,
                               clip_search=config.clip_search, damp=config.damp,
                               polish_sweeps=config.adaround_polish_sweeps,
                               refine_rounds=config.refine_rounds)
        G = group_size_of(config.group_size, w.shape[1])
        report.layer_errors[name] = _rel(codes_objective(w, codes, s, z, G, H), w, H)
        return build(codes=codes, s=s, z=z), None
    if config.method == "gptq":
        (codes, s, z), report.layer_errors[name] = _gptq_guarded(name, w, H, config, report,
                                                                 dtype)
        return build(codes=codes, s=s, z=z), None
    # AWQ, and AWQ's scaling followed by GPTQ
    G = group_size_of(config.group_size, w.shape[1])
    if config.method == "awq":
        codes, s, z, a = awq(w, H, stats.absmean, config.group_size, config.symmetric, dtype)
    else:
        a, _, _ = awq_scales(w, H, stats.absmean, config.group_size, config.symmetric, dtype)
        (codes, s, z), _ = _gptq_guarded(name, w.float() * a[None, :], scaled_hessian(H, a),
                                         config, report, dtype)
    w_hat = dequant(codes, s, z, G) / a[None, :]
    report.layer_errors[name] = _rel(layer_objective(w, w_hat, H), w, H)
    if fold and _fold_into_producer(model, name, a, report, final, configs):
        return build(codes=codes, s=s, z=z), a
    return build(codes=codes, s=s, z=z, input_scale=1.0 / a), None


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calib_data=None,
                   skip: Iterable[str] = (),
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
                   layer_configs=None) -> QuantReport:
    """Replaces every eligible nn.Linear in `model` by an Int4Linear, in place.

    skip: layer names (or fnmatch patterns such as "classifier*") to leave in full precision.
    filter_fn(name, module) -> bool: only layers for which it returns True are quantized.
    layer_configs: per-layer settings, {pattern: QuantConfig or None} (or a list of such pairs):
      each layer takes the config of the first pattern (a name or an fnmatch pattern) it
      matches, None keeping it dense, and `config` when none matches (a mixed-precision plan,
      int4kit.plan_mixed_precision, is one). A pattern matching no linear layer is an error.
      Calibration settings (calib_max_tokens, show_progress) are `config`'s.
    calib_data: an iterable of batches for the calibration-based methods (gptq, awq, awq+gptq);
      each is passed as model(**item) if a mapping (an `attention_mask` in it keeps padding tokens
      out of the statistics), model(*item) if a tuple, else model(item). rtn and hqq need none.
    Returns a QuantReport: layers swapped and skipped (with the reason), fallbacks (layers the
    calibration never reached, quantized with RTN instead, with the reason), bytes before and
    after, bits per weight.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself an nn.Linear, which quantize_model cannot replace in place; "
                        "use int4kit.Int4Linear.from_linear(model, group_size, symmetric) instead")
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an int4kit.QuantConfig, got {type(config).__name__}")
    _refuse_fake_quant(model)
    configs, skipped = layer_plan(model, config, layer_configs, skip, filter_fn)
    from .mixed import plan_check  # mixed builds on this module
    if calib_data is not None:
        calib_data = list(calib_data)  # read twice with a plan: its check, and calibration
    check = plan_check(model, layer_configs, calib_data)
    targets = list(configs)
    batches = calibration_batches_for(configs, config, calib_data)
    if batches is not None:
        calibration.check_batches(model, batches)
    t0 = time.perf_counter()
    report = QuantReport(bytes_before=state_dict_bytes(model), method=run_method(configs, config))
    report.skipped.extend(skipped)

    undo = Undo(model, targets)
    try:
        if batches is None:
            built = {name: _data_free(model.get_submodule(name), configs[name])
                     for name in calibration.progress(targets, config.show_progress,
                                                      desc=report.method)}
            for name in targets:  # the model changes only once every layer is built
                replace_module(model, name, built[name])
            report.swapped.extend(targets)
        elif config.method == "adaround" and config.reconstruction == "block":
            blocks, loose = find_blocks(model, targets)
            built = quantize_blocks(model, blocks, batches, config, report)
            if loose:  # layer-wise, with every block quantized (as dense stand-ins)
                _quantize_sequential(model, {n: configs[n] for n in loose}, batches, config,
                                     report)
            for name, layer in built.items():
                replace_module(model, name, layer)
            report.swapped.extend(built)
        else:
            _quantize_sequential(model, configs, batches, config, report)
        for name in report.swapped:  # W4A8 changes how the layers run, not what they store
            module = model.get_submodule(name)
            module.act_quant = configs[name].act_quant
            module.method = configs[name].method
        if report.swapped and hf.is_transformers_model(model):
            hf.attach(model)  # model.save_pretrained now writes int4kit's format
    except BaseException:  # an error or a KeyboardInterrupt anywhere: the model as it was
        undo()
        raise
    report.bytes_after = state_dict_bytes(model)
    report.layer_sizes = linear_layer_sizes(model)
    report.seconds = time.perf_counter() - t0
    if check is not None:
        check(report)
    return report


def layer_plan(model: nn.Module, config: QuantConfig, layer_configs=None, skip: Iterable[str] = (),
               filter_fn: Optional[Callable[[str, nn.Module], bool]] = None
               ) -> Tuple[Dict[str, QuantConfig], List[Tuple[str, str]]]:
    """Each layer quantize_model will quantize with its config (in the model's order), and the
    layers it leaves dense with the reason: skip, filter_fn, tied weights, a layer_configs
    pattern mapping to None, in_features below the group size."""
    rules = _layer_rules(layer_configs, config)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [pattern for pattern, _ in rules if not any(matches_any(n, pattern)
                                                             for n in linears)]
    if unmatched:
        raise ValueError(f"layer_configs: pattern(s) {unmatched} match no linear layer of the model "
                         f"(its first ones: {linears[:4]})")
    candidates, skipped = select_layers(model, -1, skip, filter_fn)
    configs: Dict[str, QuantConfig] = {}
    for name in candidates:
        rule = next(((pattern, cfg) for pattern, cfg in rules if matches_any(name, pattern)),
                    None)
        cfg = config if rule is None else rule[1]
        in_features = model.get_submodule(name).in_features
        if cfg is None:
            skipped.append((name, f"layer_configs keeps it dense (pattern {rule[0]!r})"))
        elif wider_than(cfg.group_size, in_features):
            skipped.append((name, f"in_features {in_features} < group_size {cfg.group_size}"))
        else:
            configs[name] = cfg
    return configs, skipped


def _layer_rules(layer_configs, config: QuantConfig) -> List[Tuple[str, Optional[QuantConfig]]]:
    """layer_configs as a checked list of (pattern, QuantConfig or None)."""
    if layer_configs is None:
        return []
    pairs = layer_configs.items() if isinstance(layer_configs, dict) else layer_configs
    try:
        rules = [(pattern, cfg) for pattern, cfg in pairs]
    except (TypeError, ValueError):
        raise TypeError("layer_configs must be a dict {pattern: QuantConfig or None} or a list of "
                        "(pattern, QuantConfig or None) pairs") from None
    for pattern, cfg in rules:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"layer_configs: each pattern must be a non-empty str (a layer name or "
                            f"an fnmatch pattern), got {pattern!r}")
        if cfg is not None and not isinstance(cfg, QuantConfig):
            raise TypeError(f"layer_configs[{pattern!r}] must be an int4kit.QuantConfig or None "
                            f"(dense), got {type(cfg).__name__}")
        if cfg is not None and (cfg.reconstruction == "block"
                                or config.reconstruction == "block"):
            raise ValueError("layer_configs cannot be combined with QuantConfig(reconstruction="
                             "'block'): block reconstruction learns a block's layers together "
                             "with one config")
    return rules


def calibration_batches(config: QuantConfig, calib_data) -> Optional[List]:
    """calib_data as a list when config's method needs it (None for data-free methods); raises
    when it is missing or empty."""
    if not config.needs_calibration:
        return None
    if calib_data is None:
        raise ValueError(f"QuantConfig.method {config.method!r} needs calib_data (an iterable "
                         f"of model inputs); pass calib_data=..., or use a data-free method "
                         f"('rtn', 'hqq')")
    batches = list(calib_data)
    if not batches:
        raise ValueError(f"calib_data is empty: at least one batch is needed for method "
                         f"{config.method!r}")
    return batches


def calibration_batches_for(configs: Dict[str, QuantConfig], config: QuantConfig,
                            calib_data) -> Optional[List]:
    """calibration_batches for a run with per-layer configs: needed when any layer's method
    needs calibration (checked against the first such config)."""
    calibrated = [cfg for cfg in configs.values() if cfg.needs_calibration]
    return calibration_batches(calibrated[0] if calibrated else config, calib_data)


def run_method(configs: Dict[str, QuantConfig], config: QuantConfig) -> str:
    """The method a report names: the layers' one method, or "mixed"."""
    methods = {cfg.method for cfg in configs.values()} or {config.method}
    return methods.pop() if len(methods) == 1 else "mixed"


def _refuse_fake_quant(model: nn.Module) -> None:
    from ..qat import FakeQuantLinear  # qat builds on this module
    prepared = [name for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if prepared:
        raise ValueError(f"model holds {len(prepared)} FakeQuantLinear layers prepared for "
                         f"quantization-aware training (first: {prepared[0]!r}); "
                         f"int4kit.qat.convert(model) turns them into Int4Linear layers with the "
                         f"codes they trained (quantize_model would quantize them again)")


def select_layers(model: nn.Module, group_size: int, skip: Iterable[str] = (),
                  filter_fn: Optional[Callable[[str, nn.Module], bool]] = None
                  ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The nn.Linear layers of `model` that can become Int4Linear layers with `group_size`, and
    the others with the reason: (targets, [(name, reason), ...]). skip and filter_fn as in
    quantize_model."""
    skip = skip if isinstance(skip, str) else tuple(skip)  # consumed once per layer below
    targets, skipped = [], []
    tied = _tied_weights(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if matches_any(name, skip):
            skipped.append((name, "named in skip"))
        elif filter_fn is not None and not filter_fn(name, module):
            skipped.append((name, "filter_fn returned False"))
        elif name in tied:
            skipped.append((name, f"weight tied to {tied[name]} (an Int4Linear cannot share it)"))
        elif wider_than(group_size, module.in_features):
            skipped.append((name, f"in_features {module.in_features} < group_size {group_size}"))
        else:
            targets.append(name)
    return targets, skipped


class Undo:
    """What quantize_model (or prepare_qat, convert) may change, remembered so that an
    interruption at any point puts the model back exactly: the target layers and the model's
    Int4Linear layers, every Linear's weight and bias (AWQ folds replace a producer's), and what
    Hugging Face integration attaches. (It holds the original layers until quantize_model
    returns: a data-free run's peak is the dense model plus its int4 layers.)"""

    _MISSING = object()

    def __init__(self, model: nn.Module, targets: List[str]):
        self.model = model
        # the targets, and Int4Linear layers an AWQ fold may replace (_scale_rows)
        self.layers = {name: model.get_submodule(name) for name in targets}
        self.layers.update({name: m for name, m in model.named_modules()
                            if isinstance(m, QuantLinear)})
        # only the entries a Linear has (weight_norm / spectral_norm move `weight` elsewhere)
        self.params = [(m, {k: m._parameters[k] for k in ("weight", "bias")
                            if k in m._parameters})
                       for m in model.modules() if isinstance(m, nn.Linear)]
        self.attrs = {name: getattr(model, name, self._MISSING)
                      for name in ("hf_quantizer", "quantization_method")}
        config = getattr(model, "config", None)
        self.quantization_config = (self._MISSING if config is None else
                                    getattr(config, "quantization_config", self._MISSING))

    def __call__(self) -> None:
        for name, module in self.layers.items():
            replace_module(self.model, name, module)
        for module, params in self.params:
            module._parameters.update(params)
        self.restore_attachments()

    def restore_attachments(self) -> None:
        """Puts back only what Hugging Face integration attaches (hf.attach)."""
        for name, value in self.attrs.items():
            if value is self._MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, value)
        config = getattr(self.model, "config", None)
        if config is not None:
            if self.quantization_config is self._MISSING:
                config.__dict__.pop("quantization_config", None)
            else:
                config.quantization_config = self.quantization_config


def _tied_weights(model: nn.Module) -> Dict[str, str]:
    """Linear layers whose weight is also another module's parameter (tied embeddings):
    layer name -> the other parameter's name."""
    tied = {}
    for name, first in model_tensor_aliases(model).items():
        for mine, other in ((name, first), (first, name)):
            if mine.endswith(".weight"):
                tied[mine[: -len(".weight")]] = other
    return tied


def dense_stand_in(module: Int4Linear, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear computing what `module` computes, in the dtype of the dense layer it replaced
    (its dequantized weight and bias in `dtype`): calibration runs through it, which is faster
    than the int4 kernels on small batches and independent of them."""
    return module.to_linear(dtype)


class DequantizingStandIn(nn.Module):
    """What `dense_stand_in(module, dtype)` computes, bit for bit, with the weight dequantized at
    each call instead of held: a model being quantized then holds no dense copy of its quantized
    layers. Not an nn.Linear, so an AWQ fold cannot take it as a producer: AWQ methods keep
    dense stand-ins."""

    def __init__(self, module: Int4Linear, dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "quantized", module)  # not a submodule: the model sees a leaf
        self.in_features, self.out_features = module.in_features, module.out_features
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.quantized
        bias = None if layer.bias is None else layer.bias.to(self.dtype)
        return F.linear(x, layer.dequantized_weight().to(self.dtype), bias)


def stand_in(module: Int4Linear, method: str, dtype: torch.dtype) -> nn.Module:
    """The stand-in calibration runs through once `module` is quantized, computing in `dtype`
    (the replaced dense layer's): a dense copy where an AWQ fold may scale it, else one that
    dequantizes as it goes (the same outputs)."""
    if method in ("awq", "awq+gptq"):
        return dense_stand_in(module, dtype)
    return DequantizingStandIn(module, dtype)


def _quantize_sequential(model, configs: Dict[str, QuantConfig], batches, config: QuantConfig,
                         report: QuantReport) -> None:
    """Quantizes the layers of `configs` (name -> its config) stage by stage, each stage
    calibrated on the model with the earlier stages quantized (as stand-ins); data-free layers
    among them are quantized at their stage without statistics. `config` holds the
    calibration settings (calib_max_tokens, show_progress)."""
    targets = list(configs)
    layers = {name: model.get_submodule(name) for name in targets}
    final: Dict[str, Int4Linear] = {}
    was_training = model.training
    model.eval()
    try:
        stages, unreached = calibration.plan_stages(model, batches[0], layers)
        weighted = {n: layers[n] for n in targets if configs[n].norm_weighting}
        norms = calibration.plan_norms(model, batches[0], weighted) if weighted else {}
        for stage in calibration.progress(stages, config.show_progress, desc=report.method):
            calibrated = [n for n in stage if configs[n].needs_calibration]
            stats, unweighted = calibration.collect_weighted(
                model, batches, {n: layers[n] for n in calibrated},
                {n: norms[n] for n in calibrated if n in norms}, hessian=True,
                absmean=any(configs[n].method in ("awq", "awq+gptq") for n in calibrated),
                max_tokens=config.calib_max_tokens, show_progress=config.show_progress
            ) if calibrated else ({}, [])
            report.notes.extend(
                (n, "norm weighting off: its rows did not line up with the input of the norm "
                    "after it in every batch") for n in unweighted)
            for name in stage:
                if name not in stats:
                    final[name] = _data_free(layers[name], configs[name])
                elif stats[name].count == 0:
                    unreached.append(name)
                else:
                    final[name] = _calibrated(model, name, layers[name], stats[name],
                                              configs[name], report, final, configs)
            for name in stage:  # the rest of the model now sees this stage quantized
                if name in final:
                    replace_module(model, name, stand_in(final[name], configs[name].method,
                                                         layers[name].weight.dtype))
        for name in unreached:
            if name in final:
                continue
            cfg = configs[name]
            if not cfg.needs_calibration:
                final[name] = _data_free(layers[name], cfg)
                continue
            final[name] = _data_free(layers[name], QuantConfig(
                group_size=cfg.group_size, symmetric=cfg.symmetric,
                clip_search=cfg.clip_search, scale_dtype=cfg.scale_dtype))
            report.fallbacks.append((name, "calib_data never reached this layer (no tokens); "
                                           "quantized with RTN instead"))
        for name in targets:
            replace_module(model, name, final[name])
        report.swapped.extend(targets)
    except BaseException:
        for name in targets:  # leave the model as it was, not half swapped for stand-ins
            replace_module(model, name, layers[name])
        raise
    finally:
        model.train(was_training)
