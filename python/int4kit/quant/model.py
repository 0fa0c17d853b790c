"""quantize_model: swap every eligible nn.Linear of a model for an Int4Linear, in place."""
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import torch.nn as nn

from ..nn import Int4Linear
from .config import QuantConfig


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of what model.state_dict() would save (for Int4Linear: the canonical format)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass
class QuantReport:
    swapped: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (layer name, reason)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")

    def __str__(self) -> str:
        lines = [f"int4kit: swapped {len(self.swapped)} Linear layers, skipped {len(self.skipped)}",
                 f"  model size {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} "
                 f"MiB ({self.compression:.2f}x smaller)"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None, calib_data=None,
                   skip: Iterable[str] = (),
                   filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> QuantReport:
    """Replaces every eligible nn.Linear in `model` by an Int4Linear, in place.

    skip: layer names (or fnmatch patterns such as "classifier*") to leave in full precision.
    filter_fn(name, module) -> bool: only layers for which it returns True are quantized.
    calib_data: batches for calibration-based methods; round-to-nearest needs none.
    Returns a QuantReport: layers swapped and skipped (with the reason), bytes before and after.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself an nn.Linear, which quantize_model cannot replace in place; "
                        "use int4kit.Int4Linear.from_linear(model, group_size, symmetric) instead")
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be an int4kit.QuantConfig, got {type(config).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    report = QuantReport(bytes_before=state_dict_bytes(model))
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _matches(name, skip):
            report.skipped.append((name, "named in skip"))
        elif filter_fn is not None and not filter_fn(name, module):
            report.skipped.append((name, "filter_fn returned False"))
        elif config.group_size != -1 and config.group_size > module.in_features:
            report.skipped.append((name, f"in_features {module.in_features} < group_size "
                                         f"{config.group_size}"))
        else:
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int4Linear.from_linear(linear, config.group_size, config.symmetric))
        report.swapped.append(name)
    report.bytes_after = state_dict_bytes(model)
    return report
