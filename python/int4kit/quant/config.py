"""QuantConfig: what quantize_model does to each eligible layer."""
from dataclasses import dataclass
from typing import Optional

from ..nn import check_act_quant

METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "adaround")
RECONSTRUCTIONS = ("layer", "block")
DATA_FREE_METHODS = ("rtn", "hqq")  # the others need calib_data


def _int_at_least(value, low: int) -> bool:
    """value is an int (a bool is not) and at least low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class QuantConfig:
    """group_size: columns sharing one scale and zero point (-1: per output channel).
    symmetric: zero point fixed at 8 (no zeros tensor) instead of one per group.
    method: "rtn" (round-to-nearest; data-free), "hqq" (half-quadratic fit of zero point / scale;
      data-free), "gptq" (Hessian-based error compensation), "awq" (activation-aware input-channel
      scaling plus clipping search) or "awq+gptq" (AWQ's scaling, then GPTQ); the last three need
      calib_data in quantize_model.
    clip_search: shrink each group's range to the MSE-optimal factor (rtn: weight MSE; gptq: MSE
      weighted by the input's second moment; awq always searches, on the output error).
    damp: GPTQ damping, as a fraction of the mean of the Hessian diagonal (0.2 by default: on
      MiniLM it generalised better to text unlike the calibration text than the paper's 0.01 or
      0.1, in every setting measured; docs/ACCURACY.md).
    block_size: GPTQ lazy-update block (columns).
    act_order: GPTQ visits columns by decreasing Hessian diagonal (with static groups).
    refine_rounds: GPTQ (gptq, awq+gptq) then alternates this many least-squares refits of each
      group's scale and zero point to the codes with GPTQ passes on the refitted grid (0: the
      paper's single pass; each round costs a GPTQ pass and about half another; docs/ACCURACY.md).
    calib_max_tokens: at most this many (non-padding) tokens per layer are used (None: all).
    norm_weighting: in the calibration statistics (gptq, awq, awq+gptq), weight each token of a
      layer by 1 / sigma_t^2 of the input of the first LayerNorm / RMSNorm called after the layer
      (that norm divides the layer's output error, as it reaches it, by sigma_t); layers with no
      norm after them are unchanged. On by default: on MiniLM
      it lifts per-channel symmetric GPTQ from 0.955 to 0.968 out of domain and leaves group 128
      about where it was (docs/ACCURACY.md).
    show_progress: tqdm bars over stages and batches, when tqdm is installed.
    act_quant: None (W4A16) or "int8" (W4A8: activations quantized per token at run time; the
      weights are the same).
    method "adaround" (quant/adaround.py): round-to-nearest's grid (clip_search as for gptq), each
      weight's rounding direction learned for adaround_iters Adam steps (learning rate
      adaround_lr) against the reconstruction error (relative to plain rounding's) plus
      adaround_reg times the mean rounding regulariser; reconstruction "layer" (each layer's
      output, through its Hessian: exact and deterministic) or "block" (every layer of a
      transformer block at once against the block's full-precision output, BRECQ; batches drawn
      with `seed`)."""
    group_size: int = 128
    symmetric: bool = True
    method: str = "rtn"
    clip_search: bool = False
    damp: float = 0.2
    block_size: int = 128
    act_order: bool = False
    refine_rounds: int = 0
    calib_max_tokens: Optional[int] = None
    norm_weighting: bool = True
    show_progress: bool = False
    act_quant: Optional[str] = None
    adaround_iters: int = 1000
    adaround_lr: float = 3e-2
    adaround_reg: float = 10.0
    reconstruction: str = "layer"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (
                self.group_size == -1 or (self.group_size > 0 and self.group_size % 2 == 0)):
            raise ValueError(f"QuantConfig.group_size must be -1 (per channel) or a positive even "
                             f"int, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantConfig.symmetric must be a bool, got {self.symmetric!r}")
        check_act_quant(self.act_quant)
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method {self.method!r} is unknown; supported: "
                             f"{', '.join(METHODS)}")
        for name in ("clip_search", "act_order", "show_progress", "norm_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not (
                0 <= self.damp < 1e3):
            raise ValueError(f"QuantConfig.damp must be a non-negative number, got {self.damp!r}")
        if not _int_at_least(self.block_size, 1):
            raise ValueError(f"QuantConfig.block_size must be a positive int, got {self.block_size!r}")
        if not _int_at_least(self.refine_rounds, 0):
            raise ValueError(f"QuantConfig.refine_rounds must be a non-negative int, got "
                             f"{self.refine_rounds!r}")
        if not _int_at_least(self.adaround_iters, 0):
            raise ValueError(f"QuantConfig.adaround_iters must be a non-negative int, got "
                             f"{self.adaround_iters!r}")
        for name, low in (("adaround_lr", "positive"), ("adaround_reg", "non-negative")):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
                    0 <= value < float("inf")) or (low == "positive" and value == 0):
                raise ValueError(f"QuantConfig.{name} must be a {low} number, got {value!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"QuantConfig.reconstruction must be 'layer' or 'block', got "
                             f"{self.reconstruction!r}")
        if self.reconstruction == "block" and self.method != "adaround":
            raise ValueError(f"QuantConfig.reconstruction='block' applies to method 'adaround', "
                             f"not {self.method!r}")
        if not _int_at_least(self.seed, 0):
            raise ValueError(f"QuantConfig.seed must be a non-negative int, got {self.seed!r}")
        if self.calib_max_tokens is not None and not _int_at_least(self.calib_max_tokens, 1):
            raise ValueError(f"QuantConfig.calib_max_tokens must be None or a positive int, got "
                             f"{self.calib_max_tokens!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method not in DATA_FREE_METHODS
