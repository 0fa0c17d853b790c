"""FakeQuantLinear: an nn.Linear that computes with its int4-quantized weight, for training.

The numerics contract (docs/QAT.md): the fake-quantized weight is exactly what an Int4Linear
built from the same codes, scales and zero points dequantizes to. Each forward
  1. takes the effective scale s and zero point z per group (dynamic: round-to-nearest of the
     current weight; frozen: fixed buffers; learned / codes_frozen: Parameters), rounded to the
     stored scale dtype (a straight-through estimator carries the gradient past that rounding);
  2. computes the codes with `quant.rtn.codes_for`, the function every post-training method uses
     for the format (round half to even, clamped to 0..15), or takes the frozen codes;
  3. dequantizes in float32 as `(q - z) * s`, the same expression, in the same precision, as
     `ops.dequantize`, whatever autocast says; the matmul then runs in x's dtype (or autocast's).
So `convert` can store the very codes, scales and zero points of the last forward, and
`ops.dequantize` of them equals the fake-quantized weight bit for bit.

Gradients: straight-through for the weight inside the clamp range (zero where a code clamps);
LSQ (Esser et al., 2020) for the scale, d w_hat / d s = (q - z) - [inside] * w / s; LSQ+
(Bhalgat et al., 2020) for the zero point in code units, d w_hat / d z = -s * [clamped]. Both
quantizer gradients are scaled by 1 / sqrt(group size * Qp) (Qp = 7 symmetric, 15 asymmetric).
"""
import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..nn import Int4Linear, transform_input
from ..quant.rtn import (MAX_CODE, SYMMETRIC_ZERO, codes_for, dequant, group_size_of, grouped,
                         rtn, unclamped_codes, ungrouped)

QPARAM_MODES = ("dynamic", "frozen", "learned", "codes_frozen")
ACT_FAKE_QUANTS = (None, "int8")


class QATError(ValueError):
    """A quantization-aware training state that cannot give a valid int4 layer (NaN or inf
    weights, a learned scale at or below zero, fake quantization disabled at convert)."""


class _FakeQuantize(torch.autograd.Function):
    """w [N, K] float32, s and z [N, groups] float32 (already in the stored dtype's values) ->
    (q - z) * s with q = codes_for(w, s, z, G); LSQ / LSQ+ / straight-through gradients."""

    @staticmethod
    def forward(ctx, w, s, z, G):
        q = codes_for(w, s, z, G).to(torch.float32)
        ctx.save_for_backward(w, s, z, q)
        ctx.G = G
        return dequant(q, s, z, G)

    @staticmethod
    def backward(ctx, grad):
        w, s, z, q = ctx.saved_tensors
        G, K = ctx.G, w.shape[1]
        wg = grouped(w, G)  # the padded tail has w = 0 and grad = 0: it adds nothing
        t = wg / s[..., None]
        qg = grouped(q, G)
        unclamped = unclamped_codes(wg, s, z)  # a code clamped where this lies outside 0..15
        inside = (unclamped >= 0) & (unclamped <= MAX_CODE)
        g = grouped(grad, G)
        grad_w = grad_s = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_w = ungrouped(g * inside, K)
        if ctx.needs_input_grad[1]:
            grad_s = (g * ((qg - z[..., None]) - inside * t)).sum(-1)
        if ctx.needs_input_grad[2]:
            grad_z = (g * (~inside) * -s[..., None]).sum(-1)
        return grad_w, grad_s, grad_z, None


# Both helpers add `v - v.detach()` (exactly 0 for finite v) to the value wanted, so the value is
# bit-exact (convert stores it) while the gradient is v's.
def _scaled_grad(p: torch.Tensor, factor: float) -> torch.Tensor:
    """p's value, with its gradient multiplied by factor (LSQ's gradient scale)."""
    scaled = p * factor
    return p.detach() + (scaled - scaled.detach())


