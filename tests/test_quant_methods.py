"""Each quantization method against a direct float64 implementation of its algorithm, written here
on small layers (same codes, or layer error within 1%), plus GPTQ never worse than RTN."""
import pytest
import torch

from int4kit import reference as R
from int4kit.quant.awq import ALPHA_GRID, awq, awq_scales
from int4kit.quant.gptq import GridSystem, LayerTerms, gptq, refit_grid
from int4kit.quant.hqq import hqq
from int4kit.quant.rtn import CLIP_GRID, dequant, layer_objective, rtn

from conftest import random_weight

SETTINGS = [(32, False), (32, True), (-1, True), (-1, False), (64, False), (6, False)]
IDS = ["g32-asym", "g32-sym", "chan-sym", "chan-asym", "g64-asym", "g6-asym"]


def correlated_inputs(T, K, seed=0):
    """Activations with a few large channels and correlations, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    x = torch.randn(T, K, generator=g) @ mix
    x[:, torch.randperm(K, generator=g)[:max(1, K // 16)]] *= 8
    return x


# ---- float64 oracles ---------------------------------------------------------------------------

def oracle_params(w, symmetric, ratio=1.0, dtype=torch.float32):
    """FORMAT.md's RTN parameters for one group w [N, g], in float64 (scale rounded to dtype)."""
    lo = w.amin(1).clamp(max=0) * ratio
    hi = w.amax(1).clamp(min=0) * ratio
    s = (torch.maximum(hi, -lo) / 7.5) if symmetric else (hi - lo) / 15
    s = s.to(dtype).double()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.full_like(s, 8.0) if symmetric else torch.round(-lo / s).clamp(0, 15)
    return s, z


def oracle_q(w, s, z):
    return (torch.round(w / s) + z).clamp(0, 15)


def groups_of(K, G):
    G = K if G == -1 else G
    return [(a, min(a + G, K)) for a in range(0, K, G)]


def oracle_rtn_clip(w, G, symmetric, weight=None):
    w = w.double()
    N, K = w.shape
    codes = torch.zeros(N, K, dtype=torch.float64)
    for a, b in groups_of(K, G):
        wg = w[:, a:b]
        best = torch.full((N,), float("inf"), dtype=torch.float64)
        for r in CLIP_GRID:
            s, z = oracle_params(wg, symmetric, r)
            q = oracle_q(wg, s[:, None], z[:, None])
            e = ((q - z[:, None]) * s[:, None] - wg) ** 2
            if weight is not None:
                e = e * weight[a:b].double()
            e = e.sum(1)
            better = e < best
            best = torch.where(better, e, best)
            codes[:, a:b] = torch.where(better[:, None], (q - z[:, None]) * s[:, None],
                                        codes[:, a:b])
    return codes  # dequantized weight


def oracle_gptq(w, H, G, symmetric, damp=0.01, act_order=False):
    """The paper's Algorithm 1 without lazy batching: column by column, float64."""
    W = w.double().clone()
    N, K = W.shape
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    params = {}
    if act_order or G == -1:
        for gi, (a, b) in enumerate(groups_of(K, G)):
            params[gi] = oracle_params(W[:, a:b], symmetric)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(K, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Gs = K if G == -1 else G
    Q = torch.zeros_like(W)
    for j in range(K):
        orig = int(perm[j])
        gi = orig // Gs
        if not (act_order or G == -1) and orig % Gs == 0:
            params[gi] = oracle_params(W[:, j:j + Gs], symmetric)
        s, z = params[gi]
        q = (oracle_q(W[:, j], s, z) - z) * s
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)]


def objective(w, w_hat, H):
    return layer_objective(w, w_hat, H)


