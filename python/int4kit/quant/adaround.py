"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round down or up.

The grid (scale, zero point per group) is round-to-nearest's, with the clipping search when asked
(weighted by the diagonal of the layer's Hessian, as GPTQ's). Each weight's code is
    q = clamp(floor(w / s) + h(V) + z, 0, 15),  h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
(the rectified sigmoid, zeta = 1.1, gamma = -0.1), V initialised so that h(V) = frac(w / s): the
first soft weight is the dense weight. The loss is the reconstruction error plus
reg * mean(1 - |2 h(V) - 1|^beta), the regulariser off during the first `warmup` of the
iterations and beta annealed linearly from 20 to 2 after it, which drives every h(V) to 0 or 1;
the final code takes h >= 0.5 (V >= 0) as "up". The paper weighs a regulariser summed over the
weights against an unnormalised error (lambda = 0.01, 10-20k steps at learning rate 1e-3); here
both are normalised (error relative to plain rounding's, regulariser a mean), so that one weight
serves every layer, and fewer, larger steps are taken: on a correlated test layer, 1000 steps at
3e-2 with reg = 10 left ~1% of the weights undecided and halved plain rounding's error, where
reg = 0.01-0.1 left 60-80% undecided and rounded no better than nearest (docs/QAT.md).

Layer-wise, the reconstruction error of W_hat is the layer objective tr((W - W_hat) H (W - W_hat)^T)
with H the calibration inputs' mean x x^T (the streaming engine's statistic: exact for every token
at the cost of one [N, K] x [K, K] product per step, and no activations held), divided by that of
plain rounding so that `reg` means the same for every layer. Block-wise (BRECQ, Li et al., 2021;
`QuantConfig(reconstruction="block")`) every layer of a transformer block learns its rounding at
once against the block's full-precision output (quant/blocks.py).

Two additions to the paper, measured on MiniLM (g128 asymmetric, out-of-domain mean cosine 0.9712
without them; docs/QAT.md): the layer objective is damped as GPTQ's, H + damp * mean(diag H) * I
(a ridge that also weighs each weight's own error, so the rounding fits the calibration text less
closely: 0.9731 alone), and the learned codes are polished by coordinate descent on that objective
(quant/descent.py), which may also move a code past the floor / ceiling pair the rectified sigmoid
chooses from (0.9788 with both). refine_rounds then alternates GPTQ's least-squares refit of the
grid with more polishing.
"""
from typing import Optional, Tuple

import torch

from .descent import coordinate_descent
from .gptq import LayerTerms, damped, refit_grid
from .rtn import MAX_CODE, codes_objective, group_size_of, grouped, rtn, ungrouped

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # share of the steps before the regulariser starts


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def beta_at(step: int, iters: int, warmup: float) -> Optional[float]:
    """The regulariser's beta at `step` (None during the warm-up: no regulariser)."""
    start = int(warmup * iters)
    if step < start:
        return None
    progress = (step - start) / max(1, iters - start)
    return BETA_START + (BETA_END - BETA_START) * progress


