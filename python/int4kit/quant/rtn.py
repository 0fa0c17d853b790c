"""Shared quantization arithmetic for every method, in plain PyTorch (float32 unless noted).

Every method ends in the same place: integer codes 0..15 [N, K], scales [N, groups] and zero points
[N, groups] (8 when symmetric) that follow the canonical rules of docs/FORMAT.md:

* the scale is rounded to the weight's dtype before any code is computed, and a scale of 0 becomes 1;
* codes are `clamp(round(w / s + z), 0, 15)` for the stored (s, z), so `w ~ (q - z) * s`;
* zero points are integers for RTN, AWQ and plain GPTQ; HQQ's and refined GPTQ's (refine_rounds)
  are fractional, rounded to the weight dtype.

`to_int4linear` packs them and builds an `Int4Linear` with `Int4Linear.from_quantized`, so every
method runs on the existing fused kernels. With `bits=8` (rtn and the GPTQ pass) the codes are
0..255 with a symmetric zero point of 128, and `to_int4linear(..., bits=8)` builds an
`Int8Linear`.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..nn import Int4Linear, Int8Linear, QuantLinear

MAX_CODE = 15
SYMMETRIC_ZERO = 8.0
BITS = (4, 8)  # int4 (Int4Linear) and int8 (Int8Linear) weights


def max_code(bits: int = 4) -> int:
    """The largest code of `bits`-bit weights: 15 or 255."""
    return (1 << bits) - 1


def symmetric_zero(bits: int = 4) -> float:
    """The zero point of symmetric `bits`-bit weights: 8 or 128."""
    return float(1 << (bits - 1))
# the shrink factors the clipping search tries (1.0 first: ties keep the plain min/max range)
CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 .. 0.5


SMALL_WORK = 1 << 20  # elements per op below which extra intra-op threads cost more than they give


@contextlib.contextmanager
def threads_for(elements: int):
    """One intra-op thread while the ops are small (thread hand-offs dominate there, badly so on a
    loaded machine); the caller's setting otherwise."""
    before = torch.get_num_threads()
    if elements < SMALL_WORK and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# QuantConfig(group_size=PER_TENSOR): one scale and zero point for the whole matrix, stored in the
# per-channel format (group size -1) with every row's scale and zero point equal
PER_TENSOR = "tensor"


def group_size_of(group_size, K: int) -> int:
    """Columns per group: K per channel (-1) and per tensor."""
    return K if group_size in (-1, PER_TENSOR) else group_size


def stored_group_size(group_size) -> int:
    """The group size the format stores: per tensor is per channel with equal rows."""
    return -1 if group_size == PER_TENSOR else group_size


def wider_than(group_size, in_features: int) -> bool:
    """A group of group_size columns does not fit in_features (per channel and per tensor
    always fit)."""
    return group_size_of(group_size, in_features) > in_features


