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
"""
from typing import Optional

import torch

from .rtn import threads_for, MAX_CODE, group_size_of, rtn


def _group_params(w_slice, symmetric, dtype, clip_search, channel_weight):
    _, s, z = rtn(w_slice, -1, symmetric, dtype, clip_search=clip_search,
                  channel_weight=channel_weight)
    return s[:, 0], z[:, 0]


def damped_inverse_cholesky(H: torch.Tensor, damp: float):
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = that inverse), in
    float64; raises the damping tenfold (up to 3 times) if the factorisation fails. Returns
    (U, damping used).

    With J the order-reversing permutation and J Hd J = L L^T, Hd = (J L J)(J L J)^T where J L J is
    upper triangular, so U = (J L J)^-1 = J L^-1 J: one Cholesky and one triangular solve instead
    of Cholesky, inverse and a second Cholesky."""
    H = H.double()
    K = H.shape[0]
    mean_diag = float(torch.diag(H).mean()) or 1.0
    for attempt in range(4):
        Hd = H.flip(0, 1)
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            eye = torch.eye(K, dtype=L.dtype)
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1), damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise RuntimeError(f"GPTQ: the Hessian of this layer ({K} inputs) is not positive definite "
                       f"even with damping {damp:g}; its calibration data may be degenerate")


def gptq(w: torch.Tensor, H: torch.Tensor, group_size: int, symmetric: bool,
         dtype: Optional[torch.dtype] = None, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False, clip_search: bool = False,
         compute_dtype: torch.dtype = torch.float32):
    """w [N, K], H [K, K] (X^T X, any positive scale). Returns (codes int64 [N, K], s, z) with s, z
    [N, groups] in compute_dtype, following the canonical rules (s rounded to `dtype`)."""
    with threads_for(w.shape[0] * min(block_size, w.shape[1])):
        dtype = dtype or w.dtype
        N, K = w.shape
        if H.shape != (K, K):
            raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match in_features {K}")
        G = group_size_of(group_size, K)
        groups = -(-K // G)
        W = w.to(compute_dtype).clone()
        H = H.double().clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        hdiag = torch.diag(H).to(compute_dtype)
        cw = hdiag if clip_search else None

        S = torch.empty(N, groups, dtype=compute_dtype)
        Z = torch.empty(N, groups, dtype=compute_dtype)
        static = act_order or G == K
        if static:
            for g in range(groups):
                sl = slice(g * G, min((g + 1) * G, K))
                S[:, g], Z[:, g] = _group_params(W[:, sl], symmetric, dtype, clip_search,
                                                 None if cw is None else cw[sl])
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        Hinv, _ = damped_inverse_cholesky(H, damp)
        Hinv = Hinv.to(compute_dtype)
        col_group = (perm if perm is not None else torch.arange(K)) // G
        # block boundaries aligned with group boundaries, so a group's first column always sees every
        # update made so far (in W1 when the group lies inside the current block)
        B = block_size
        if not static:
            B = max(G, (B // G) * G) if G < B else (G if G % B else B)

        # The pass runs on W^T (columns of W are contiguous rows here). Inside a block, the
        # per-column rank-1 updates only touch a sub-block of `sub` columns (cache-resident); each
        # finished sub-block passes its errors on to the rest of the block with one matmul. Same
        # arithmetic as updating the whole block per column, in another order. A group's first
        # column must see every update made so far, so in the non-static case sub-blocks start on
        # group boundaries (sub divides G), or are the block.
        sub = next((c for c in (32, 16, 8) if static or G % c == 0), B)
        WT = W.T.contiguous()
        QT = torch.empty(K, N, dtype=compute_dtype)
        for i1 in range(0, K, B):
            i2 = min(i1 + B, K)
            W1 = WT[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for j1 in range(0, i2 - i1, sub):
                j2 = min(j1 + sub, i2 - i1)
                for i in range(j1, j2):
                    col = i1 + i
                    g = int(col_group[col])
                    if not static and col % G == 0:
                        # at a block start WT is up to date (W1 is a fresh copy); inside a block
                        # the whole group lies in W1, updated up to here
                        src = WT[col:min(col + G, K)] if i == 0 else W1[i:i + G]
                        S[:, g], Z[:, g] = _group_params(src.T, symmetric, dtype, clip_search,
                                                         None if cw is None else cw[col:col + src.shape[0]])
                    s, z = S[:, g], Z[:, g]
                    wcol = W1[i]
                    q = torch.round(wcol / s).add_(z).clamp_(0, MAX_CODE)
                    QT[col] = q
                    err = torch.addcmul(wcol, q - z, s, value=-1).div_(Hinv1[i, i])
                    W1[i:j2].addr_(Hinv1[i, i:j2], err, alpha=-1)
                    Err1[i] = err
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)
            WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
        Q = QT.T
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return Q.long(), S, Z