# ---- RTN --------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_rtn_matches_reference_quantize(setting):
    G, sym = setting
    w = random_weight(24, 96)
    codes, s, z = rtn(w, G, sym)
    rq, rs, rz = R.quantize(w, G, sym)
    assert torch.equal(R.pack(codes.to(torch.uint8)), rq)
    assert torch.equal(s, rs) and torch.equal(z, rz)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_rtn_clip_search_matches_oracle(setting):
    G, sym = setting
    w = random_weight(24, 96)
    codes, s, z = rtn(w, G, sym, clip_search=True)
    w_hat = dequant(codes, s, z, 96 if G == -1 else G)
    ref = oracle_rtn_clip(w, G, sym)
    err, err_ref = ((w_hat - w) ** 2).sum().item(), ((ref - w.double()) ** 2).sum().item()
    assert abs(err - err_ref) <= 0.01 * err_ref
    err_plain = ((dequant(*rtn(w, G, sym), 96 if G == -1 else G) - w) ** 2).sum().item()
    assert err <= err_plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_are_rounded_to_weight_dtype(dtype):
    w = random_weight(16, 64).to(dtype)
    for fn in (lambda: rtn(w, 32, False, clip_search=True), lambda: hqq(w, 32, False),
               lambda: gptq(w, torch.eye(64), 32, False)):
        codes, s, z = fn()
        assert torch.equal(s, s.to(dtype).float())
        assert torch.equal(z, z.to(dtype).float())
        assert 0 <= codes.min() and codes.max() <= 15


# ---- HQQ --------------------------------------------------------------------------------------

