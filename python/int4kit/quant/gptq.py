"""GPTQ (Frantar et al., 2023), Algorithm 1: quantize one column at a time and spread its error
over the columns not yet quantized, using the Cholesky factor of the damped inverse Hessian.

    H = X^T X (from the calibration engine); H_dd = 0 ("dead" input channel) -> H_dd = 1
    H += damp * mean(diag H) * I
    U = cholesky(H^-1, upper)                          (Hinv below)
    for each block of `block_size` columns (lazy batch updates):
        for each column j of the block:
            q_j = quant(w_j);  e_j = (w_j - q_j) / U_jj
            W[:, j:block_end] -= e_j U_j,j:block_end      (two-level: see `sub` below)
        W[:, block_end:] -= E_block U_block,block_end:

Group parameters (scale, zero point) are computed when the pass reaches a group's first column,
from the weights as updated so far (the paper's grouping). With act_order, columns are visited in
order of decreasing H_jj and the group parameters are "static": computed for every group, in the
original column order, before the permuted pass, so the result is still the canonical format
(group k // G of column k). Dead columns are quantized by plain rounding and pass no error on
(their H row and column are zero); unlike the reference implementation their weights are kept,
not zeroed, so inputs that were silent in calibration still see the original weights.

Refinement (refine_rounds, not in the paper): a pass fixes the codes and their group parameters
together, but once the codes are chosen the best scale and zero point of every group have a closed
form: the layer objective is quadratic in them (`GridSystem`). Alternating that refit with a pass
on the refitted grid is a coordinate descent on the same objective; on MiniLM ten rounds took
group 128's out-of-domain cosine from 0.978 to 0.980 (docs/ACCURACY.md).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from .calibration import matrix_dtype
from .rtn import (threads_for, MAX_CODE, OBJECTIVE_ROWS, PER_TENSOR, SYMMETRIC_ZERO, dequant,
                  group_size_of, max_code, row_objectives, rtn, store_scale)

CODE_CENTRE = MAX_CODE / 2
GRAM_ROWS = 256  # rows per slice in GridSystem (a [256, K] float32 product: 4 MiB at K = 4096)
SYSTEM_BYTES = 64 << 20  # Gram matrices per refit_grid slice (the solve holds about two more)


def _group_params(w_slice, symmetric, dtype, clip_search, channel_weight, bits=4):
    _, s, z = rtn(w_slice, -1, symmetric, dtype, clip_search=clip_search,
                  channel_weight=channel_weight, bits=bits)
    return s[:, 0], z[:, 0]


def damping(diagonal: torch.Tensor, damp: float) -> float:
    """What GPTQ adds to the Hessian's diagonal: damp * its mean (in float64; damp itself for a
    zero Hessian)."""
    return damp * (float(diagonal.double().mean()) or 1.0)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H with the damping added to its diagonal (dead inputs stay at the damping alone): a copy,
    or H itself when damp is 0. The objective layer-wise AdaRound and its polishing minimise."""
    if not damp:
        return H
    Hd = H.clone()
    Hd.diagonal().add_(damping(torch.diagonal(H), damp))
    return Hd


def solve_dtype(K: int) -> torch.dtype:
    """The dtype of the Hessian solve for K inputs: float64 while its K x K buffer takes at most
    128 MiB (K <= 4096), float32 above (at K = 28672 one float64 buffer alone is 6.6 GB)."""
    return matrix_dtype(K)


class HessianError(RuntimeError):
    """The damped Hessian of a layer could not be factorised (not positive definite)."""


