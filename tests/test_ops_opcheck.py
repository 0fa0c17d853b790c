"""Tier 3: every op passes torch.library.opcheck (schema, fake/meta kernel, autograd registration,
AOT dispatch with dynamic shapes), and torch.compile(fullgraph=True) traces a model of Int4Linear
layers without graph breaks and matches eager mode."""
import pytest
import torch
import torch.nn as nn

import int4kit
from int4kit import ops
from int4kit import reference as R

from conftest import random_codes, random_weight, rel_err


def _canonical(N=20, K=100, G=32, symmetric=False, dtype=torch.float32):
    weight = random_weight(N, K, dtype)
    qweight, scales, zeros = R.quantize(weight, G, symmetric)
    return weight, qweight, scales, None if symmetric else zeros


def _opcheck_cases():
    torch.manual_seed(0)  # built at import time: keep the inputs the same from run to run
    cases = []
    N, K, G = 20, 100, 32
    for symmetric in (True, False):
        tag = "sym" if symmetric else "asym"
        weight, qweight, scales, zeros = _canonical(N, K, G, symmetric)
        packed = ops.prepack(qweight, scales, zeros, G, K)
        cases += [
            (f"quantize-{tag}", "quantize", (weight, G, symmetric)),
            (f"quantize-per-channel-{tag}", "quantize", (weight, -1, symmetric)),
            (f"dequantize-{tag}", "dequantize", (qweight, scales, zeros, G, K, torch.float32)),
            (f"dequantize-bf16-{tag}", "dequantize",
             (qweight, scales, zeros, G, K, torch.bfloat16)),
            (f"prepack-{tag}", "prepack", (qweight, scales, zeros, G, K)),
            (f"unprepack-{tag}", "unprepack", (packed, N, K, G, torch.float32)),
            (f"linear-{tag}", "linear", (torch.randn(3, K), packed, N, K, G, None)),
            (f"linear-bias-3d-{tag}", "linear",
             (torch.randn(2, 3, K), packed, N, K, G, torch.randn(N))),
        ]
    _, qweight, scales, zeros = _canonical(N, K, G, False, torch.bfloat16)
    packed = ops.prepack(qweight, scales, zeros, G, K)
    cases += [
        ("pack", "pack", (random_codes(7, 33),)),
        ("pack-even", "pack", (random_codes(4, 64),)),
        ("unpack", "unpack", (R.pack(random_codes(7, 33)), 33)),
        ("quantize-bf16", "quantize", (random_weight(N, K, torch.bfloat16), G, False)),
        ("quantize-fp16", "quantize", (random_weight(N, K, torch.float16), G, True)),
        ("unprepack-bf16", "unprepack", (packed, N, K, G, torch.bfloat16)),
        ("linear-bf16", "linear",
         (torch.randn(5, K, dtype=torch.bfloat16), packed, N, K, G, torch.randn(N).bfloat16())),
        ("linear-fp16", "linear", (torch.randn(5, K, dtype=torch.float16), packed, N, K, G, None)),
        ("linear-empty-batch", "linear", (torch.randn(0, K), packed, N, K, G, None)),
        ("linear_w4a8", "linear_w4a8", (torch.randn(3, K), packed, N, K, G, None)),
        ("linear_w4a8-bf16-bias-3d", "linear_w4a8",
         (torch.randn(2, 3, K, dtype=torch.bfloat16), packed, N, K, G, torch.randn(N))),
        ]
    for symmetric in (True, False):
        tag = "sym" if symmetric else "asym"
        qweight, scales, zeros = R.quantize(random_weight(N, K, torch.bfloat16), G, symmetric, bits=8)
        zeros = None if symmetric else zeros
        packed = ops.prepack_int8(qweight, scales, zeros, G)
        cases += [
            (f"prepack_int8-{tag}", "prepack_int8", (qweight, scales, zeros, G)),
            (f"unprepack_int8-{tag}", "unprepack_int8", (packed, N, K, G, torch.bfloat16)),
            (f"linear_int8-{tag}", "linear_int8", (torch.randn(3, K), packed, N, K, G, None)),
            (f"linear_int8-bf16-bias-3d-{tag}", "linear_int8",
             (torch.randn(2, 9, K, dtype=torch.bfloat16), packed, N, K, G, torch.randn(N))),
        ]
    w = torch.randn(8, N)
    scales = torch.rand(3, N) + 0.1
    zeros = torch.randint(0, 16, (3, N)).float()
    cases.append(("gptq_columns", "gptq_columns",
                  (w, torch.eye(8) + torch.randn(8, 8).triu(1), scales, zeros,
                   torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]), torch.empty(8, N, dtype=torch.uint8),
                   torch.empty(8, N), False, 15)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("name,args", [(op, args) for _, op, args in OPCHECK_CASES],
                         ids=[case_id for case_id, _, _ in OPCHECK_CASES])
