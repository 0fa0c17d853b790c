"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), data-free.

The paper fits the zero point (and keeps the scale) of each group by minimising a sparsity-promoting
lp norm (p < 1) of the quantization error, phi(W - Q^-1(Q(W))), with half-quadratic splitting:
an auxiliary error variable W_e is alternated with the quantizer parameters,

    W_e <- shrink_lp(W - Q^-1(Q(W)), beta)                    (generalized soft threshold)
    z   <- mean(Q(W) - (W - W_e) / s)                          (closed form, per group)
    beta <- kappa * beta

stopping when the mean absolute error stops falling. Choices made here (docs/ACCURACY.md):

* asymmetric: the scale comes from the group's min/max **without** forcing 0 into the range (HQQ's
  own initialisation), the zero point is fractional (FORMAT.md allows it) and is what the loop fits;
  after the loop, scale and zero point are polished in l2: for the current codes, the
  least-squares line w ~ s * q + b gives both (z = -b / s), the codes are re-rounded, twice, and a
  group keeps the result only where its squared error falls (the "scale" half of the issue, and
  it removes the lp fit's bias: on MiniLM, group 128, the lp loop alone was 0.004 below RTN in
  embedding cosine, with the polish it is level).
* symmetric: the zero point is fixed at 8 by the format, so the same loop fits the scale instead,
  with the closed-form update s <- <q - 8, W - W_e> / <q - 8, q - 8>.
* zero points and scales are rounded to the weight dtype inside the loop, so the codes always
  belong to what is stored. Computed in float32 (float64 in the tests' oracle).
* last, each group keeps the result above or the MSE-clipped round-to-nearest range (rtn with
  clip_search), whichever has the lower squared error: the lp objective favours sparse errors,
  and for ~45% of MiniLM's groups at group size 128 the clipped RTN range has the lower squared
  error (mean embedding cosine out-of-domain: 0.956 without this step, 0.962 with it).
"""
from typing import Optional

import torch

from .rtn import (MAX_CODE, SYMMETRIC_ZERO, codes_for, group_size_of, grouped, minmax_params,
                  range_of, rtn, store_scale, threads_for)

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERS = 20
LS_ROUNDS = 2


def shrink_lp(x: torch.Tensor, beta: float, p: float = LP_NORM) -> torch.Tensor:
    """Generalized soft-thresholding operator of the paper (prox of |x|^p / beta)."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * torch.pow(x.abs() + 1e-8, p - 1))


def hqq(w: torch.Tensor, group_size: int, symmetric: bool, dtype: Optional[torch.dtype] = None,
        iters: int = ITERS, lp_norm: float = LP_NORM, beta: float = BETA, kappa: float = KAPPA,
        compute_dtype: torch.dtype = torch.float32):
    """Returns (codes [N, K] int64, s [N, groups], z [N, groups]) with s and z in compute_dtype."""
    with threads_for(w.numel()):
        dtype = dtype or w.dtype
        K = w.shape[1]
        G = group_size_of(group_size, K)
        wf = w.to(compute_dtype)
        wg = grouped(wf, G)
        # the zero-padded tail of the last group must not take part in the fit
        valid = grouped(torch.ones_like(wf), G)

        def rnd(t):  # round to the stored dtype
            return t.to(dtype).to(compute_dtype)

        if symmetric:
            s, z = minmax_params(*range_of(wg), True, dtype)
            s, z = s.to(compute_dtype), z.to(compute_dtype)
        else:
            lo = torch.where(valid > 0, wg, torch.full_like(wg, float("inf"))).amin(-1)
            hi = torch.where(valid > 0, wg, torch.full_like(wg, float("-inf"))).amax(-1)
            s = store_scale((hi - lo) / MAX_CODE, dtype).to(compute_dtype)
            z = rnd(-lo / s)  # fractional, and free to leave 0..15 (a group of one sign)

        def quant(s, z):
            q = torch.round(wg / s[..., None] + z[..., None]).clamp(0, MAX_CODE)
            return q, (q - z[..., None]) * s[..., None]

        def err_of(s, z):
            return ((quant(s, z)[1] - wg).abs() * valid).sum() / valid.sum()

        best_err = float("inf")
        best = (s, z)
        for _ in range(iters):
            q, w_r = quant(s, z)
            w_e = shrink_lp((wg - w_r) * valid, beta, lp_norm)
            target = (wg - w_e) * valid
            if symmetric:
                qc = (q - SYMMETRIC_ZERO) * valid
                den = (qc * qc).sum(-1)
                s_new = (qc * target).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))
                s = torch.where(den > 0, store_scale(s_new.abs(), dtype).to(compute_dtype), s)
            else:
                z = rnd(((q - target / s[..., None]) * valid).sum(-1) / valid.sum(-1))
            beta *= kappa
            err = float(err_of(s, z))
            if err < best_err:
                best_err, best = err, (s, z)
            else:
                break
        s, z = best
        if not symmetric:
            # l2 polish: for the current codes, the least-squares line w ~ s * q + b (both s and
            # z = -b / s refitted, so the group's mean error is 0), codes re-rounded; kept per
            # group only where the squared error falls
            e_best = (((quant(s, z)[1] - wg) * valid) ** 2).sum(-1)
            n = valid.sum(-1)
            for _ in range(LS_ROUNDS):
                q, _ = quant(s, z)
                mq = (q * valid).sum(-1) / n
                mw = (wg * valid).sum(-1) / n
                cq = (q - mq[..., None]) * valid
                var = (cq * cq).sum(-1)
                cov = (cq * (wg - mw[..., None])).sum(-1)
                s2 = store_scale(torch.where(var > 0, cov / var.clamp(min=1e-30), s).abs(),
                                 dtype).to(compute_dtype)
                z2 = rnd(-(mw - s2 * mq) / s2)
                e2 = (((quant(s2, z2)[1] - wg) * valid) ** 2).sum(-1)
                better = e2 < e_best
                s = torch.where(better, s2, s)
                z = torch.where(better, z2, z)
                e_best = torch.minimum(e_best, e2)
        # The lp fit targets sparse error, not squared error: on MiniLM, for ~45% of the groups the
        # MSE-clipped round-to-nearest range has the lower squared error. Each group keeps whichever
        # of the two has it (docs/ACCURACY.md).
        _, s_clip, z_clip = rtn(w, group_size, symmetric, dtype, clip_search=True)
        s_clip, z_clip = s_clip.to(compute_dtype), z_clip.to(compute_dtype)
        e_fit = (((quant(s, z)[1] - wg) * valid) ** 2).sum(-1)
        e_clip = (((quant(s_clip, z_clip)[1] - wg) * valid) ** 2).sum(-1)
        better = e_clip < e_fit
        s, z = torch.where(better, s_clip, s), torch.where(better, z_clip, z)
        return codes_for(wf, s, z, G), s, z
