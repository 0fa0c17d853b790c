"""QuantConfig: what quantize_model does to each eligible layer."""
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..formats.native import SCALE_DTYPES, dtype_name
from ..nn import check_act_quant
from .rtn import BITS, PER_TENSOR

METHODS = ("rtn", "hqq", "gptq", "awq", "awq+gptq", "adaround")
RECONSTRUCTIONS = ("layer", "block")
DATA_FREE_METHODS = ("rtn", "hqq")  # the others need calib_data
INT8_METHODS = ("rtn", "gptq")  # what QuantConfig(bits=8) runs


def _int_at_least(value, low: int) -> bool:
    """value is an int (a bool is not) and at least low."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class QuantConfig:
    """group_size: columns sharing one scale and zero point (-1: per output channel; "tensor":
      one for the whole matrix, stored as per-channel scales that are all equal).
    symmetric: zero point fixed at 8 (no zeros tensor) instead of one per group.
    method: "rtn" (round-to-nearest; data-free), "hqq" (half-quadratic fit of zero point / scale;
      data-free), "gptq" (Hessian-based error compensation), "awq" (activation-aware input-channel
      scaling plus clipping search) or "awq+gptq" (AWQ's scaling, then GPTQ); the last three need
      calib_data in quantize_model.
    clip_search: shrink each group's range to the MSE-optimal factor (rtn: weight MSE; gptq: MSE
      weighted by the input's second moment; awq always searches, on the output error).
    damp: GPTQ damping, as a fraction of the mean of the Hessian diagonal (0.2 by default: on
      MiniLM it generalised better to text unlike the calibration text than the paper's 0.01 or
      0.1, in every setting measured; docs/ACCURACY.md); layer-wise AdaRound's objective is
      damped the same way (0.9712 -> 0.9731 out of domain on MiniLM, docs/QAT.md).
    block_size: GPTQ lazy-update block (columns).
    act_order: GPTQ visits columns by decreasing Hessian diagonal (with static groups).
    refine_rounds: GPTQ (gptq, awq+gptq) then alternates this many least-squares refits of each
      group's scale and zero point to the codes with GPTQ passes on the refitted grid (0: the
      paper's single pass; each round costs a GPTQ pass and about half another; docs/ACCURACY.md);
      layer-wise AdaRound alternates them with coordinate-descent polishing.
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
      with `seed`). The learned codes are then polished by at most adaround_polish_sweeps sweeps
      of coordinate descent on the damped layer objective (quant/descent.py: single codes move by
      one step, also past the floor / ceiling pair AdaRound chooses from; 0 turns it off).
      Block-wise, adaround_layer_weight weighs the block's layers' own damped objectives (each
      relative to plain rounding's) against the block loss (0: the block loss alone; holds each
      layer's damped Hessian through the block's learning), and refine_rounds refits each
      layer's grid to its learned codes as layer-wise.
    scale_dtype: the dtype scales and zero points are stored in (and rounded to before any code
      is computed): None for the weight's dtype, or torch.float32 / bfloat16 / float16. A
      float32 model's group-128 asymmetric layer costs 4.5 bits per weight with float32 scales
      and 4.25 with 16-bit ones (QuantReport.bits_per_weight).
    bits: 4 (Int4Linear, the default) or 8 (Int8Linear: weight-only int8, codes 0..255 with a
      symmetric zero point of 128; methods rtn and gptq, without refine_rounds or act_quant), the
      precision a mixed-precision plan keeps its most sensitive layers at."""
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
    adaround_polish_sweeps: int = 20
    adaround_layer_weight: float = 1.0
    reconstruction: str = "layer"
    seed: int = 0
    scale_dtype: Optional[torch.dtype] = None
    bits: int = 4

    def __post_init__(self):
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"QuantConfig.bits must be 4 (Int4Linear) or 8 (Int8Linear), got "
                             f"{self.bits!r}")
        if self.bits == 8 and (self.method not in INT8_METHODS or self.refine_rounds
                               or self.act_quant is not None):
            raise ValueError(f"QuantConfig(bits=8) quantizes with method 'rtn' or 'gptq' (got "
                             f"{self.method!r}), refine_rounds=0 (got {self.refine_rounds!r}) and "
                             f"act_quant=None (got {self.act_quant!r})")
        if self.group_size != PER_TENSOR and (
                not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (
                    self.group_size == -1 or (self.group_size > 0 and self.group_size % 2 == 0))):
            raise ValueError(f"QuantConfig.group_size must be -1 (per channel), 'tensor' (one "
                             f"scale per matrix) or a positive even int, got {self.group_size!r}")
        if self.group_size == PER_TENSOR and (self.method == "hqq" or self.refine_rounds):
            raise ValueError("QuantConfig(group_size='tensor') keeps one scale and zero point per "
                             "matrix, which hqq and refine_rounds (fits per group) would not; "
                             "use method rtn, gptq, awq, awq+gptq or adaround, refine_rounds=0")
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
        for name in ("adaround_iters", "adaround_polish_sweeps"):
            if not _int_at_least(getattr(self, name), 0):
                raise ValueError(f"QuantConfig.{name} must be a non-negative int, got "
                                 f"{getattr(self, name)!r}")
        for name, low in (("adaround_lr", "positive"), ("adaround_reg", "non-negative"),
                          ("adaround_layer_weight", "non-negative")):
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
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES.values():
            raise ValueError(f"QuantConfig.scale_dtype must be None (the weight's dtype), "
                             f"torch.float32, torch.bfloat16 or torch.float16, got "
                             f"{self.scale_dtype!r}")
        if self.calib_max_tokens is not None and not _int_at_least(self.calib_max_tokens, 1):
            raise ValueError(f"QuantConfig.calib_max_tokens must be None or a positive int, got "
                             f"{self.calib_max_tokens!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method not in DATA_FREE_METHODS

    def to_dict(self) -> dict:
        """The fields as JSON values (scale_dtype by name): from_dict's input."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["scale_dtype"] = None if self.scale_dtype is None else dtype_name(self.scale_dtype)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "QuantConfig":
        """The QuantConfig of to_dict's output (unknown keys are an error)."""
        if not isinstance(values, dict):
            raise TypeError(f"a QuantConfig dict must be a dict, got {type(values).__name__}")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s): {sorted(unknown)}")
        values = dict(values)
        name = values.get("scale_dtype")
        if name is not None:
            if name not in SCALE_DTYPES:
                raise ValueError(f"QuantConfig.scale_dtype must be one of {list(SCALE_DTYPES)}, "
                                 f"got {name!r}")
            values["scale_dtype"] = SCALE_DTYPES[name]
        return cls(**values)

    def scale_dtype_for(self, weight: torch.Tensor) -> torch.dtype:
        """The dtype a layer with this weight stores its scales and zero points in."""
        return self.scale_dtype or weight.dtype
