"""Property-based tests (hypothesis) of every op and of Int4Linear against int4kit.reference, on
every CPU path this machine supports: M = 0 and up, odd K, K % G != 0, any even G up to K and -1,
N off every tile size, non-contiguous / strided / transposed / expanded / 3-D x, fp32, bf16 and
fp16, NaN, inf, denormal and huge values in x, all-zero and constant weight groups.

CI runs the fixed-seed profile "ci" (derandomized, a bounded number of examples per test);
INT4KIT_HYPOTHESIS_PROFILE=long runs many more (docs/RELIABILITY.md). A failure hypothesis
shrinks to a minimal example becomes a regular test in the tier it belongs to (test_linear.py,
test_format.py, ...), so it is checked on every run whatever the profile draws.
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from int4kit import Int4Linear, ops  # noqa: E402
from int4kit import reference as R  # noqa: E402

from conftest import ISA_ENV, SUPPORTED_ISAS  # noqa: E402

settings.register_profile("ci", max_examples=250, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("INT4KIT_HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error per output row, against the float64 reference (tests/test_linear.py's bounds)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
HUGE = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 100.0}  # outputs stay finite
DENORMAL = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 1e-7}


@st.composite
def layers(draw, max_n=70, max_k=300):
    """(N, K, G, symmetric, dtype, weight) with some all-zero and constant groups."""
    K = draw(st.integers(1, max_k))
    N = draw(st.integers(1, max_n))
    G = draw(st.one_of(st.just(-1), st.integers(1, max(1, K // 2)).map(lambda h: 2 * h)))
    if G > K:
        G = -1
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * draw(st.sampled_from([0.02, 1.0, 30.0]))
    Ge = K if G == -1 else G
    groups = -(-K // Ge)
    for _ in range(draw(st.integers(0, 3))):  # special groups
        n, g = draw(st.integers(0, N - 1)), draw(st.integers(0, groups - 1))
        w[n, g * Ge:(g + 1) * Ge] = draw(st.sampled_from([0.0, 0.5, -3.0]))
    return N, K, G, draw(st.booleans()), dtype, w.to(dtype)


def force(isa):
    """Forces a CPU path for the duration of one example."""
    class _Force:
        def __enter__(self):
            self.saved = os.environ.get(ISA_ENV)
            os.environ[ISA_ENV] = isa

        def __exit__(self, *exc):
            if self.saved is None:
                os.environ.pop(ISA_ENV, None)
            else:
                os.environ[ISA_ENV] = self.saved
    return _Force()


@st.composite
def activations(draw, K, dtype):
    """x [.., K] in some layout, with special values; returns (x, its values as a contiguous
    copy)."""
    M = draw(st.integers(0, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "expanded", "3d"]))
    base = torch.randn(max(M, 1), K, generator=gen)
    special = draw(st.sampled_from(["none", "nan", "inf", "denormal", "huge", "zero_row"]))
    if M and special != "none":
        r, c = draw(st.integers(0, M - 1)), draw(st.integers(0, K - 1))
        if special == "nan":
            base[r, c] = float("nan")
        elif special == "inf":
            base[r, c] = float("-inf")
        elif special == "denormal":
            base[r] = base[r] * DENORMAL[dtype]
        elif special == "huge":
            base[r] = base[r] * HUGE[dtype]
        else:
            base[r] = 0.0
    base = base[:M].to(dtype)
    if layout == "strided":
        wide = torch.zeros(M, 2 * K, dtype=dtype)
        wide[:, ::2] = base
        x = wide[:, ::2]
    elif layout == "transposed":
        x = base.t().contiguous().t()
    elif layout == "expanded" and M:
        x = base[:1].expand(M, K)
    elif layout == "3d" and M:
        x = base.reshape(1, M, K)
    else:
        x = base
    return x, x.contiguous()


# The fused kernels compute q * s + b (b = -z * s) per group, with x on a fixed-point grid
# (docs/FORMAT.md: at most 2^-15 of a group's largest |x| off for bf16 x, 2^-23 for fp32 and
# fp16): next to the relative error, each output may be off by a small fraction of the size of
# the terms it sums, sum_k |x_k| (q + z) |s|, even where they cancel to 0 (an all-zero weight
# group is q = z = 8, s = 1).
TERM_TOL = {torch.float32: 2.0 ** -18, torch.bfloat16: 2.0 ** -12, torch.float16: 2.0 ** -18}


def term_sizes(values, q, s, z, G):
    """sum_k |x_k| (q_nk + z_n,g(k)) |s_n,g(k)| for every row of x and output n (float64)."""
    K = values.shape[-1]
    Ge = K if G == -1 else G
    codes = R.unpack(q, K).double()
    zeros = torch.full_like(s, 8.0) if z is None else z
    g = torch.arange(K) // Ge
    terms = (codes + zeros.double()[:, g].abs()) * s.double()[:, g].abs()
    x = values.double().reshape(-1, K).abs().nan_to_num(0.0, 0.0, 0.0)
    return x @ terms.t()


def check_rows(y, ref, dtype, sizes):
    """Rows with a non-finite reference are non-finite; every other row is within the relative
    tolerance of the reference, plus TERM_TOL of the size of the terms it sums."""
    y64, ref = y.double().reshape(-1, y.shape[-1]), ref.double().reshape(-1, ref.shape[-1])
    floor = torch.finfo(dtype).tiny * max(1, y.shape[-1]) ** 0.5
    for r in range(ref.shape[0]):
        if not torch.isfinite(ref[r]).all():
            assert not torch.isfinite(y64[r]).all(), f"row {r}: finite output for non-finite x"
            continue
        if ref[r].abs().max() > torch.finfo(dtype).max / 2:
            continue  # overflows the output dtype (as dense would): inf or a near-max value
        assert torch.isfinite(y64[r]).all(), f"row {r}: non-finite output"
        err = (y64[r] - ref[r]).norm().item()
        bound = TOL[dtype] * ref[r].norm().item() + TERM_TOL[dtype] * sizes[r].norm().item()
        assert err <= max(bound, floor), f"row {r}: error {err:.3g} > bound {bound:.3g}"


@given(codes=st.integers(1, 40).flatmap(lambda n: st.integers(1, 90).map(lambda k: (n, k))),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(codes, seed):
    N, K = codes
    c = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.uint8)
    packed = ops.pack(c)
    assert torch.equal(packed, R.pack(c))
    assert torch.equal(ops.unpack(packed, K), c)


@given(layer=layers())
def test_quantize_dequantize_prepack_match_the_reference(layer):
    N, K, G, sym, dtype, w = layer
    q, s, z = ops.quantize(w, G, sym)
    rq, rs, rz = R.quantize(w, G, sym)
    assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz)
    zeros = None if sym else z
    assert torch.equal(ops.dequantize(q, s, zeros, G, K, torch.float32),
                       R.dequantize(q, s, zeros, G, K, torch.float32))
    packed = ops.prepack(q, s, zeros, G, K)
    q2, s2, z2 = ops.unprepack(packed, N, K, G, s.dtype)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    if not sym:
        assert torch.equal(z2, z)


@given(data=st.data(), layer=layers(), isa=st.sampled_from(SUPPORTED_ISAS),
       with_bias=st.booleans())
def test_linear_matches_the_reference(data, layer, isa, with_bias):
    N, K, G, sym, dtype, w = layer
    q, s, z = ops.quantize(w, G, sym)
    zeros = None if sym else z
    bias = torch.randn(N).to(dtype) if with_bias else None
    x, values = data.draw(activations(K, dtype))
    with force(isa):
        packed = ops.prepack(q, s, zeros, G, K)
        y = ops.linear(x, packed, N, K, G, bias)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype
    check_rows(y, R.linear(values, q, s, zeros, G, bias), dtype,
               term_sizes(values, q, s, zeros, G))


@given(data=st.data(), layer=layers(), isa=st.sampled_from(SUPPORTED_ISAS))
def test_linear_w4a8_matches_the_reference(data, layer, isa):
    N, K, G, sym, dtype, w = layer
    q, s, z = ops.quantize(w, G, sym)
    zeros = None if sym else z
    x, values = data.draw(activations(K, dtype))
    with force(isa):
        packed = ops.prepack(q, s, zeros, G, K)
        if not bool(torch.isfinite(values).all()):  # int8 cannot hold them: a clear error
            with pytest.raises(RuntimeError, match="NaN or Inf"):
                ops.linear_w4a8(x, packed, N, K, G, None)
            return
        y = ops.linear_w4a8(x, packed, N, K, G, None)
    check_rows(y, R.linear_w4a8(values, q, s, zeros, G, None), dtype,
               term_sizes(values, q, s, zeros, G))


@given(data=st.data(), layer=layers(max_n=40, max_k=200), isa=st.sampled_from(SUPPORTED_ISAS))
def test_int4linear_matches_the_reference(data, layer, isa):
    N, K, G, sym, dtype, w = layer
    linear = torch.nn.Linear(K, N).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    x, values = data.draw(activations(K, dtype))
    with force(isa):
        module = Int4Linear.from_linear(linear, G, sym)
        y = module(x)
    q, s, z = module.canonical()
    check_rows(y, R.linear(values, q, s, z, G, linear.bias.detach()), dtype,
               term_sizes(values, q, s, z, G))
