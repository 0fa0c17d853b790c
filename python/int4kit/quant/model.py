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
from ..nn import Int4Linear, replace_module
from . import calibration
from .adaround import adaround
from .awq import awq, awq_scales, scaled_hessian
from .blocks import find_blocks, quantize_blocks
from .config import QuantConfig
from .gptq import gptq
from .hqq import hqq
from .rtn import codes_objective, dequant, group_size_of, layer_objective, rtn, to_int4linear

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

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def __str__(self) -> str:
        lines = [f"int4kit: swapped {len(self.swapped)} Linear layers, skipped {len(self.skipped)}",
                 f"  model size {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} "
                 f"MiB ({self.compression:.2f}x smaller)"]
        if self.method != "rtn" or self.fallbacks:
            lines.append(f"  method {self.method}, {self.seconds:.1f} s")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  fallback {name}: {reason}" for name, reason in self.fallbacks]
        lines += [f"  note {name}: {note}" for name, note in self.notes]
        return "\n".join(lines)


def matches_any(name: str, patterns) -> bool:
    """name equals or fnmatches one of `patterns` (a string or an iterable of strings)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _data_free(linear: nn.Linear, config: QuantConfig) -> Int4Linear:
    if config.method == "rtn" and not config.clip_search:
        return Int4Linear.from_linear(linear, config.group_size, config.symmetric)
    w = linear.weight.detach().cpu()
    if config.method == "hqq":
        codes, s, z = hqq(w, config.group_size, config.symmetric)
    else:
        codes, s, z = rtn(w, config.group_size, config.symmetric, clip_search=config.clip_search)
    return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric)


def _rel(obj: float, w: torch.Tensor, H: torch.Tensor) -> float:
    base = layer_objective(w, torch.zeros_like(w), H)
    return obj / base if base > 0 else 0.0


def _gptq_guarded(name, w, H, config, report, dtype):
    """GPTQ, unless plain rounding (with the same clip setting) does better on the layer objective."""
    G = group_size_of(config.group_size, w.shape[1])
    # codes 0..15 as uint8: an eighth of int64's memory (two [N, K] sets are alive here)
    cand = gptq(w, H, config.group_size, config.symmetric, dtype=dtype, damp=config.damp,
                block_size=config.block_size, act_order=config.act_order,
                clip_search=config.clip_search, refine_rounds=config.refine_rounds,
                codes_dtype=torch.uint8)
    obj = codes_objective(w, *cand, G, H)
    alt = rtn(w, config.group_size, config.symmetric, dtype, clip_search=config.clip_search,
              codes_dtype=torch.uint8)
    obj_alt = codes_objective(w, *alt, G, H)
    if obj_alt < obj:
        report.notes.append((name, f"RTN beat GPTQ on the calibration objective "
                                   f"({obj_alt:.4g} < {obj:.4g}); kept RTN"))
        return alt, obj_alt
    return cand, obj


def _fold_into_producer(model, name, s, report, final=None) -> bool:
    """Divides the producer's output rows by s (AWQ fold). Returns False if no producer fits.

    final: name -> Int4Linear already built but not yet in the model (the model holds a dense
    stand-in meanwhile); both are updated."""
    for consumer, producer in FOLD_RULES:
        if not name.endswith(consumer):
            continue
        pname = name[: len(name) - len(consumer)] + producer
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
    return new


def _calibrated(model, name, linear, stats, config, report, final=None) -> Int4Linear:
    w = linear.weight.detach().cpu()
    H = stats.take_hessian()
    if config.method == "adaround":
        codes, s, z = adaround(w, H, config.group_size, config.symmetric, w.dtype,
                               config.adaround_iters, config.adaround_reg, config.adaround_lr,
                               clip_search=config.clip_search)
        G = group_size_of(config.group_size, w.shape[1])
        report.layer_errors[name] = _rel(codes_objective(w, codes, s, z, G, H), w, H)
        return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric)
    if config.method == "gptq":
        (codes, s, z), obj = _gptq_guarded(name, w, H, config, report, w.dtype)
        report.layer_errors[name] = _rel(obj, w, H)
        return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric)
    # AWQ, and AWQ's scaling followed by GPTQ
    G = group_size_of(config.group_size, w.shape[1])
    if config.method == "awq":
        codes, s, z, a = awq(w, H, stats.absmean, config.group_size, config.symmetric, w.dtype)
    else:
        a, _, _ = awq_scales(w, H, stats.absmean, config.group_size, config.symmetric, w.dtype)
        (codes, s, z), _ = _gptq_guarded(name, w.float() * a[None, :], scaled_hessian(H, a),
                                         config, report, w.dtype)
    w_hat = dequant(codes, s, z, G) / a[None, :]
    report.layer_errors[name] = _rel(layer_objective(w, w_hat, H), w, H)
    if _fold_into_producer(model, name, a, report, final):
        return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric)
    return to_int4linear(linear, codes, s, z, config.group_size, config.symmetric,
                         input_scale=1.0 / a)


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calib_data=None,
                   skip: Iterable[str] = (),
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> QuantReport:
    """Replaces every eligible nn.Linear in `model` by an Int4Linear, in place.

    skip: layer names (or fnmatch patterns such as "classifier*") to leave in full precision.
    filter_fn(name, module) -> bool: only layers for which it returns True are quantized.
    calib_data: an iterable of batches for the calibration-based methods (gptq, awq, awq+gptq);
      each is passed as model(**item) if a mapping (an `attention_mask` in it keeps padding tokens
      out of the statistics), model(*item) if a tuple, else model(item). rtn and hqq need none.
    Returns a QuantReport: layers swapped and skipped (with the reason), fallbacks (layers the
    calibration never reached, quantized with RTN instead, with the reason), bytes before and after.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself an nn.Linear, which quantize_model cannot replace in place; "
                        "use int4kit.Int4Linear.from_linear(model, group_size, symmetric) instead")
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an int4kit.QuantConfig, got {type(config).__name__}")
    _refuse_fake_quant(model)
    batches = calibration_batches(config, calib_data)
    if batches is not None:
        calibration.check_batches(model, batches)
    t0 = time.perf_counter()
    report = QuantReport(bytes_before=state_dict_bytes(model), method=config.method)
    targets, skipped = select_layers(model, config.group_size, skip, filter_fn)
    report.skipped.extend(skipped)

    undo = Undo(model, targets)
    try:
        if batches is None:
            built = {name: _data_free(model.get_submodule(name), config)
                     for name in calibration.progress(targets, config.show_progress,
                                                      desc=config.method)}
            for name in targets:  # the model changes only once every layer is built
                replace_module(model, name, built[name])
            report.swapped.extend(targets)
        elif config.method == "adaround" and config.reconstruction == "block":
            blocks, loose = find_blocks(model, targets)
            built = quantize_blocks(model, blocks, batches, config, report)
            if loose:  # layer-wise, with every block quantized (as dense stand-ins)
                _quantize_sequential(model, loose, batches, config, report)
            for name, layer in built.items():
                replace_module(model, name, layer)
            report.swapped.extend(built)
        else:
            _quantize_sequential(model, targets, batches, config, report)
        for name in report.swapped:  # W4A8 changes how the layers run, not what they store
            module = model.get_submodule(name)
            module.act_quant = config.act_quant
            module.method = config.method
        if report.swapped and hf.is_transformers_model(model):
            hf.attach(model)  # model.save_pretrained now writes int4kit's format
    except BaseException:  # an error or a KeyboardInterrupt anywhere: the model as it was
        undo()
        raise
    report.bytes_after = state_dict_bytes(model)
    report.seconds = time.perf_counter() - t0
    return report


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
        elif group_size != -1 and group_size > module.in_features:
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
                            if isinstance(m, Int4Linear)})
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


