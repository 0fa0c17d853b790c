"""AWQ (Lin et al., 2024): activation-aware per-input-channel scaling, then clipping search.

For a layer y = x W^T, scaling input channel k of W by s_k and the input by 1/s_k changes nothing in
full precision, but protects the channels with large activations from rounding error. AWQ searches
s = mean|x|^alpha (normalised so that max(s) * min(s) = 1) over a grid of alpha in [0, 1] and keeps
the alpha whose quantized layer has the smallest output error on the calibration activations:

    err(alpha) = || X W^T - (X / s) Q(W diag(s))^T ||^2 = tr(D H D^T),  D = W - Q(W diag(s)) / s

which the calibration engine's H = X^T X gives exactly, without keeping X. alpha = 0 (s = 1, plain
RTN) is part of the grid, so AWQ is never worse than RTN on that objective. Then, like AWQ's
`auto_clip`, each group's range is shrunk by the factor that minimises that group's own output
error (its block of the scaled Hessian). The caller puts 1/s where it belongs: folded into the op
that produces x when that is a linear map of x alone (a preceding Linear's rows), otherwise in
Int4Linear's `input_scale`.
"""
from typing import Optional

import torch

from .rtn import (CLIP_GRID, PER_TENSOR, codes_for, dequant, fake_quant_grouped, group_size_of,
                  grouped, minmax_params, range_of, rtn, tensor_wide, threads_for)

ALPHA_GRID = tuple(i / 20 for i in range(21))  # 0.0, 0.05, ..., 1.0


def _objective(d: torch.Tensor, H: torch.Tensor) -> float:
    return float(((d @ H) * d).sum())


def scaled_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Hessian of the scaled input x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / s.to(H.dtype)
    return H * inv[:, None] * inv[None, :]


def clip_search_hessian(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool,
                        dtype: torch.dtype, grid=CLIP_GRID):
    """Per group, the range shrink factor in `grid` minimising e_g H_gg e_g^T (the group's own
    output error, as AWQ's auto_clip). Returns (codes, s, z)."""
    with threads_for(w.numel()):
        w = w.float()
        N, K = w.shape
        G = group_size_of(group_size, K)
        wg = grouped(w, G)
        groups = wg.shape[1]
        Hp = torch.nn.functional.pad(H.float(), (0, groups * G - K, 0, groups * G - K))
        Hb = torch.stack([Hp[g * G:(g + 1) * G, g * G:(g + 1) * G] for g in range(groups)])  # [g,G,G]
        lo, hi = range_of(wg)
        per_tensor = group_size == PER_TENSOR
        if per_tensor:
            lo, hi = tensor_wide(lo, hi)
        best = s_best = z_best = None
        for ratio in grid:
            s, z = minmax_params(lo * ratio, hi * ratio, symmetric, dtype)
            e = fake_quant_grouped(wg, s, z) - wg                     # [N, g, G]
            err = torch.einsum("ngi,gij,ngj->ng", e, Hb, e)
            if per_tensor:  # one factor for the whole matrix
                err = err.sum().expand_as(err)
            if best is None:
                best, s_best, z_best = err, s, z
            else:
                better = err < best
                best = torch.where(better, err, best)
                s_best = torch.where(better, s, s_best)
                z_best = torch.where(better, z, z_best)
        return codes_for(w, s_best, z_best, G), s_best, z_best


def awq_scales(w: torch.Tensor, H: torch.Tensor, act_absmean: torch.Tensor, group_size: int,
               symmetric: bool, dtype: Optional[torch.dtype] = None, grid=ALPHA_GRID):
    """Grid search of alpha. Returns (s [K] float32, alpha, error by alpha)."""
    with threads_for(w.numel()):
        dtype = dtype or w.dtype
        w = w.float()
        H = H.float()
        x = act_absmean.float().clamp(min=1e-4)
        errors = {}
        best_alpha, best_err, best_s = None, float("inf"), None
        for alpha in grid:
            s = x.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            codes, sq, zq = rtn(w * s[None, :], group_size, symmetric, dtype)
            d = w - dequant(codes, sq, zq, group_size_of(group_size, w.shape[1])) / s[None, :]
            err = _objective(d, H)
            errors[alpha] = err
            if err < best_err:
                best_alpha, best_err, best_s = alpha, err, s
        return best_s, best_alpha, errors


def awq(w: torch.Tensor, H: torch.Tensor, act_absmean: torch.Tensor, group_size: int,
        symmetric: bool, dtype: Optional[torch.dtype] = None, clip_search: bool = True):
    """Returns (codes, s_q, z_q, s): codes/s_q/z_q quantize W diag(s); the input must be x / s."""
    dtype = dtype or w.dtype
    s, _, _ = awq_scales(w, H, act_absmean, group_size, symmetric, dtype)
    ws = w.float() * s[None, :]
    if clip_search:
        codes, sq, zq = clip_search_hessian(ws, scaled_hessian(H.float(), s), group_size,
                                            symmetric, dtype)
    else:
        codes, sq, zq = rtn(ws, group_size, symmetric, dtype)
    return codes, sq, zq, s