def oracle_hqq(w, G, symmetric, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """HQQ's proximal loop per group in float64 (zero point for asym, scale for sym, then a
    least-squares scale refit for asym, then the lower squared error of that and the MSE-clipped
    round-to-nearest), as documented in int4kit.quant.hqq."""
    w = w.double()
    N, K = w.shape
    out = torch.zeros_like(w)

    def shrink(x, beta):
        return torch.sign(x) * torch.relu(x.abs() - (1 / beta) * (x.abs() + 1e-8) ** (p - 1))

    for a, b in groups_of(K, G):
        wg = w[:, a:b]
        if symmetric:
            s, z = oracle_params(wg, True)
        else:
            lo, hi = wg.amin(1), wg.amax(1)
            s = ((hi - lo) / 15).float().double()
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = (-lo / s).float().double()
        s, z = s[:, None], z[:, None]
        bt = beta
        best, best_sz = float("inf"), (s, z)
        for _ in range(iters):
            q = torch.round(wg / s + z).clamp(0, 15)
            we = shrink(wg - (q - z) * s, bt)
            if symmetric:
                qc = q - 8
                den = (qc * qc).sum(1, keepdim=True)
                s = torch.where(den > 0, ((qc * (wg - we)).sum(1, keepdim=True) / den.clamp(min=1e-30)
                                          ).abs().float().double(), s)
            else:
                z = (q - (wg - we) / s).mean(1, keepdim=True).float().double()
            bt *= kappa
            q = torch.round(wg / s + z).clamp(0, 15)
            e = ((q - z) * s - wg).abs().mean().item()
            if e < best:
                best, best_sz = e, (s, z)
            else:
                break
        s, z = best_sz
        q = torch.round(wg / s + z).clamp(0, 15)
        if not symmetric:
            def sq_err(s, z):
                return (((torch.round(wg / s + z).clamp(0, 15) - z) * s - wg) ** 2).sum(1, keepdim=True)
            e_best = sq_err(s, z)
            for _ in range(2):  # least-squares line through (q, w), codes re-rounded
                q = torch.round(wg / s + z).clamp(0, 15)
                qm, wm = q.mean(1, keepdim=True), wg.mean(1, keepdim=True)
                var = ((q - qm) ** 2).sum(1, keepdim=True)
                s2 = torch.where(var > 0, ((q - qm) * (wg - wm)).sum(1, keepdim=True)
                                 / var.clamp(min=1e-30), s).abs().float().double()
                s2 = torch.where(s2 > 0, s2, torch.ones_like(s2))
                z2 = (-(wm - s2 * qm) / s2).float().double()
                e2 = sq_err(s2, z2)
                s, z = torch.where(e2 < e_best, s2, s), torch.where(e2 < e_best, z2, z)
                e_best = torch.minimum(e_best, e2)
            q = torch.round(wg / s + z).clamp(0, 15)
        fit = (q - z) * s
        # each group keeps the fit or the MSE-clipped round-to-nearest, whichever has the lower
        # squared error
        clip = oracle_rtn_clip(wg, -1, symmetric)
        better = ((clip - wg) ** 2).sum(1, keepdim=True) < ((fit - wg) ** 2).sum(1, keepdim=True)
        out[:, a:b] = torch.where(better, clip, fit)
    return out


@pytest.mark.parametrize("setting", [(32, False), (64, True), (-1, False), (-1, True)],
                         ids=["g32-asym", "g64-sym", "chan-asym", "chan-sym"])
def test_hqq_matches_oracle(setting):
    G, sym = setting
    w = random_weight(32, 128)
    codes, s, z = hqq(w, G, sym)
    w_hat = dequant(codes, s, z, 128 if G == -1 else G)
    ref = oracle_hqq(w, G, sym)
    for norm in (1, 2):
        err = (w_hat.double() - w.double()).abs().pow(norm).sum().item()
        err_ref = (ref - w.double()).abs().pow(norm).sum().item()
        assert abs(err - err_ref) <= 0.01 * err_ref, (norm, err, err_ref)


def test_hqq_beats_rtn_on_weight_error():
    w = random_weight(64, 256)
    for G, sym in [(32, False), (128, False), (-1, True)]:
        Gs = 256 if G == -1 else G
        e_hqq = (dequant(*hqq(w, G, sym), Gs) - w).abs().mean()
        e_rtn = (dequant(*rtn(w, G, sym), Gs) - w).abs().mean()
        assert e_hqq < e_rtn, (G, sym)


# ---- GPTQ -------------------------------------------------------------------------------------

@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_gptq_matches_oracle_and_beats_rtn(setting, act_order):
    G, sym = setting
    N, K = 24, 96
    w = random_weight(N, K)
    H = (lambda x: x.T.double() @ x.double())(correlated_inputs(256, K))
    # block 32 < K exercises the lazy batch updates; G=6 does not divide it
    codes, s, z = gptq(w, H, G, sym, block_size=32, act_order=act_order)
    w_hat = dequant(codes, s, z, K if G == -1 else G)
    ref = oracle_gptq(w, H, G, sym, act_order=act_order)
    obj, obj_ref = objective(w, w_hat, H), objective(w, ref, H)
    assert abs(obj - obj_ref) <= 0.01 * obj_ref, (obj, obj_ref)
    obj_rtn = objective(w, dequant(*rtn(w, G, sym), K if G == -1 else G), H)
    assert obj <= obj_rtn
    # canonical: groups in original column order, scales rounded like RTN's
    assert tuple(s.shape) == (N, len(groups_of(K, G)))


@pytest.mark.parametrize("seed", range(4))
def test_gptq_never_worse_than_rtn(seed):
    g = torch.Generator().manual_seed(seed)
    K = 128
    w = random_weight(48, K)
    x = correlated_inputs(64 + 64 * seed, K, seed)
    H = x.T.double() @ x.double()
    for G, sym in [(128, False), (32, False), (-1, True)]:
        obj = objective(w, dequant(*gptq(w, H, G, sym), K if G == -1 else G), H)
        obj_rtn = objective(w, dequant(*rtn(w, G, sym), K if G == -1 else G), H)
        assert obj <= obj_rtn, (seed, G, sym)
    del g


def test_gptq_dead_columns():
    K = 64
    w = random_weight(16, K)
    x = correlated_inputs(200, K)
    x[:, [3, 40]] = 0
    H = x.T.double() @ x.double()
    codes, s, z = gptq(w, H, -1, True)
    assert torch.isfinite(s).all()
    # a dead column receives no error and passes none on: plain rounding with its group's scale
    rq, rs, _ = rtn(w, -1, True)
    assert torch.equal(codes[:, 3], rq[:, 3]) and torch.equal(codes[:, 40], rq[:, 40])
    assert (w[:, 3] != 0).any()  # weights are kept, not zeroed


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
@pytest.mark.parametrize("setting", [(32, False, 0), (32, True, 0), (-1, False, 0), (32, False, 3),
                                     ("tensor", True, 0)],
                         ids=["g32-asym", "g32-sym", "chan-asym", "g32-refined", "tensor"])
def test_gptq_objective_out_is_the_layer_objective(setting, act_order):
    """objective_out, computed from the pass's own errors (and the refit's objective), is each
    row's layer objective with the undamped H, dead inputs included, within float32's error."""
    G, sym, rounds = setting
    if rounds and act_order:
        pytest.skip("covered without act-order")
    N, K = 24, 96
    w = random_weight(N, K)
    x = correlated_inputs(300, K, seed=7)
    x[:, [5, 50]] = 0  # dead inputs: H's row and column are zero
    H = x.T.double() @ x.double()
    rows = torch.empty(N, dtype=torch.float64)
    codes, s, z = gptq(w, H, G, sym, damp=0.05, act_order=act_order, refine_rounds=rounds,
                       objective_out=rows)
    width = K if G in (-1, "tensor") else G
    expected = row_objectives(w, dequant(codes, s, z, width), H)
    assert torch.allclose(rows, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gptq_overwriting_the_hessian_gives_the_same_result(act_order, dtype):
    """overwrite_hessian takes H's memory for the solve where H has the solve's dtype (float64
    at this K: H is then overwritten) and a buffer otherwise; the result is the same."""
    N, K = 16, 80
    w = random_weight(N, K)
    x = correlated_inputs(200, K, seed=8)
    H = (x.T.double() @ x.double()).to(dtype)
    expected = gptq(w, H, 16, False, act_order=act_order)
    H_in = H.clone()
    got = gptq(w, H_in, 16, False, act_order=act_order, overwrite_hessian=True)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert torch.equal(H_in, H) == (dtype == torch.float32)  # float32: the solve runs in float64


def test_permute_symmetric_in_place_matches_indexing():
    import int4kit.quant.gptq as gptq_module
    K = 37
    A = torch.randn(K, K, dtype=torch.float64)
    A = A + A.T
    perm = torch.arange(K)  # the first four are fixed points, the rest move
    perm[4:] = 4 + torch.randperm(K - 4, generator=torch.Generator().manual_seed(3))
    expected = A[perm][:, perm]
    gptq_module._permute_symmetric_(A, perm, step=5)
    assert torch.equal(A, expected)


def reference_gptq_columns(w, hinv, scales, zeros, group_of_col, fractional, max_code):
    """GPTQ's column loop written out one column at a time in torch ops (the pass's loop before it
    moved into C++): returns (w updated, codes, errors)."""
    w = w.clone()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    errors = torch.empty_like(w)
    for c in range(w.shape[0]):
        s, z = scales[group_of_col[c]], zeros[group_of_col[c]]
        q = torch.round(w[c] / s + z) if fractional else torch.round(w[c] / s) + z
        q = torch.nan_to_num(q, nan=0.0).clamp(0, max_code)
        codes[c] = q.to(torch.uint8)
        errors[c] = (w[c] - (q - z) * s) / hinv[c, c]
        for r in range(c + 1, w.shape[0]):
            w[r] = w[r] - hinv[c, r] * errors[c]
    return w, codes, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fractional,max_code", [(False, 15), (True, 15), (False, 255)],
                         ids=["int4", "fractional-zeros", "int8"])
def test_gptq_column_loop_matches_the_reference(dtype, fractional, max_code):
    from int4kit import ops
    torch.manual_seed(0)
    cols, n = 11, 777  # n > 256: split between threads; odd sizes
    scale = 8.0 if max_code == 15 else 120.0
    w = torch.randn(cols, n, dtype=dtype) * scale
    w[3, 5] = float("nan")  # a NaN weight becomes code 0
    # hinv as a view with a larger row stride, as the pass passes a sub-block of its factor
    factor = torch.eye(cols + 5, dtype=dtype) + 0.3 * torch.randn(cols + 5, cols + 5, dtype=dtype).triu(1)
    hinv = factor[2:2 + cols, 2:2 + cols]
    scales = torch.rand(4, n, dtype=dtype) + 0.5
    # zeros as a view whose row stride differs from scales'
    zeros = (torch.rand(4, n + 3, dtype=dtype) * max_code)[:, :n]
    if not fractional:
        zeros.round_()
    assert zeros.stride(0) != scales.stride(0)
    group_of_col = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 3, 3, 3])
    # w and codes as row slices of larger buffers (row stride n, offset), errors plain
    w_buf = torch.zeros(cols + 2, n, dtype=dtype)
    w_buf[1:1 + cols] = w
    codes_buf = torch.zeros(cols + 2, n, dtype=torch.uint8)
    errors = torch.empty(cols, n, dtype=dtype)
    ops.gptq_columns(w_buf[1:1 + cols], hinv, scales, zeros, group_of_col, codes_buf[1:1 + cols],
                     errors, fractional, max_code)
    w_ref, codes_ref, errors_ref = reference_gptq_columns(w, hinv, scales, zeros, group_of_col,
                                                          fractional, max_code)
    assert torch.equal(codes_buf[1:1 + cols], codes_ref)
    assert torch.equal(codes_buf[0], torch.zeros(n, dtype=torch.uint8))  # nothing outside the view
    assert codes_buf[1 + 3, 5] == 0
    # row c of w is left as read: the reference's own update of it is not part of the contract
    for c in range(1, cols):
        torch.testing.assert_close(w_buf[1 + c], w_ref[c], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(errors, errors_ref, rtol=0, atol=0, equal_nan=True)


def test_gptq_column_loop_bad_arguments():
    from int4kit import ops
    w, hinv = torch.randn(4, 8), torch.eye(4)
    s, z, g = torch.ones(2, 8), torch.zeros(2, 8), torch.tensor([0, 0, 1, 1])
    codes, errors = torch.empty(4, 8, dtype=torch.uint8), torch.empty(4, 8)
    with pytest.raises(RuntimeError, match="w must be float32 or float64"):
        ops.gptq_columns(w.half(), hinv, s, z, g, codes, errors, False, 15)
    with pytest.raises(RuntimeError, match="hinv must be \\[4, 4\\]"):
        ops.gptq_columns(w, torch.eye(3), s, z, g, codes, errors, False, 15)
    with pytest.raises(RuntimeError, match="group_of_col must index the 2 rows of scales"):
        ops.gptq_columns(w, hinv, s, z, torch.tensor([0, 1, 2, 0]), codes, errors, False, 15)
    with pytest.raises(RuntimeError, match="codes must be Byte"):
        ops.gptq_columns(w, hinv, s, z, g, errors, errors, False, 15)
    with pytest.raises(RuntimeError, match="w must have unit stride"):
        ops.gptq_columns(torch.randn(8, 4).T, hinv, s, z, g, codes, errors, False, 15)
    with pytest.raises(RuntimeError, match="scales must be Float, got Double"):
        ops.gptq_columns(w, hinv, s.double(), z, g, codes, errors, False, 15)
    with pytest.raises(RuntimeError, match="max_code must be in 1..255"):
        ops.gptq_columns(w, hinv, s, z, g, codes, errors, False, 256)


def test_gptq_hessian_that_cannot_be_factorised():
    """A Hessian that no damping makes positive definite: HessianError, at once when H was being
    overwritten (nothing is left to retry from), after raising the damping otherwise."""
    from int4kit.quant.gptq import HessianError
    w = random_weight(8, 32)
    for overwrite in (False, True):
        with pytest.raises(HessianError, match="not positive definite"):
            gptq(w, -torch.eye(32, dtype=torch.float64), 16, False,
                 overwrite_hessian=overwrite)


def damped(H, damp):
    Hd = H.double().clone()
    Hd.diagonal().add_(damp * float(Hd.diagonal().mean()))
    return Hd


def row_objectives(w, w_hat, H):
    d = w.double() - w_hat.double()
    return ((d @ H) * d).sum(1)


@pytest.mark.parametrize("setting", [(32, False), (32, True), (-1, True), (-1, False), (24, False)],
                         ids=["g32-asym", "g32-sym", "chan-sym", "chan-asym", "g24-asym-tail"])
def test_grid_refit_is_the_least_squares_optimum(setting):
    """GridSystem's objective is the layer objective, and its solve is the least-squares group
    parameters for fixed codes: checked against an explicit float64 basis and torch.linalg.lstsq."""
    G, sym = setting
    N, K = 12, 80  # K = 80: group 24 leaves a tail group of 8 columns
    Gs = K if G == -1 else G
    w = random_weight(N, K).double()
    H = damped((lambda x: x.T.double() @ x.double())(correlated_inputs(200, K)), 0.1)
    codes, s, z = gptq(w.float(), H, G, sym, damp=0.1)
    system = GridSystem(LayerTerms(w, H, Gs, sym), codes)
    # any parameters, fractional zero points included
    s1, z1 = s.double() * 1.03, (z.double() if sym else z.double() + 0.3)
    assert torch.allclose(system.objective(s1, z1),
                          row_objectives(w, dequant(codes.double(), s1, z1, Gs), H), rtol=1e-9)
    s2, z2 = system.solve(s1, z1, torch.float64)
    L = torch.linalg.cholesky(H)  # objective_n = || L^T (w_n - B_n theta) ||^2
    for n in range(N):
        cols = []
        for a, b in groups_of(K, G):
            q_col = torch.zeros(K, dtype=torch.float64)
            q_col[a:b] = codes[n, a:b].double() - (8 if sym else 0)
            cols.append(q_col)
        if not sym:
            for a, b in groups_of(K, G):
                one = torch.zeros(K, dtype=torch.float64)
                one[a:b] = 1
                cols.append(one)
        B = torch.stack(cols, 1)
        theta = torch.linalg.lstsq(L.T @ B, L.T @ w[n]).solution
        ng = len(groups_of(K, G))
        # (solve's ridge, 1e-7 of each diagonal entry, moves the optimum by ~1e-7 x the condition)
        assert torch.allclose(s2[n], theta[:ng], rtol=1e-4), n
        if not sym:  # w_hat = s (q - z) = s q + b:  z = -b / s
            assert torch.allclose(z2[n], -theta[ng:] / theta[:ng], rtol=1e-4, atol=1e-4), n
    assert (system.objective(s2, z2) <= system.objective(s1, z1)).all()
    assert (system.objective(s2, z2) <= system.objective(s.double(), z.double()) + 1e-12).all()


def test_refit_keeps_the_scale_of_a_group_of_one_code():
    """Codes all equal in a group (or all 8, symmetric): scale and zero point cannot be told
    apart, so the group keeps its scale and its zero point takes the fit; the system built in
    float32 (as gptq builds it) then gives what float64 gives."""
    N, K, G = 6, 128, 32
    w = random_weight(N, K)
    w[2, :32] = 0.3
    w[3, 32:64] = -0.2
    H = damped((lambda x: x.T.double() @ x.double())(correlated_inputs(300, K, seed=3)), 0.1)
    for sym in (False, True):
        codes, s, z = gptq(w, H, G, sym, damp=0.1, dtype=torch.bfloat16)
        Q = codes.clone()
        Q[2, :32] = 8 if sym else 15
        Q[3, 32:64] = 8 if sym else 0
        results = {}
        for dt in (torch.float32, torch.float64):
            system = GridSystem(LayerTerms(w.to(dt), H.to(dt), G, sym), Q)
            assert system.one_code[2, 0] and system.one_code[3, 1] and system.one_code.sum() == 2
            s2, z2 = system.solve(s, z, torch.float64)
            assert s2[2, 0] == s[2, 0] and s2[3, 1] == s[3, 1]
            exact = row_objectives(w, dequant(Q.double(), s2.double(), z2.double(), G), H)
            before = row_objectives(w, dequant(Q.double(), s.double(), z.double(), G), H)
            assert (exact <= before * (1 + 1e-6)).all()
            results[dt] = exact
        assert torch.allclose(results[torch.float32], results[torch.float64], rtol=1e-3)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_refit_grid_in_row_slices_matches_one_system(monkeypatch, sym):
    """refit_grid bounds memory by solving slices of rows (here 3 rows at a time): the same
    parameters and objectives as one system over all rows."""
    import int4kit.quant.gptq as gptq_module
    N, K, G = 10, 96, 32
    w = random_weight(N, K).double()
    H = damped((lambda x: x.T.double() @ x.double())(correlated_inputs(200, K)), 0.1)
    codes, s, z = gptq(w.float(), H, G, sym, damp=0.1)
    layer = LayerTerms(w, H, G, sym)
    whole = GridSystem(layer, codes)
    s_ref, z_ref = whole.solve(s.double(), z.double(), torch.float64)
    P = (K // G) * (1 if sym else 2)
    monkeypatch.setattr(gptq_module, "SYSTEM_BYTES", 3 * 8 * P * P)
    s2, z2, before, after = refit_grid(layer, codes, s.double(), z.double(), torch.float64)
    assert torch.allclose(s2, s_ref, rtol=1e-9) and torch.allclose(z2, z_ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(before, whole.objective(s.double(), z.double()), rtol=1e-9)
    assert torch.allclose(after, whole.objective(s_ref, z_ref), rtol=1e-9)


@pytest.mark.parametrize("setting", [(32, False), (-1, True), (16, True)], ids=["g32-asym", "chan-sym", "g16-sym"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gptq_refinement_never_worse_per_row(setting, act_order):
    """refine_rounds keeps, per row, the best codes and grid seen: no row's damped objective rises
    above the plain pass's, the layer's falls, and the result is a valid canonical weight (codes
    0..15, positive scales rounded to the dtype, one grid per group in column order)."""
    G, sym = setting
    N, K, damp = 32, 128, 0.1
    w = random_weight(N, K)
    w[0] = 0  # a row and a group of one repeated code: their Gram blocks are singular
    w[1, :16] = 0
    w_before = w.clone()
    H = (lambda x: x.T.double() @ x.double())(correlated_inputs(300, K, seed=3))
    Gs = K if G == -1 else G
    plain = gptq(w, H, G, sym, damp=damp, act_order=act_order, dtype=torch.bfloat16)
    refit_once = gptq(w, H, G, sym, damp=damp, act_order=act_order, dtype=torch.bfloat16,
                      refine_rounds=1)
    refined = gptq(w, H, G, sym, damp=damp, act_order=act_order, dtype=torch.bfloat16,
                   refine_rounds=3)
    Hd = damped(H, damp)
    obj_plain = row_objectives(w, dequant(*plain, Gs), Hd)
    obj_refined = row_objectives(w, dequant(*refined, Gs), Hd)
    assert (obj_refined <= obj_plain * (1 + 1e-6)).all()
    assert obj_refined.sum() < 0.97 * obj_plain.sum()
    # the passes on refitted grids add to the first refit (fails if they return nothing better)
    assert obj_refined.sum() < row_objectives(w, dequant(*refit_once, Gs), Hd).sum() * (1 - 1e-3)
    codes, s, z = refined
    assert codes.min() >= 0 and codes.max() <= 15 and codes.dtype == torch.int64
    assert (s > 0).all() and torch.equal(s, s.to(torch.bfloat16).float())
    assert torch.isfinite(z).all() and (dequant(codes, s, z, Gs)[0] == 0).all()
    assert torch.equal(z, z.to(torch.bfloat16).float())
    if sym:
        assert (z == 8).all()
    assert s.shape == (N, -(-K // Gs))
    assert torch.equal(w, w_before)  # the caller's weight is untouched


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act-order"])
def test_gptq_pass_on_a_given_grid_reproduces_the_pass_that_chose_it(act_order):
    """A pass on a fixed grid (the refinement's) is the same pass: given the grid a plain pass
    chose, it picks the same codes (act-order visits columns in the same permuted order)."""
    import int4kit.quant.gptq as gptq_module
    N, K, G = 16, 96, 32
    w = random_weight(N, K)
    H = (lambda x: x.T.double() @ x.double())(correlated_inputs(200, K, seed=4))
    H = H.double()
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    Hinv, _ = gptq_module.damped_inverse_cholesky(H if perm is None else H[perm][:, perm], 0.1)
    Hinv = Hinv.float()
    args = (w, Hinv, perm, G, False, torch.float32, 32, False, None)
    Q, S, Z, _ = gptq_module._gptq_pass(*args, None)
    Q2, _, _, _ = gptq_module._gptq_pass(*args, (S.clone(), Z.clone()))
    assert torch.equal(Q, Q2)
    assert torch.equal(Q.long(), gptq(w, H, G, False, damp=0.1, block_size=32,
                                      act_order=act_order)[0])


def test_gptq_refinement_keeps_the_best_round(monkeypatch):
    """A round whose GPTQ pass goes badly (here: random codes) must not replace better rows."""
    import int4kit.quant.gptq as gptq_module
    real_pass = gptq_module._gptq_pass
    calls = []

    def erratic_pass(W, *args):
        Q, S, Z, damped_objective = real_pass(W, *args)
        calls.append(1)
        if len(calls) > 1:
            Q = torch.randint(0, 16, Q.shape, generator=torch.Generator().manual_seed(len(calls)))
        return Q.to(W.dtype), S, Z, damped_objective

    N, K, damp = 16, 64, 0.1
    w = random_weight(N, K)
    H = (lambda x: x.T.double() @ x.double())(correlated_inputs(200, K, seed=5))
    monkeypatch.setattr(gptq_module, "_gptq_pass", erratic_pass)
    refined = gptq(w, H, 32, False, damp=damp, refine_rounds=4)
    monkeypatch.undo()
    plain = gptq(w, H, 32, False, damp=damp)
    assert len(calls) == 4  # the plain pass and three on refitted grids
    Hd = damped(H, damp)
    assert (row_objectives(w, dequant(*refined, 32), Hd)
            <= row_objectives(w, dequant(*plain, 32), Hd) * (1 + 1e-6)).all()


# ---- AWQ --------------------------------------------------------------------------------------

def oracle_awq_alpha(w, x, G, sym):
    """Grid search on real activations: || x W^T - (x / s) Q(W s)^T ||^2, float64."""
    w, x = w.double(), x.double()
    mean = x.abs().mean(0).clamp(min=1e-4)
    best = (float("inf"), None)
    for alpha in ALPHA_GRID:
        s = mean ** alpha
        s = s / (s.max() * s.min()).sqrt()
        ws = w * s
        out = torch.zeros_like(ws)
        for a, b in groups_of(w.shape[1], G):
            sc, z = oracle_params(ws[:, a:b], sym)
            out[:, a:b] = (oracle_q(ws[:, a:b], sc[:, None], z[:, None]) - z[:, None]) * sc[:, None]
        err = ((x @ w.T - (x / s) @ out.T) ** 2).sum().item()
        if err < best[0]:
            best = (err, alpha)
    return best


@pytest.mark.parametrize("setting", [(32, False), (-1, True), (64, False)],
                         ids=["g32-asym", "chan-sym", "g64-asym"])
def test_awq_matches_oracle(setting):
    G, sym = setting
    K = 128
    w = random_weight(32, K)
    x = correlated_inputs(300, K)
    H = x.T.double() @ x.double()
    s, alpha, errors = awq_scales(w, H, x.abs().mean(0), G, sym)
    err_ref, alpha_ref = oracle_awq_alpha(w, x, G, sym)
    # float32 vs float64 may pick a neighbouring alpha; never one more than 1% worse
    assert errors[alpha] <= 1.01 * err_ref
    # full AWQ (with the clipping search) is never worse than its own alpha = 0, i.e. RTN
    codes, sq, zq, a = awq(w, H, x.abs().mean(0), G, sym)
    w_hat = dequant(codes, sq, zq, K if G == -1 else G) / a[None, :]
    obj = objective(w, w_hat, H)
    obj_rtn = objective(w, dequant(*rtn(w, G, sym), K if G == -1 else G), H)
    assert obj <= obj_rtn * 1.0001
    assert abs(obj - ((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum().item()) \
        <= 1e-6 * obj
