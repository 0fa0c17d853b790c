"""prepare_qat -> train -> convert: the quantization-aware training workflow (docs/QAT.md)."""
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

from .. import hf
from ..nn import Int4Linear, replace_module
from ..quant.config import QuantConfig
from ..quant.model import QuantReport, Undo, matches_any, quantize_model, select_layers
from ..quant.rtn import PER_TENSOR, to_int4linear
from .fake_quant import ACT_FAKE_QUANTS, QPARAM_MODES, FakeQuantLinear, QATError


@dataclass(frozen=True)
class QATConfig:
    """base: the post-training quantization that sets the format (group size, symmetry) and the
      starting codes, scales and zero points (any method; gptq, awq and awq+gptq need calib_data).
    qparams: "dynamic" (scales and zero points re-derived by round-to-nearest from the latent
      weight every step; base.method must be "rtn"; the latent weight starts at the dense
      weight), "frozen" (fixed at the base method's), "learned" (LSQ / LSQ+, learned with the
      weight) or "codes_frozen" (the base method's codes kept; only scales and zero points
      learn). Except in dynamic mode the latent weight starts at the base method's dequantized
      weight, so the first step reproduces its codes exactly.
    act_fake_quant: None (W4A16) or "int8" (x fake-quantized per token to int8 as W4A8 runs;
      the converted layers get act_quant="int8")."""
    base: QuantConfig = field(default_factory=QuantConfig)
    qparams: str = "learned"
    act_fake_quant: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.base, QuantConfig):
            raise TypeError(f"QATConfig.base must be an int4kit.QuantConfig, got "
                            f"{type(self.base).__name__}")
        if self.qparams not in QPARAM_MODES:
            raise ValueError(f"QATConfig.qparams must be one of {', '.join(QPARAM_MODES)}, got "
                             f"{self.qparams!r}")
        if self.act_fake_quant not in ACT_FAKE_QUANTS:
            raise ValueError(f"QATConfig.act_fake_quant must be None or 'int8', got "
                             f"{self.act_fake_quant!r}")
        if self.base.act_quant != self.act_fake_quant:
            raise ValueError(f"QATConfig.base.act_quant is {self.base.act_quant!r} but "
                             f"act_fake_quant is {self.act_fake_quant!r}: training must see the "
                             f"activations the converted model will run with; set both alike")
        if self.qparams == "dynamic" and self.base.method != "rtn":
            raise ValueError(f"QATConfig.qparams='dynamic' re-derives round-to-nearest scales "
                             f"every step, so base.method must be 'rtn', got "
                             f"{self.base.method!r}; to start from {self.base.method!r} use "
                             f"'frozen', 'learned' or 'codes_frozen'")
        if self.base.group_size == PER_TENSOR and self.qparams in ("dynamic", "learned",
                                                                   "codes_frozen"):
            raise ValueError(f"QATConfig.qparams={self.qparams!r} sets each row's scale and zero "
                             f"point apart, which base.group_size='tensor' keeps equal; use "
                             f"qparams='frozen'")


@dataclass
class QATReport:
    swapped: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    qparams: str = "learned"
    ptq: Optional[QuantReport] = None  # the base method's run (None in dynamic mode)
    trainable_weights: int = 0  # elements of the latent weights that learn
    trainable_qparams: int = 0  # elements of the scales and zero points that learn

    def __str__(self) -> str:
        lines = [f"int4kit.qat: {len(self.swapped)} FakeQuantLinear layers ({self.qparams}), "
                 f"skipped {len(self.skipped)}",
                 f"  trainable: {self.trainable_weights} weights, {self.trainable_qparams} "
                 f"scales and zero points"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        if self.ptq is not None:
            lines.append("  " + str(self.ptq).replace("\n", "\n  "))
        return "\n".join(lines)


def fake_quant_layers(model: nn.Module) -> Dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def prepare_qat(model: nn.Module, config: Optional[QATConfig] = None, calib_data=None,
                skip: Iterable[str] = (),
                filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> QATReport:
    """Swaps each eligible nn.Linear (and each Int4Linear, whose codes it starts from) of `model`
    for a FakeQuantLinear, in place, and returns a QATReport. skip, filter_fn and calib_data as
    in quantize_model. All or nothing: an error or an interruption leaves the model as it was."""
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself an nn.Linear; prepare_qat swaps the layers inside a "
                        "model (wrap it in an nn.Sequential)")
    config = config if config is not None else QATConfig()
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be an int4kit.qat.QATConfig, got {type(config).__name__}")
    if fake_quant_layers(model):
        raise ValueError("model already holds FakeQuantLinear layers: prepare_qat was run on it")
    base = config.base
    skip = skip if isinstance(skip, str) else tuple(skip)  # read twice below
    targets, skipped = select_layers(model, base.group_size, skip, filter_fn)
    if targets and config.qparams != "dynamic" and base.needs_calibration and calib_data is None:
        raise ValueError(f"QATConfig.base.method {base.method!r} needs calib_data (an iterable of "
                         f"model inputs) to compute the starting codes; pass calib_data=..., or "
                         f"use base method 'rtn' or 'hqq'")
    lifted = [] if config.qparams == "dynamic" else _int4_layers(model, skip, filter_fn)
    if not targets and not lifted:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped[:5]) or "it has no nn.Linear"
        raise ValueError(f"model has no layer prepare_qat can train ({reasons})")
    report = QATReport(skipped=skipped, qparams=config.qparams)
    undo = Undo(model, targets)
    try:
        if config.qparams == "dynamic":
            built = {name: FakeQuantLinear.from_linear(
                model.get_submodule(name), base.group_size, base.symmetric,
                config.act_fake_quant, base.clip_search, base.scale_dtype) for name in targets}
        else:
            if targets:
                wanted = set(targets)
                report.ptq = quantize_model(model, base, calib_data,
                                            filter_fn=lambda name, m: name in wanted)
                undo.restore_attachments()  # save_pretrained must not write a half-trained model
            built = {name: FakeQuantLinear.from_int4(model.get_submodule(name), config.qparams,
                                                     config.act_fake_quant)
                     for name in targets + lifted}
        for name, module in built.items():
            module.layer_name = name
            module.method = module.method or base.method
            replace_module(model, name, module)
    except BaseException:
        undo()
        raise
    report.swapped = list(built)
    for module in built.values():
        report.trainable_weights += module.weight.numel() if module.weight.requires_grad else 0
        report.trainable_qparams += sum(p.numel() for p in (module.scale, module.zero_point)
                                        if isinstance(p, nn.Parameter))
    return report