def dense_stand_in(module: Int4Linear) -> nn.Linear:
    """An nn.Linear computing what `module` computes (its dequantized weight in the scale dtype):
    calibration runs through it, which is faster than the int4 kernels on small batches and
    independent of them."""
    return module.to_linear()


class DequantizingStandIn(nn.Module):
    """What `dense_stand_in` computes, bit for bit (F.linear with the dequantized weight in the
    scale dtype), with the weight dequantized at each call instead of held: a model being
    quantized then holds no dense copy of its quantized layers. Not an nn.Linear, so an AWQ fold
    cannot take it as a producer: AWQ methods keep dense stand-ins."""

    def __init__(self, module: Int4Linear):
        super().__init__()
        object.__setattr__(self, "quantized", module)  # not a submodule: the model sees a leaf
        self.in_features, self.out_features = module.in_features, module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.quantized
        return F.linear(x, layer.dequantized_weight().to(layer.scale_dtype), layer.bias)


def stand_in(module: Int4Linear, method: str) -> nn.Module:
    """The stand-in calibration runs through once `module` is quantized: a dense copy where an
    AWQ fold may scale it, else one that dequantizes as it goes (the same outputs)."""
    return dense_stand_in(module) if method in ("awq", "awq+gptq") else DequantizingStandIn(module)


def _quantize_sequential(model, targets, batches, config, report):
    layers = {name: model.get_submodule(name) for name in targets}
    final: Dict[str, Int4Linear] = {}
    was_training = model.training
    model.eval()
    try:
        stages, unreached = calibration.plan_stages(model, batches[0], layers)
        norms = (calibration.plan_norms(model, batches[0], layers) if config.norm_weighting
                 else {})
        for stage in calibration.progress(stages, config.show_progress, desc=config.method):
            collect = functools.partial(calibration.collect, model, batches, hessian=True,
                                        absmean=config.method in ("awq", "awq+gptq"),
                                        max_tokens=config.calib_max_tokens,
                                        show_progress=config.show_progress)
            stats = collect({n: layers[n] for n in stage},
                            norms={n: norms[n] for n in stage if n in norms})
            mixed = [n for n in stage if stats[n].norm_weighted is False]
            if mixed:  # weighting is all or nothing per layer: these again, unweighted
                stats.update(collect({n: layers[n] for n in mixed}))
                report.notes.extend(
                    (n, "norm weighting off: its rows did not line up with the input of the norm "
                        "after it in every batch") for n in mixed)
            for name in stage:
                if stats[name].count == 0:
                    unreached.append(name)
                    continue
                final[name] = _calibrated(model, name, layers[name], stats[name], config, report,
                                          final)
            for name in stage:  # the rest of the model now sees this stage quantized
                if name in final:
                    replace_module(model, name, stand_in(final[name], config.method))
        for name in unreached:
            if name in final:
                continue
            final[name] = _data_free(layers[name], QuantConfig(
                group_size=config.group_size, symmetric=config.symmetric,
                clip_search=config.clip_search))
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