class SoftRounding:
    """One layer's learnable rounding on a fixed grid: codes floor(w / s) + h(V) + z."""

    def __init__(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, G: int):
        self.K, self.G = w.shape[1], G
        self.s, self.z = s.float().to(w.device), z.float().to(w.device)
        t = grouped(w.float(), G) / self.s[..., None]
        self.floor = torch.floor(t)
        p = ((t - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = torch.log(p / (1 - p)).requires_grad_()

    def _codes(self, up: torch.Tensor) -> torch.Tensor:
        """Grouped codes [N, groups, G] for a rounding direction `up` in [0, 1] per weight."""
        return (self.floor + up + self.z[..., None]).clamp(0, MAX_CODE)

    def soft_weight(self) -> torch.Tensor:
        """[N, K] float32 with the current soft rounding (differentiable in v)."""
        q = self._codes(rectified_sigmoid(self.v))
        return ungrouped((q - self.z[..., None]) * self.s[..., None], self.K)

    def objective(self, w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
        """tr((w - W_soft) H (w - W_soft)^T), the layer objective of the current soft weight
        (differentiable in v; H float32)."""
        d = w - self.soft_weight()
        return ((d @ H) * d).sum()

    def regulariser(self, beta: float) -> torch.Tensor:
        """mean(1 - |2 h - 1|^beta) over the weights: 0 once every h is 0 or 1."""
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The hard codes [N, K] (int64): up where h(V) >= 0.5."""
        return ungrouped(self._codes((self.v >= 0).float()), self.K).long()


def grid(w: torch.Tensor, H: Optional[torch.Tensor], group_size: int, symmetric: bool,
         dtype: torch.dtype, clip_search: bool) -> Tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor]:
    """Round-to-nearest (codes, s, z), the clipping search weighted by diag(H) when given."""
    weight = None if H is None else torch.diagonal(H).float()
    return rtn(w, group_size, symmetric, dtype, clip_search=clip_search, channel_weight=weight)


def adaround(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool,
             dtype: torch.dtype, iters: int = 1000, reg: float = 10.0, lr: float = 3e-2,
             warmup: float = WARMUP, clip_search: bool = True, damp: float = 0.0,
             polish_sweeps: int = 0, refine_rounds: int = 0):
    """Layer-wise AdaRound of w [N, K] against H = mean x x^T [K, K], damped by `damp` (module
    docstring), the learned codes then polished by at most polish_sweeps sweeps of coordinate
    descent, then refine_rounds times: each row's group parameters refitted to its codes by least
    squares (GPTQ's refit_grid; a row keeps its grid unless the refit lowers its objective) and
    the codes polished again on the new grid. Returns (codes, s, z) as rtn does (z fractional
    after a refit), and never worse than plain rounding on the damped layer objective (it returns
    that then). Deterministic: no sampling (the objective sums over every calibration token)."""
    G = group_size_of(group_size, w.shape[1])
    nearest, s, z = grid(w, H, group_size, symmetric, dtype, clip_search)
    W, H = w.float(), damped(H, damp)
    Hf = H.float()
    base = codes_objective(W, nearest, s, z, G, H)
    if base <= 0 or iters == 0:
        return nearest, s, z
    soft = SoftRounding(W, s, z, G)
    optimizer = torch.optim.Adam([soft.v], lr=lr)
    for step in range(iters):
        loss = soft.objective(W, Hf) / base
        beta = beta_at(step, iters, warmup)
        if beta is not None:
            loss = loss + reg * soft.regulariser(beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    codes, s_out, z_out = polish_and_refine(W, H, soft.codes(), s, z, G, symmetric, dtype,
                                            polish_sweeps, refine_rounds)
    if codes_objective(W, codes, s_out, z_out, G, H) > base:
        return nearest, s, z
    return codes, s_out, z_out


def polish_and_refine(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, s: torch.Tensor,
                      z: torch.Tensor, G: int, symmetric: bool, dtype: torch.dtype,
                      polish_sweeps: int, refine_rounds: int):
    """Learned codes polished by at most polish_sweeps sweeps of coordinate descent on the (damped)
    layer objective of H, then refine_rounds times: each row's group parameters refitted to its
    codes by least squares (GPTQ's refit_grid; a row keeps its grid unless the refit lowers its
    objective) and the codes polished again on the new grid. Returns (codes, s, z)."""
    if polish_sweeps:
        codes = coordinate_descent(W, codes, s, z, G, H, polish_sweeps)
    if refine_rounds:
        layer = LayerTerms(W, H.float(), G, symmetric)
        for _ in range(refine_rounds):
            s_fit, z_fit, before, after = refit_grid(layer, codes, s, z, dtype)
            better = (after < before)[:, None]
            s, z = torch.where(better, s_fit, s), torch.where(better, z_fit, z)
            if polish_sweeps:
                codes = coordinate_descent(W, codes, s, z, G, H, polish_sweeps)
    return codes, s, z