def _int4_layers(model, skip, filter_fn) -> List[str]:
    """Int4Linear layers prepare_qat starts from as they are (a loaded checkpoint's)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, Int4Linear) and not matches_any(name, skip)
            and (filter_fn is None or filter_fn(name, m))]


def convert(model: nn.Module) -> List[str]:
    """Swaps every FakeQuantLinear of `model` for an Int4Linear holding exactly the codes, scales
    and zero points its forward uses now (act_quant "int8" where it fake-quantized activations).
    All or nothing. Returns the converted layer names."""
    layers = fake_quant_layers(model)
    if not layers:
        raise ValueError("model holds no FakeQuantLinear layer: convert follows "
                         "int4kit.qat.prepare_qat (for a dense model use int4kit.quantize_model)")
    disabled = [name for name, m in layers.items() if not m.fake_quant_enabled]
    if disabled:
        raise QATError(f"fake quantization is disabled in {len(disabled)} layers (first: "
                       f"{disabled[0]!r}): their weights trained without seeing their int4 "
                       f"rounding; call int4kit.qat.set_fake_quant(model, True) and train on "
                       f"before convert")
    built = {}
    for name, fq in layers.items():
        codes, s, z = fq.quantized()
        layer = to_int4linear(fq, codes, s, z, fq.group_size, fq.symmetric,
                              bias=None if fq.bias is None else fq.bias.detach(),
                              input_scale=fq.input_scale, scale_dtype=fq.scale_dtype)
        if fq.input_perm is not None:
            layer.input_perm = fq.input_perm.clone()
        layer.act_quant = fq.act_fake_quant
        layer.method = f"{fq.method}+qat-{fq.qparams}" if fq.method else f"qat-{fq.qparams}"
        built[name] = layer
    undo = Undo(model, list(layers))
    try:
        for name, layer in built.items():
            replace_module(model, name, layer)
        if hf.is_transformers_model(model):
            hf.attach(model)  # model.save_pretrained now writes int4kit's format
    except BaseException:
        undo()
        raise
    return list(built)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turns fake quantization of every FakeQuantLinear on or off (off: the latent weight runs
    as is, for a warm-up or a comparison; convert refuses a model with it off)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    for module in fake_quant_layers(model).values():
        module.fake_quant_enabled = enabled


def param_groups(model: nn.Module, weight_lr: Optional[float] = None,
                 qparam_lr: Optional[float] = None, other_lr: Optional[float] = None) -> List[dict]:
    """Optimizer parameter groups: "weights" (the latent weights of FakeQuantLinear layers),
    "qparams" (learned scales and zero points; no weight decay) and "other" (every other
    trainable parameter: biases, norms, embeddings). Each group's lr is set where given; empty
    groups are left out.

        optimizer = torch.optim.AdamW(int4kit.qat.param_groups(model, 1e-5, 1e-3, 1e-5))"""
    weights, qparams, seen = [], [], set()
    for module in fake_quant_layers(model).values():
        for p in (module.scale, module.zero_point):
            if isinstance(p, nn.Parameter) and p.requires_grad:
                qparams.append(p)
                seen.add(id(p))
        if module.weight.requires_grad:
            weights.append(module.weight)
            seen.add(id(module.weight))
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if not weights and not qparams:
        raise ValueError("model holds no trainable FakeQuantLinear parameter: run "
                         "int4kit.qat.prepare_qat(model, ...) first")
    groups = []
    for name, params, lr, extra in (("weights", weights, weight_lr, {}),
                                    ("qparams", qparams, qparam_lr, {"weight_decay": 0.0}),
                                    ("other", other, other_lr, {})):
        if params:
            group = {"params": params, "name": name, **extra}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    return groups
