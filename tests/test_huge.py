"""A weight with N x K = 2^31 codes (65536 x 32768, bf16, group 128): quantize, prepack, linear,
unprepack and the state dict go through it without 32-bit index overflow, on every CPU path.
Checked against int4kit.reference on sampled rows, including the last ones, where an overflowed
offset would land. About 6 GiB at peak, the 4 GiB weight included (docs/RELIABILITY.md)."""
import gc

import pytest
import torch

from int4kit import Int4Linear, ops
from int4kit import reference as R

from conftest import ISA_ENV, SUPPORTED_ISAS

N, K, G = 65536, 32768, 128
ROWS = [0, 1, 12345, 32767, 32768, 49151, 65534, 65535]  # around 2^15 rows and the end


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def huge():
    if available_bytes() < 12 * 2**30:
        pytest.skip("needs about 12 GiB of free memory (7 at peak, with margin)")
    gen = torch.Generator().manual_seed(0)
    weight = torch.empty(N, K, dtype=torch.bfloat16)
    for start in range(0, N, 4096):  # never a float32 copy of the whole weight
        weight[start:start + 4096] = torch.randn(4096, K, generator=gen) * 0.02
    sample = weight[ROWS].clone()
    qweight, scales, zeros = ops.quantize(weight, G, False)
    del weight
    gc.collect()
    return qweight, scales, zeros, sample


def test_quantize_beyond_2_31_codes(huge):
    qweight, scales, zeros, sample = huge
    assert qweight.shape == (N, K // 2) and qweight.numel() * 2 == 2**31
    q, s, z = R.quantize(sample, G, False)
    assert torch.equal(qweight[ROWS], q) and torch.equal(scales[ROWS], s)
    assert torch.equal(zeros[ROWS], z)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_prepack_linear_unprepack_beyond_2_31_codes(huge, isa, monkeypatch):
    monkeypatch.setenv(ISA_ENV, isa)
    qweight, scales, zeros, _ = huge
    packed = ops.prepack(qweight, scales, zeros, G, K)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = ops.linear(x, packed, N, K, G, None)
    ref = R.linear(x, qweight[ROWS], scales[ROWS], zeros[ROWS], G, None)
    got = y[:, ROWS].double()
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-2
    q2, s2, z2 = ops.unprepack(packed, N, K, G, scales.dtype)
    assert torch.equal(q2[ROWS], qweight[ROWS]) and torch.equal(s2[-5:], scales[-5:])
    assert torch.equal(q2[-1], qweight[-1]) and torch.equal(z2[-1], zeros[-1])
    del q2, s2, z2, packed
    gc.collect()


def test_int4linear_state_dict_beyond_2_31_codes(huge):
    qweight, scales, zeros, _ = huge
    layer = Int4Linear.from_quantized(qweight, scales, zeros, G, K)
    state = layer.state_dict()
    assert torch.equal(state["qweight"][-3:], qweight[-3:])
    assert torch.equal(state["scales"][-3:], scales[-3:])
    w = ops.dequantize(state["qweight"][-2:], state["scales"][-2:], state["zeros"][-2:], G, K,
                       torch.float32)
    assert torch.equal(w, R.dequantize(qweight[-2:], scales[-2:], zeros[-2:], G, K,
                                       torch.float32))