def tensor_wide(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group ranges [N, groups] widened to the whole tensor's range, in every entry."""
    return lo.amin().expand_as(lo), hi.amax().expand_as(hi)


def grouped(w: torch.Tensor, G: int) -> torch.Tensor:
    """[N, K] -> [N, groups, G], the tail group zero-padded (zero is always inside the range)."""
    N, K = w.shape
    groups = -(-K // G)
    return F.pad(w, (0, groups * G - K)).view(N, groups, G)


def ungrouped(wg: torch.Tensor, K: int) -> torch.Tensor:
    N, groups, G = wg.shape
    return wg.reshape(N, groups * G)[:, :K]


def store_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounds a scale to the stored dtype (as FORMAT.md requires) and maps 0 (or underflow) to 1."""
    s = s.to(dtype).to(s.dtype)
    return torch.where(s > 0, s, torch.ones_like(s))


def minmax_params(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool,
                  dtype: torch.dtype, bits: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """RTN scale and zero point of `bits`-bit codes for a range [lo, hi] with lo <= 0 <= hi (any
    shape): symmetric s = max|w| / (max_code / 2) (7.5 or 127.5) around the fixed zero point."""
    top = max_code(bits)
    if symmetric:
        s = store_scale(torch.maximum(hi, -lo) / (top / 2), dtype)
        z = torch.full_like(s, symmetric_zero(bits))
    else:
        s = store_scale((hi - lo) / top, dtype)
        z = torch.round(-lo / s).clamp(0, top)
    return s, z


def range_of(wg: torch.Tensor, ratio=1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    lo = wg.amin(dim=-1).clamp(max=0) * ratio
    hi = wg.amax(dim=-1).clamp(min=0) * ratio
    return lo, hi


def fake_quant_grouped(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                       bits: int = 4) -> torch.Tensor:
    """Quantize-dequantize [..., G] with per-group s, z of shape [...]."""
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, max_code(bits))
    return (q - z[..., None]) * s[..., None]


def unclamped_codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                    fractional: Optional[bool] = None) -> torch.Tensor:
    """round(w / s) + z for grouped w [N, groups, G] and per-group s, z [N, groups], before the
    clamp to 0..15; round(w / s + z) when some z is fractional (HQQ, refined GPTQ, LSQ+), which
    `fractional` says for a slice of a larger z (None: read it off z)."""
    if fractional is None:
        fractional = not torch.equal(z, torch.round(z))
    if not fractional:
        return torch.round(wg / s[..., None]) + z[..., None]  # the kernels' / reference's order
    return torch.round(wg / s[..., None] + z[..., None])


CODE_ROWS = 256  # rows per slice in codes_for: float temporaries of [256, K], not [N, K]


def codes_for(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int,
              codes_dtype: torch.dtype = torch.int64, bits: int = 4) -> torch.Tensor:
    """Codes [N, K] (codes_dtype) of w for per-group s, z [N, groups]; z may be fractional (HQQ).
    Computed in slices of rows (the same values), so the float temporaries stay small."""
    N, K = w.shape
    fractional = not torch.equal(z, torch.round(z))
    codes = torch.empty(N, K, dtype=codes_dtype)
    for r0 in range(0, N, CODE_ROWS):
        rows = slice(r0, r0 + CODE_ROWS)
        q = unclamped_codes(grouped(w[rows].float(), G), s[rows], z[rows], fractional)
        codes[rows] = ungrouped(q.clamp_(0, max_code(bits)), K)
    return codes


def dequant(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int) -> torch.Tensor:
    K = codes.shape[1]
    cg = grouped(codes.to(s.dtype), G)
    return ungrouped((cg - z[..., None]) * s[..., None], K)


def rtn(w: torch.Tensor, group_size: int, symmetric: bool, dtype: Optional[torch.dtype] = None,
        clip_search: bool = False, channel_weight: Optional[torch.Tensor] = None,
        codes_dtype: torch.dtype = torch.int64, bits: int = 4):
    """Round-to-nearest of w [N, K] (computed in float32) to `bits`-bit codes (4: 0..15, 8:
    0..255). Returns (codes in codes_dtype, s, z), s and z in float32.

    clip_search: per group, shrink the range by each factor of CLIP_GRID and keep the one with the
    smallest squared error, weighted per input channel by `channel_weight` [K] when given (AWQ passes
    the diagonal of X^T X, i.e. the mean squared activation; data-free RTN passes nothing).
    Without clip_search the result is bit-identical to int4kit.reference.quantize.
    group_size PER_TENSOR: one range (and one clipping factor) for the whole matrix; s and z
    come back [N, 1] with equal rows.
    """
    dtype = dtype or w.dtype
    w = w.float()
    K = w.shape[1]
    G = group_size_of(group_size, K)
    per_tensor = group_size == PER_TENSOR
    wg = grouped(w, G)
    lo, hi = range_of(wg)
    if per_tensor:
        lo, hi = tensor_wide(lo, hi)
    s, z = minmax_params(lo, hi, symmetric, dtype, bits)
    if clip_search:
        cw = None if channel_weight is None else grouped(channel_weight.float()[None], G)
        best = _group_err(wg, s, z, cw, per_tensor, bits)
        for ratio in CLIP_GRID[1:]:
            s_r, z_r = minmax_params(lo * ratio, hi * ratio, symmetric, dtype, bits)
            err = _group_err(wg, s_r, z_r, cw, per_tensor, bits)
            better = err < best
            best = torch.where(better, err, best)
            s = torch.where(better, s_r, s)
            z = torch.where(better, z_r, z)
    return codes_for(w, s, z, G, codes_dtype, bits), s, z


def _group_err(wg, s, z, cw, per_tensor=False, bits=4):
    """Squared error of each group [N, groups] (weighted per input channel by cw), or with
    per_tensor of the whole matrix, in every entry."""
    d = (fake_quant_grouped(wg, s, z, bits) - wg) ** 2
    if cw is not None:
        d = d * cw
    err = d.sum(-1)
    return err.sum().expand_as(err) if per_tensor else err


def to_int4linear(linear: nn.Module, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                  group_size: int, symmetric: bool, bias: Optional[torch.Tensor] = None,
                  input_scale: Optional[torch.Tensor] = None,
                  scale_dtype: Optional[torch.dtype] = None, bits: int = 4) -> QuantLinear:
    """Packs (codes, s, z) into the canonical format and builds an Int4Linear (bits 8: an
    Int8Linear) on linear's device.

    The scale and zero dtype is scale_dtype (default: linear.weight's dtype); input_scale is kept
    in the weight's dtype; bias defaults to linear.bias."""
    weight = linear.weight
    dtype = scale_dtype or weight.dtype
    codes = codes.to(torch.uint8).cpu()
    qweight = codes if bits == 8 else reference.pack(codes)
    scales = s.to(dtype).cpu()
    zeros = None if symmetric else z.to(dtype).cpu()
    if bias is None and linear.bias is not None:
        bias = linear.bias.detach()
    module = (Int8Linear if bits == 8 else Int4Linear).from_quantized(qweight, scales, zeros, stored_group_size(group_size),
                                       linear.in_features,
                                       bias=bias, device=weight.device)
    if input_scale is not None:
        module.input_scale = input_scale.detach().to(device=weight.device, dtype=weight.dtype)
    return module


OBJECTIVE_ROWS = 256  # rows of W per slice in the objectives: [256, K] products, not [N, K]


def layer_objective(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the summed squared output error over the calibration
    tokens when H = X^T X. In H's dtype (float64 up to K = 4096, calibration.matrix_dtype),
    summed in float64, in slices of rows so that memory stays at a few [256, K] products."""
    total = 0.0
    for r0 in range(0, w.shape[0], OBJECTIVE_ROWS):
        rows = slice(r0, r0 + OBJECTIVE_ROWS)
        d = w[rows].to(H.dtype) - w_hat[rows].to(H.dtype)
        total += float(((d @ H) * d).double().sum())
    return total


def codes_objective(w: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                    G: int, H: torch.Tensor) -> float:
    """layer_objective(w, dequant(codes, s, z, G), H), dequantizing one slice of rows at a time."""
    return float(row_objectives(w, codes, s, z, G, H).sum())


def row_objectives(w: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   G: int, H: torch.Tensor) -> torch.Tensor:
    """[N] float64: each row's (w - w_hat) H (w - w_hat)^T, w_hat = dequant(codes, s, z, G), in
    H's dtype, in slices of rows as layer_objective."""
    objective = torch.empty(w.shape[0], dtype=torch.float64)
    for r0 in range(0, w.shape[0], OBJECTIVE_ROWS):
        rows = slice(r0, r0 + OBJECTIVE_ROWS)
        d = w[rows].to(H.dtype) - dequant(codes[rows], s[rows], z[rows], G).to(H.dtype)
        objective[rows] = ((d @ H) * d).double().sum(1)
    return objective