def damped_inverse_cholesky(H: torch.Tensor, damp: float, perm: Optional[torch.Tensor] = None,
                            dtype: Optional[torch.dtype] = None, overwrite: bool = False):
    """Upper Cholesky factor U of (Hp + damp * mean(diag Hp) * I)^-1 (U^T U = that inverse), with
    Hp = H[perm][:, perm] (H itself without perm) and dead inputs (H_dd = 0) given H_dd = 1;
    raises the damping tenfold (up to 3 times) if a factorisation fails. Returns (U in `dtype`,
    default solve_dtype(K), damping used).

    Memory: one K x K buffer beyond H, or none with overwrite=True where H is contiguous and of
    `dtype`: H is then the buffer and its contents are lost (U is a view of it), and a failed
    factorisation raises HessianError at once, having nothing left to retry from. The permuted
    copy is built in slices of rows (in place: `_permute_symmetric_`); the three LAPACK steps
    (Cholesky, inverse from the factor, Cholesky of the inverse) run in place on the buffer's
    column-major view (row-major input would make torch copy it for LAPACK). The last
    factorisation is the lower factor of the column-major view, which read row-major is U."""
    K = H.shape[0]
    dtype = dtype or solve_dtype(K)
    in_place = overwrite and H.dtype == dtype and H.is_contiguous()
    work = H if in_place else torch.empty(K, K, dtype=dtype)
    cm = work.mT  # column-major view: LAPACK works on it in place
    info = torch.empty((), dtype=torch.int32)
    step = max(1, (16 << 20) // (K * H.element_size()))
    for attempt in range(1 if in_place else 4):
        if in_place:
            if perm is not None:
                _permute_symmetric_(work, perm, step)
        else:
            for r0 in range(0, K, step):
                rows = slice(r0, min(r0 + step, K))
                work[rows] = H[rows] if perm is None else H[perm[rows]][:, perm]
        diagonal = work.diagonal()
        diagonal.masked_fill_(diagonal == 0, 1.0)
        diagonal.add_(damping(diagonal, damp))
        torch.linalg.cholesky_ex(cm, out=(cm, info))
        if int(info) == 0:
            torch.cholesky_inverse(cm, out=cm)
            torch.linalg.cholesky_ex(cm, out=(cm, info))
            if int(info) == 0:
                return work.triu_(), damp
        if not in_place:
            damp = damp * 10 if damp > 0 else 1e-6
    raise HessianError(f"GPTQ: the Hessian of this layer ({K} inputs) is not positive definite "
                       f"with damping {damp:g}; its calibration data may be degenerate")


def _permute_symmetric_(A: torch.Tensor, perm: torch.Tensor, step: int):
    """A <- A[perm][:, perm] in place: the columns in slices of `step` rows, then the rows along
    the permutation's cycles with one row of scratch (row i takes row perm[i])."""
    K = A.shape[0]
    for r0 in range(0, K, step):
        rows = slice(r0, min(r0 + step, K))
        A[rows] = A[rows][:, perm]
    order = perm.tolist()
    moved = [False] * K
    for start in range(K):
        if moved[start] or order[start] == start:
            continue
        first = A[start].clone()
        i = start
        while True:
            moved[i] = True
            j = order[i]
            if j == start:
                A[i] = first
                break
            A[i] = A[j]
            i = j


def _damping_terms(W, Q, S, Z, G, damping_added, dead):
    """[N] float64: what the damping adds to each row's layer objective, damping_added *
    ||d||^2 + ||d_dead||^2 with d = w - dequant(q) (dead inputs sit at 1 + damping on the
    diagonal the factor used, at 0 in H)."""
    terms = torch.empty(W.shape[0], dtype=torch.float64)
    for r0 in range(0, W.shape[0], OBJECTIVE_ROWS):
        rows = slice(r0, r0 + OBJECTIVE_ROWS)
        d = (W[rows].double() - dequant(Q[rows], S[rows], Z[rows], G).double()).square_()
        terms[rows] = damping_added * d.sum(1) + d[:, dead].sum(1)
    return terms


def gptq(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool,
         dtype: Optional[torch.dtype] = None, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, clip_search: bool = False,
         compute_dtype: torch.dtype = torch.float32, refine_rounds: int = 0,
         codes_dtype: torch.dtype = torch.int64, bits: int = 4, overwrite_hessian: bool = False,
         objective_out: Optional[torch.Tensor] = None):
    """w [N, K], H [K, K] (X^T X, any positive scale). Returns (codes [N, K] in codes_dtype (uint8
    takes an eighth of int64's memory), s, z) with s, z
    [N, groups] in compute_dtype, following the canonical rules (s rounded to `dtype`), for
    `bits`-bit codes (8: int8 weights, with refine_rounds = 0).

    refine_rounds = R > 0 alternates the two halves of the layer objective's minimisation: R times
    a least-squares refit of every group's scale and zero point to the codes (`refit_grid`), with a
    GPTQ pass on each refitted grid in between (R - 1 passes). Each row keeps the codes and grid
    with the lowest damped objective seen, the plain pass's included, so refinement never makes a
    row worse on it. Asymmetric zero points then become fractional (FORMAT.md allows it).

    overwrite_hessian=True lets the solve take H's memory (with refine_rounds = 0, which needs H
    afterwards; damped_inverse_cholesky's `overwrite`): the caller must treat H's contents as
    lost, whatever happens. objective_out, an [N] float64 tensor, receives each row's layer objective
    (w - w_hat) H (w - w_hat)^T of the returned codes. Without refine_rounds it comes from the
    pass, not from H (which may be gone): the pass leaves W - W_hat = E U (E its scaled errors, U
    the factor), and U Hd U^T = I for the damped Hd, so the damped objective is ||e||^2 per row;
    the damping's share is then taken off (`_damping_terms`). The pass's float32 arithmetic makes
    that about 1e-4 relative to a float64 evaluation with H; with refine_rounds it is that
    evaluation."""
    with threads_for(w.shape[0] * min(block_size, w.shape[1])):
        dtype = dtype or w.dtype
        N, K = w.shape
        if H.shape != (K, K):
            raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match in_features {K}")
        if bits != 4 and refine_rounds:
            raise ValueError(f"GPTQ: refine_rounds refits int4 grids; use 0 with bits={bits}")
        G = group_size_of(group_size, K)
        W = w  # in its own dtype: the pass copies it (transposed) into compute_dtype
        diag = torch.diag(H).double()
        dead = diag == 0
        diag[dead] = 1.0  # dead inputs, as damped_inverse_cholesky treats them
        perm = torch.argsort(diag, descending=True) if act_order else None
        overwrite = overwrite_hessian and refine_rounds == 0
        Hinv, damp = damped_inverse_cholesky(H, damp, perm, overwrite=overwrite)
        Hinv = Hinv.to(compute_dtype)  # no copy when the solve ran in compute_dtype
        cw = diag.to(compute_dtype) if clip_search else None

        def run_pass(grid):
            return _gptq_pass(W, Hinv, perm, G, symmetric, dtype, block_size, clip_search, cw,
                              grid, compute_dtype, bits)

        if group_size == PER_TENSOR:  # one grid, fixed before the pass, from the whole matrix
            if refine_rounds:
                raise ValueError("GPTQ: refine_rounds refits each row's scale and zero point, "
                                 "which per-tensor quantization keeps equal; use 0")
            _, S, Z = rtn(W, PER_TENSOR, symmetric, dtype, clip_search=clip_search,
                          channel_weight=cw, codes_dtype=torch.uint8, bits=bits)
            Q, S, Z, damped_obj = run_pass((S.to(compute_dtype), Z.to(compute_dtype)))
        else:
            Q, S, Z, damped_obj = run_pass(None)
        if refine_rounds > 0:
            Hd = H.to(compute_dtype, copy=True)
            # the diagonal the Cholesky factor used: dead inputs at 1, plus the damping
            Hd.diagonal().copy_(diag + damping(diag, damp))
            layer = LayerTerms(W, Hd, G, symmetric)
            del Hd
            best, best_obj = (Q, S, Z), None
            for r in range(refine_rounds):
                S, Z, obj_before, obj = refit_grid(layer, Q, S, Z, dtype)
                if best_obj is None:
                    best_obj = obj_before
                better = obj < best_obj
                best = tuple(torch.where(better[:, None], new, old)
                             for new, old in zip((Q, S, Z), best))
                best_obj = torch.where(better, obj, best_obj)
                if r + 1 < refine_rounds:
                    Q, S, Z, _ = run_pass((S, Z))
            Q, S, Z = best
        Hinv = None  # frees the largest buffer before the returned codes are made
        if objective_out is not None:
            if refine_rounds > 0:  # H is still there (the refit's objective is float32's)
                objective_out.copy_(row_objectives(W, Q, S, Z, G, H))
            else:
                objective_out.copy_(damped_obj - _damping_terms(W, Q, S, Z, G,
                                                                damping(diag, damp), dead))
        return Q.to(codes_dtype, memory_format=torch.contiguous_format), S, Z


def _gptq_pass(W, Hinv, perm, G, symmetric, dtype, block_size, clip_search, cw, grid,
               compute_dtype=torch.float32, bits=4):
    """One GPTQ pass over W [N, K] (any float dtype; it works in compute_dtype) with Hinv the Cholesky factor of the damped
    inverse Hessian in visiting order (columns permuted by `perm` when act-order). grid = (S, Z)
    fixes every group's parameters (their zero points may be fractional); None computes them as
    the pass goes (or up front, "static", for act-order and per channel). Returns codes (uint8),
    S, Z and each row's damped objective, the squared norm of its scaled errors (see gptq)."""
    N, K = W.shape
    groups = -(-K // G)
    # the grid as rows [groups, N]: the column loop reads one group's scales for all rows at once
    if grid is not None:
        ST, ZT = (t.T.to(compute_dtype).contiguous() for t in grid)
    else:
        ST = torch.empty(groups, N, dtype=compute_dtype)
        ZT = torch.empty(groups, N, dtype=compute_dtype)
    static = grid is not None or perm is not None or G == K
    if grid is None and static:
        for g in range(groups):
            sl = slice(g * G, min((g + 1) * G, K))
            ST[g], ZT[g] = _group_params(W[:, sl], symmetric, dtype, clip_search,
                                         None if cw is None else cw[sl], bits)
    # integer zero points: round(w / s) + z, the kernels' and the reference's order; fractional
    # ones must be added before rounding
    fractional = grid is not None and not torch.equal(ZT, torch.round(ZT))
    if perm is not None:
        W = W[:, perm]
    col_group = (perm if perm is not None else torch.arange(K)) // G
    # block boundaries aligned with group boundaries, so a group's first column always sees every
    # update made so far (in W1 when the group lies inside the current block)
    B = block_size
    if not static:
        B = max(G, (B // G) * G) if G < B else (G if G % B else B)

    # The pass runs on W^T (columns of W are contiguous rows here). Inside a block, the per-column
    # steps (quantize, then a rank-1 update of the later columns) run over sub-blocks of `sub`
    # columns in the native column loop (ops.gptq_columns: cache-resident, one call per
    # sub-block); each finished sub-block passes its errors on to the rest of the block with one
    # matmul. Same arithmetic as updating the whole block per column, in another order. A group's
    # first column must see every update made so far, so in the non-static case sub-blocks start
    # on group boundaries (sub divides G, which is even).
    sub = next(c for c in (32, 16, 8, 4, 2) if static or G % c == 0)
    WT = torch.empty(K, N, dtype=compute_dtype)  # never a view of the caller's w
    WT.copy_(W.T)
    QT = torch.empty(K, N, dtype=torch.uint8)  # codes 0..15 (0..255): a quarter of float32's memory
    top = max_code(bits)
    damped_obj = torch.zeros(N, dtype=torch.float64)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            col = i1 + j1
            if not static and col % G == 0:
                # at a block start WT is up to date (W1 is a fresh copy); inside a block the
                # whole group lies in W1, updated up to here
                src = WT[col:min(col + G, K)] if j1 == 0 else W1[j1:j1 + G]
                g = col // G
                ST[g], ZT[g] = _group_params(src.T, symmetric, dtype, clip_search,
                                             None if cw is None else cw[col:col + src.shape[0]],
                                             bits)
            ops.gptq_columns(W1[j1:j2], Hinv1[j1:j2, j1:j2], ST, ZT, col_group[col:i1 + j2],
                             QT[col:i1 + j2], Err1[j1:j2], fractional, top)
            W1[j2:].addmm_(Hinv1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
        damped_obj += Err1.double().square_().sum(0)
    S, Z = ST.T.contiguous(), ZT.T.contiguous()
    Q = QT.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, S, Z, damped_obj


class LayerTerms:
    """The parts of `GridSystem` that depend on the weight W [N, K] and H [K, K] only (K padded to
    whole groups with zero columns of W and zero rows and columns of H).

    The objective only needs W through W H and the rows' w^T H w: `from_products` takes them
    directly, for a target that is not a weight but outputs (recalibrate: the objective
    sum_t ||W_hat x_t - y_t||^2 has W H = Y^T X and w^T H w = sum_t y_t^2 per row)."""

    def __init__(self, W, H, G, symmetric):
        K = W.shape[1]
        Hp = F.pad(H, (0, -K % G, 0, -K % G)) if K % G else H
        WH = F.pad(W.to(H.dtype), (0, -K % G)) @ Hp
        self._set(WH, (W.to(H.dtype) * WH[:, :K]).double().sum(1), Hp, G, symmetric)

    @classmethod
    def from_products(cls, WH, wHw, H, G, symmetric) -> "LayerTerms":
        """The terms of a target given as W H [N, K] and w^T H w [N] (K padded as in __init__)."""
        K = WH.shape[1]
        terms = cls.__new__(cls)
        pad = -K % G
        terms._set(F.pad(WH.to(H.dtype), (0, pad)), wHw.double(),
                   F.pad(H, (0, pad, 0, pad)) if pad else H, G, symmetric)
        return terms

    def _set(self, WH, wHw, Hp, G, symmetric):
        self.G, self.symmetric = G, symmetric
        self.centre = SYMMETRIC_ZERO if symmetric else CODE_CENTRE
        self.Hp, self.WH, self.wHw = Hp, WH, wHw
        self.groups = ng = Hp.shape[0] // G
        if not symmetric:
            self.WH_sums = self.WH.view(-1, ng, G).sum(-1)  # 1_g^T H w per row
            self.H_sums = self.Hp.view(ng, G, ng, G).sum((1, 3))  # 1_g^T H 1_h
            self.H_ones = self.Hp.view(ng * G, ng, G).sum(-1).view(ng, G, ng)  # [h, j, g]: (H 1_g)_j


def refit_grid(layer: "LayerTerms", Q, S, Z, dtype):
    """The least-squares group parameters of codes Q [N, K] (GridSystem.solve), built and solved
    for slices of rows so that memory stays bounded: one row's system is P x P float64 with P up
    to 2 K / G unknowns (K = 11008 at group 32: 3.8 MB a row). Returns (S, Z, each row's objective
    with the old parameters, with the new ones)."""
    N = Q.shape[0]
    P = layer.groups * (1 if layer.symmetric else 2)
    step = max(1, SYSTEM_BYTES // (8 * P * P))
    S_new, Z_new = S.clone(), Z.clone()
    before = torch.empty(N, dtype=torch.float64)
    after = torch.empty(N, dtype=torch.float64)
    for r0 in range(0, N, step):
        rows = slice(r0, min(r0 + step, N))
        system = GridSystem(layer, Q, rows)
        before[rows] = system.objective(S[rows], Z[rows])
        S_new[rows], Z_new[rows] = system.solve(S[rows], Z[rows], dtype)
        after[rows] = system.objective(S_new[rows], Z_new[rows])
    return S_new, Z_new, before, after


class GridSystem:
    """The layer objective tr((W - W_hat) H (W - W_hat)^T) of fixed codes Q as a quadratic in the
    group parameters, one small system per row (of `rows` of the layer).

    Row n's weights are W_hat = sum_g a_g (Q - c) 1_g + b_g 1_g (1_g: group g's columns) with
    a_g = s_g and b_g = s_g (c - z_g); c = 7.5 centres the codes, which keeps the two basis vectors
    of a group far from parallel (asymmetric), and symmetric has z = 8 fixed: basis (Q - 8) 1_g and
    theta = a only. With B_n the [K, P] basis, objective_n(theta) = w^T H w - 2 theta^T B^T H w +
    theta^T B^T H B theta. `LayerTerms` holds what depends on W and H alone (W H costs N K^2
    multiply-adds, once per layer); the Gram matrices B^T H B cost N K^2 / 2 per set of codes
    (about half a GPTQ pass), in H's dtype; the quadratic forms are evaluated in float64."""

    def __init__(self, layer: "LayerTerms", Q, rows: slice = slice(None)):
        Q = Q[rows]
        N, K = Q.shape
        G, ng, Hp, WH = layer.G, layer.groups, layer.Hp, layer.WH[rows]
        self.symmetric, self.centre, self.wHw = layer.symmetric, layer.centre, layer.wHw[rows]
        # row-major whatever Q's layout (a pass returns a transposed view); padding meets zero H
        Qc = F.pad(Q.to(Hp.dtype) - self.centre, (0, -K % G)).contiguous()
        P = ng if self.symmetric else 2 * ng
        gram = torch.empty(N, P, P, dtype=torch.float64)
        rhs = torch.empty(N, P, dtype=torch.float64)
        Qg = Qc.view(N, ng, G)
        rhs[:, :ng] = (Qg * WH.view(N, ng, G)).sum(-1)
        # a-a block, groups g <= h: (Q - c)_g^T H_gh (Q - c)_h per row, the rest by symmetry; in
        # slices of rows, so each product H (Q - c) 1_h stays in cache for the multiply that follows
        aa = torch.zeros(N, ng, ng, dtype=torch.float64)
        for r0 in range(0, N, GRAM_ROWS):
            Qr = Qc[r0:r0 + GRAM_ROWS]
            for h in range(ng):
                e = (h + 1) * G
                Mh = Qr[:, h * G:e] @ Hp[h * G:e, :e]
                aa[r0:r0 + Qr.shape[0], :h + 1, h] = Mh.mul_(Qr[:, :e]).view(-1, h + 1, G).sum(-1)
        gram[:, :ng, :ng] = aa + torch.triu(aa, 1).transpose(1, 2)
        if not self.symmetric:
            rhs[:, ng:] = layer.WH_sums[rows]
            gram[:, ng:, ng:] = layer.H_sums
            ba = torch.einsum("nhj,hjg->ngh", Qg, layer.H_ones)  # 1_g^T H (Q - c)_h
            gram[:, ng:, :ng] = ba
            gram[:, :ng, ng:] = ba.transpose(1, 2)
        self.gram, self.rhs = gram, rhs
        # groups whose real columns hold one code (symmetric: only 8), see solve
        q = Q.to(torch.float32)
        hi = F.pad(q, (0, -K % G), value=-1.0).view(N, ng, G).amax(-1)
        lo = F.pad(q, (0, -K % G), value=MAX_CODE + 1.0).view(N, ng, G).amin(-1)
        self.one_code = (hi == lo) & (hi == SYMMETRIC_ZERO) if self.symmetric else hi == lo

    def theta(self, S, Z):
        S, Z = S.double(), Z.double()
        return S if self.symmetric else torch.cat([S, S * (self.centre - Z)], 1)

    def objective(self, S, Z):
        """[N] float64: each row's objective with its group parameters S, Z [N, groups]."""
        t = self.theta(S, Z)
        quad = torch.einsum("np,npq,nq->n", t, self.gram, t)
        return self.wHw - 2 * (t * self.rhs).sum(1) + quad

    def solve(self, S, Z, dtype):
        """The least-squares group parameters, rounded as stored (s to dtype, z to dtype).

        A group of one repeated code (symmetric: all 8) cannot tell its scale from its zero point
        (their basis vectors are parallel, or the scale's is zero): it keeps its scale and the
        zero point absorbs the fit. A ridge of 1e-7 of each diagonal entry keeps the float32-built
        systems of nearly degenerate groups from amplifying rounding. A group whose solved scale is
        not positive and finite, or whose zero point would be far outside the codes (|z - 7.5| >
        64), keeps its S, Z."""
        N, P = self.rhs.shape
        ng = S.shape[1]
        gram = self.gram.clone()
        diagonal = gram.diagonal(dim1=1, dim2=2)
        diagonal.add_(1e-7 * diagonal)
        rhs = self.rhs.clone()
        fixed = self.one_code
        if bool(fixed.any()):  # a_g = S_g known: move its terms to the right-hand side
            known = torch.where(fixed, S.double(), torch.zeros((), dtype=torch.float64))
            rhs -= torch.einsum("npq,nq->np", gram[:, :, :ng], known)
            free = torch.cat([~fixed, torch.ones(N, P - ng, dtype=torch.bool)], 1).double()
            gram = gram * free[:, :, None] * free[:, None, :]
            gram[:, :ng, :ng] += torch.diag_embed(fixed.double())
            rhs[:, :ng] = torch.where(fixed, S.double(), rhs[:, :ng])
        theta = torch.linalg.solve(gram, rhs)
        a = theta[:, :ng]
        ok = torch.isfinite(a) & (a > 0)
        s = store_scale(torch.where(ok, a, S.double()).to(S.dtype), dtype)
        if self.symmetric:
            return torch.where(ok, s, S), Z
        z = (self.centre - theta[:, ng:] / s.double()).to(dtype).to(Z.dtype)
        ok &= torch.isfinite(z) & ((z - self.centre).abs() <= 64)
        return torch.where(ok, s, S), torch.where(ok, z, Z)