def _round_to(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p's value rounded to dtype (kept as float32), gradient passed straight through."""
    return p.detach().to(dtype).float() + (p - p.detach())


def fake_quant_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """x quantized per row (token) to symmetric int8 and back, as W4A8's kernels and
    reference.quantize_activations_int8 do; the gradient passes straight through."""
    codes, scale = reference.quantize_activations_int8(x.detach())
    return x + ((codes * scale).to(x.dtype) - x).detach()


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the int4 fake-quantized weight (module docstring).

    weight: the latent weight (a Parameter; frozen in codes_frozen mode). qparams mode:
      "dynamic": scales and zero points are round-to-nearest of the current weight each step;
      "frozen": fixed buffers `scale`, `zero_point` (from the post-training method);
      "learned": Parameters `scale`, `zero_point` (LSQ / LSQ+) learned with the weight;
      "codes_frozen": buffer `codes` fixed; only `scale` and `zero_point` learn.
    `scale` and `zero_point` are float32 [out_features, groups] (zero_point None when symmetric);
    their values are rounded to `scale_dtype` in every forward. input_scale / input_perm as in
    Int4Linear. `layer_name` names the layer in errors."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, symmetric: bool = True, qparams: str = "learned",
                 scale_dtype: torch.dtype = torch.float32, act_fake_quant: Optional[str] = None,
                 clip_search: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if qparams not in QPARAM_MODES:
            raise ValueError(f"qparams must be one of {QPARAM_MODES}, got {qparams!r}")
        if act_fake_quant not in ACT_FAKE_QUANTS:
            raise ValueError(f"act_fake_quant must be None or 'int8', got {act_fake_quant!r}")
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.qparams = qparams
        self.scale_dtype = scale_dtype
        self.act_fake_quant = act_fake_quant
        self.clip_search = clip_search  # dynamic mode's round-to-nearest
        self.fake_quant_enabled = True
        self.layer_name = ""
        self.method = None  # the post-training method that initialised the codes
        groups = -(-in_features // group_size_of(group_size, in_features))
        shape = (out_features, groups)
        learn = qparams in ("learned", "codes_frozen")
        if qparams == "dynamic":
            self.scale = self.zero_point = None
        else:
            s = torch.ones(shape, device=device)
            z = None if symmetric else torch.full(shape, SYMMETRIC_ZERO, device=device)
            if learn:
                self.scale = nn.Parameter(s)
                self.zero_point = None if z is None else nn.Parameter(z)
            else:
                self.register_buffer("scale", s)
                self.register_buffer("zero_point", z)
        self.register_buffer("codes", torch.full((out_features, in_features), 8, dtype=torch.uint8,
                                                 device=device)
                             if qparams == "codes_frozen" else None)
        self.register_buffer("input_scale", None)
        self.register_buffer("input_perm", None)
        if qparams == "codes_frozen":
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, symmetric: bool,
                    act_fake_quant: Optional[str] = None, clip_search: bool = False,
                    scale_dtype: Optional[torch.dtype] = None) -> "FakeQuantLinear":
        """Dynamic mode: the latent weight is linear's weight (copied); scales are rounded to
        scale_dtype (default: the weight's dtype)."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     group_size, symmetric, "dynamic", scale_dtype or w.dtype, act_fake_quant,
                     clip_search,
                     device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.weight.copy_(w)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    @classmethod
    def from_int4(cls, layer: Int4Linear, qparams: str,
                  act_fake_quant: Optional[str] = None) -> "FakeQuantLinear":
        """Starts from an Int4Linear's codes, scales and zero points: the latent weight is its
        dequantized weight (in the scale dtype), so the first forward computes these codes."""
        if qparams == "dynamic":
            raise ValueError("qparams='dynamic' starts from a dense nn.Linear, not an Int4Linear")
        qweight, scales, zeros = layer.canonical()
        device = scales.device
        module = cls(layer.in_features, layer.out_features, layer.bias is not None,
                     layer.group_size, layer.symmetric, qparams, layer.scale_dtype,
                     act_fake_quant, device=device, dtype=layer.scale_dtype)
        K, G = layer.in_features, group_size_of(layer.group_size, layer.in_features)
        codes = reference.unpack(qweight.cpu(), K).to(device)
        s = scales.float()
        z = torch.full_like(s, SYMMETRIC_ZERO) if zeros is None else zeros.float()
        with torch.no_grad():
            module.weight.copy_(dequant(codes.float(), s, z, G))
            if layer.bias is not None:
                module.bias.copy_(layer.bias)
            module.scale.copy_(s)
            if module.zero_point is not None:
                module.zero_point.copy_(z)
            if module.codes is not None:
                module.codes.copy_(codes)
        for name in ("input_scale", "input_perm"):
            value = getattr(layer, name)
            setattr(module, name, None if value is None else value.detach().clone())
        module.method = layer.method
        return module

    # ---- quantizer ---------------------------------------------------------------------------------
    @property
    def G(self) -> int:
        return group_size_of(self.group_size, self.in_features)

    def _qparams(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(s, z) [N, groups] float32 for this step, rounded to scale_dtype; differentiable in the
        learned modes (LSQ's gradient scale applied)."""
        if self.qparams == "dynamic":
            with torch.no_grad():
                _, s, z = rtn(self.weight.detach(), self.group_size, self.symmetric,
                              self.scale_dtype, clip_search=self.clip_search)
            return s, z
        s, z = self.scale, self.zero_point
        if self.qparams in ("learned", "codes_frozen"):
            qp = 7 if self.symmetric else MAX_CODE
            factor = 1.0 / math.sqrt(self.G * qp)
            s = _scaled_grad(s, factor)
            z = None if z is None else _scaled_grad(z, factor)
        s = _round_to(s.float(), self.scale_dtype)
        z = (torch.full_like(s, SYMMETRIC_ZERO) if z is None
             else _round_to(z.float(), self.scale_dtype))
        return s, z

    def _check(self, w: Optional[torch.Tensor], s: torch.Tensor, z: torch.Tensor) -> None:
        """Refuses what would give garbage codes: NaN or inf weights or qparams, scales <= 0."""
        bad_w = w is not None and not bool(torch.isfinite(w).all())
        bad_q = not bool(torch.isfinite(s).all() & torch.isfinite(z).all())
        if bad_w or bad_q:
            what = "weight" if bad_w else "scale / zero_point"
            raise QATError(f"FakeQuantLinear {self.layer_name or '(unnamed)'}: its {what} holds "
                           f"NaN or inf (training diverged: lower the learning rate, or clip "
                           f"gradients)")
        s = s.detach()
        if bool((s <= 0).any()):
            n, g = (s <= 0).nonzero()[0].tolist()
            raise QATError(f"FakeQuantLinear {self.layer_name or '(unnamed)'}: learned scale of "
                           f"row {n}, group {g} is {float(s[n, g]):.3g}, not positive (the "
                           f"quantizer learning rate is too high for this layer)")

    def _step(self) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(latent weight in float32, or None in codes_frozen mode; s; z) for this step, checked."""
        s, z = self._qparams()
        w = None if self.qparams == "codes_frozen" else self.weight.float()
        self._check(w, s, z)
        return w, s, z

    def fake_quantized_weight(self) -> torch.Tensor:
        """The float32 [out_features, in_features] weight this step computes with (stored column
        order: input_perm and input_scale not applied), differentiable as the module docstring
        says."""
        with _no_autocast(self.weight.device):
            w, s, z = self._step()
            if w is None:
                return dequant(self.codes.float(), s, z, self.G)
            return _FakeQuantize.apply(w, s, z, self.G)

    @torch.no_grad()
    def quantized(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes int64 [N, K], s, z float32 [N, groups]): exactly what the forward uses now."""
        w, s, z = self._step()
        return (self.codes.long() if w is None else codes_for(w, s, z, self.G)), s, z

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = transform_input(x, self.input_perm, self.input_scale)
        if self.fake_quant_enabled:
            if self.act_fake_quant == "int8":
                x = fake_quant_activations_int8(x)
            w = self.fake_quantized_weight()
        else:
            w = self.weight
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", group_size={self.group_size}, "
                f"symmetric={self.symmetric}, qparams={self.qparams!r}, "
                f"scale_dtype={self.scale_dtype}"
                + (f", act_fake_quant={self.act_fake_quant!r}" if self.act_fake_quant else "")
                + ("" if self.fake_quant_enabled else ", fake_quant_enabled=False"))
