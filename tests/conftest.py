"""Shared fixtures and helpers for the int4kit pytest suite.

Every test compares int4kit against `int4kit.reference` (plain PyTorch), never against int4kit's
own output, except where a property of the output itself is checked (e.g. a view gives the same
result as its contiguous copy).
"""
import os

import pytest
import torch
import torch.nn as nn

from int4kit import ops

ISA_ENV = "INT4KIT_CPU_ISA"


def supported_isas():
    """Every CPU path int4kit has that this CPU can run (read from the library, not hard-coded)."""
    return [name for name in ops.cpu_isas() if ops.cpu_isa_supported(name)]


def unsupported_isas():
    return [name for name in ops.cpu_isas() if not ops.cpu_isa_supported(name)]


SUPPORTED_ISAS = supported_isas()


@pytest.fixture(params=SUPPORTED_ISAS)
def cpu_isa(request, monkeypatch):
    """Forces one CPU path through INT4KIT_CPU_ISA (the native code reads it on every call);
    monkeypatch restores the environment afterwards."""
    monkeypatch.setenv(ISA_ENV, request.param)
    assert ops.cpu_isa() == request.param, "INT4KIT_CPU_ISA was not honoured"
    return request.param


@pytest.fixture(autouse=True)
def _clean_isa_env(monkeypatch):
    """Tests that do not force a path run on the default one, whatever the caller's environment
    (the default crossover between the GEMV and the GEMM as well)."""
    for name in (ISA_ENV, "INT4KIT_GEMM_MIN_ROWS"):
        if name in os.environ:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||_2 / ||ref||_2, computed in float64 (0 when both are empty or both zero)."""
    y = y.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != reference shape {tuple(ref.shape)}"
    num = torch.linalg.vector_norm(y - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return num
    return num / den


def random_codes(N: int, K: int, generator=None) -> torch.Tensor:
    return torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=generator)


def random_weight(N: int, K: int, dtype=torch.float32, scale: float = 0.05) -> torch.Tensor:
    """A weight with a realistic spread plus a few outliers per row."""
    w = torch.randn(N, K) * scale
    if N and K:
        idx = torch.randint(0, K, (N, max(1, K // 64)))
        w.scatter_(1, idx, torch.randn(idx.shape) * scale * 6)
    return w.to(dtype)


def make_linear(in_features, out_features, bias=True, dtype=torch.float32, device="cpu"):
    """An nn.Linear with a random_weight and a small random bias."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(random_weight(out_features, in_features))
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear.to(dtype=dtype, device=device)


@pytest.fixture
def two_threads():
    """torch.set_num_threads(2) for the test: with N = 48 (3 row blocks) two threads get a
    row-block pair and an odd leftover block, whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
