"""QuantConfig: what quantize_model does to each eligible layer."""
from dataclasses import dataclass

METHODS = ("rtn",)  # calibration-based methods (gptq, awq, hqq) come with the calibration issue


@dataclass(frozen=True)
class QuantConfig:
    """group_size: columns sharing one scale and zero point (-1: per output channel).
    symmetric: zero point fixed at 8 (no zeros tensor) instead of one per group.
    method: "rtn" (round-to-nearest)."""
    group_size: int = 128
    symmetric: bool = True
    method: str = "rtn"

    def __post_init__(self):
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (
                self.group_size == -1 or (self.group_size > 0 and self.group_size % 2 == 0)):
            raise ValueError(f"QuantConfig.group_size must be -1 (per channel) or a positive even "
                             f"int, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantConfig.symmetric must be a bool, got {self.symmetric!r}")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method {self.method!r} is unknown; supported: "
                             f"{', '.join(METHODS)}")