def test_opcheck(name, args):
    # the default test_utils (test_schema, test_autograd_registration, test_faketensor,
    # test_aot_dispatch_dynamic) all pass, integer outputs included, so none is left out
    torch.library.opcheck(getattr(torch.ops.int4kit, name).default, args)


def test_every_op_has_an_opcheck_case():
    # a new op in csrc/ops.cpp must get an opcheck case here
    schemas = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
               if s.name.startswith("int4kit::")}
    assert schemas, "no int4kit ops registered"
    assert schemas <= {op for _, op, _ in OPCHECK_CASES}, schemas - {op for _, op, _ in OPCHECK_CASES}


def test_fake_shapes_match_real_outputs():
    # the register_fake kernels report the shapes and dtypes the CPU kernels really return
    from torch._subclasses.fake_tensor import FakeTensorMode

    for _, name, args in OPCHECK_CASES:
        op = getattr(torch.ops.int4kit, name).default
        real = op(*args)
        if real is None:  # an op that only writes into its arguments
            continue
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype, name


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 40, bias=False), nn.ReLU(),
                          nn.Linear(40, 24))
    quantized = nn.Sequential(
        int4kit.Int4Linear.from_linear(dense[0], group_size=32, symmetric=False),
        nn.ReLU(),
        int4kit.Int4Linear.from_linear(dense[2], group_size=-1, symmetric=True),
        nn.ReLU(),
        int4kit.Int4Linear.from_linear(dense[4], group_size=8, symmetric=False),
    )
    return quantized.eval()


def _reference_forward(model, x):
    h = x
    for layer in model:
        if isinstance(layer, int4kit.Int4Linear):
            qweight, scales, zeros = layer.canonical()
            h = R.linear(h.to(x.dtype), qweight, scales, zeros, layer.group_size, layer.bias)
        else:
            h = layer(h)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_fullgraph_matches_eager(dtype):
    torch._dynamo.reset()
    model = _model()
    if dtype != torch.float32:
        model = model.to(dtype)  # casts the biases; the quantized weights stay as they are
    x = torch.randn(2, 5, 96, dtype=dtype)
    with torch.no_grad():
        eager = model(x)
        compiled_model = torch.compile(model, fullgraph=True)
        compiled = compiled_model(x)
        compiled_again = compiled_model(torch.randn(2, 5, 96, dtype=dtype))
    assert compiled.dtype == eager.dtype == dtype
    assert compiled.shape == eager.shape == (2, 5, 24)
    assert compiled_again.shape == (2, 5, 24)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)
    # and both are right, not merely equal to each other
    assert rel_err(eager, _reference_forward(model, x)) <= 2e-2


def test_compile_fullgraph_ops_directly():
    # the raw ops (quantize -> prepack -> linear) trace as one graph too
    torch._dynamo.reset()
    K, N, G = 64, 24, 32
    weight = random_weight(N, K)
    x = torch.randn(3, K)

    def fn(weight, x):
        qweight, scales, zeros = ops.quantize(weight, G, False)
        packed = ops.prepack(qweight, scales, zeros, G, K)
        return ops.linear(x, packed, N, K, G, None), ops.dequantize(qweight, scales, zeros, G, K)

    y, w = torch.compile(fn, fullgraph=True, backend="aot_eager")(weight, x)
    rq, rs, rz = R.quantize(weight, G, False)
    assert torch.equal(w, R.dequantize(rq, rs, rz, G, K, torch.float32))
    assert rel_err(y, R.linear(x, rq, rs, rz, G)) <= 1e-5
