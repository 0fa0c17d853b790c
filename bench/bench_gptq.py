#!/usr/bin/env python3
"""GPTQ speed on one large layer: a 4096 x 4096 Linear from 64k calibration tokens (issue target:
<= 10 s on the 2-core dev machine), split into collecting the Hessian (the calibration engine's
LayerStats, 2048-token batches) and the GPTQ pass, with the layer objective against RTN.

The activations are synthetic but correlated (a random mixing matrix plus noise), so the Hessian is
dense and well conditioned like a real layer's input statistics.

    python bench/bench_gptq.py                     # 4096 x 4096, 64k tokens, group 128 asymmetric
    python bench/bench_gptq.py --features 2048 --tokens 16384 --group-size 32
    python bench/bench_gptq.py --refine-rounds 2            # plus two grid refits, one more pass
    python bench/bench_gptq.py --memory 4096 14336 --rows 4096   # peak memory of the solve per K
    python bench/bench_gptq.py --memory 4096 14336 --rows 4096 --overwrite   # as quantize_model

--memory runs gptq() once per K in a fresh process on a synthetic positive definite Hessian
(float32) and reports the peak resident memory the call adds above its inputs (Linux:
/proc/self/clear_refs resets the peak), next to docs/SCALE.md's formula. --overwrite runs it as
quantize_model does: H in the calibration engine's dtype (float64 up to K = 4096), taken over by
the solve (overwrite_hessian=True), uint8 codes returned.
"""
import argparse
import os
import re
import subprocess
import sys
import time

import torch

from int4kit.quant.calibration import LayerStats
from int4kit.quant.gptq import gptq
from int4kit.quant.rtn import rtn


def layer_objective(w, codes, s, z, G, H):
    """tr((W - Wq) H (W - Wq)^T): the GPTQ objective, in float64."""
    K = w.shape[1]
    s_full = s.double().repeat_interleave(G, dim=1)[:, :K]
    z_full = z.double().repeat_interleave(G, dim=1)[:, :K]
    d = (codes.double() - z_full) * s_full - w.double()
    return torch.einsum("nk,kj,nj->", d, H.double(), d).item()


def _rss_mib(field: str) -> float:
    status = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def predicted_peak_mib(K: int, N: int, group_size: int, overwrite: bool = False) -> float:
    """docs/SCALE.md's formula for what gptq() adds above a float32 w and H, the largest of its
    three phases: the solve (the K x K buffer in the solve dtype unless H is overwritten, plus the
    float32 copy of a float64 result), the pass (the float32 factor unless it is H's own memory,
    the float32 working copy of W^T and the uint8 codes) and the return (uint8 codes and the
    ones returned: int64, or uint8 with overwrite as quantize_model asks); 16 MiB of row slices."""
    from int4kit.quant.gptq import solve_dtype
    b = solve_dtype(K).itemsize
    float32_copy = K * K * 4 if b == 8 else 0
    solve = (0 if overwrite else K * K * b) + float32_copy
    run = (0 if overwrite and b == 4 else K * K * 4) + N * K * (4 + 1)
    end = N * K * (1 + (1 if overwrite else 8))
    return (max(solve, run, end) + (16 << 20)) / 2**20


def measure_memory(K: int, N: int, group_size: int, overwrite: bool = False) -> None:
    """One line of the memory table, printed by a fresh process."""
    from int4kit.quant.calibration import matrix_dtype
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    A = torch.randn(K, 64, generator=g)
    H = (A @ A.T / 64).to(matrix_dtype(K) if overwrite else torch.float32)
    H.diagonal().add_(0.1)
    del A
    open("/proc/self/clear_refs", "w").write("5")
    base = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    gptq(w, H, group_size, False, overwrite_hessian=overwrite,
         codes_dtype=torch.uint8 if overwrite else torch.int64)
    seconds = time.perf_counter() - t0
    peak = _rss_mib("VmHWM") - base
    from int4kit.quant.gptq import solve_dtype
    print(f"| {K} | {N} | {str(solve_dtype(K)).removeprefix('torch.')} | "
          f"{K * K * H.element_size() / 2**20:.0f} | {peak:.0f} | "
          f"{predicted_peak_mib(K, N, group_size, overwrite):.0f} | {seconds:.0f} s |", flush=True)


def memory_table(sizes, N, group_size, overwrite=False) -> int:
    held = ("H in the calibration engine's dtype, overwritten by the solve, uint8 codes"
            if overwrite else "H (float32)")
    print(f"GPTQ solve, group {group_size} asymmetric, {torch.get_num_threads()} threads; "
          f"peak resident memory added by gptq() above w (float32) and {held}")
    print("| K | N | solve dtype | H (MiB) | peak added (MiB) | formula (MiB) | time |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for K in sizes:
        code = (f"import sys; sys.argv = ['bench_gptq']; import bench_gptq; "
                f"bench_gptq.measure_memory({K}, {N or K}, {group_size}, {overwrite})")
        subprocess.run([sys.executable, "-c", code], check=True,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4096, help="in_features = out_features")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--refine-rounds", type=int, default=0,
                   help="QuantConfig.refine_rounds: grid refits alternated with GPTQ passes")
    p.add_argument("--memory", type=int, nargs="+", metavar="K",
                   help="measure the peak memory of the solve at these in_features instead")
    p.add_argument("--rows", type=int, default=None,
                   help="out_features for --memory (default: K)")
    p.add_argument("--overwrite", action="store_true",
                   help="--memory as quantize_model runs it: H in the calibration engine's "
                        "dtype, taken over by the solve")
    args = p.parse_args(argv)
    if args.memory:
        return memory_table(args.memory, args.rows, args.group_size, args.overwrite)
    K = N = args.features
    G = K if args.group_size == -1 else args.group_size
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    mix = torch.randn(K, K, generator=g) / K ** 0.5
    batches = [torch.randn(args.batch, K, generator=g) @ mix + 0.1 * torch.randn(args.batch, K, generator=g)
               for _ in range(args.tokens // args.batch)]

    stats = LayerStats(K, hessian=True, absmean=False)
    t0 = time.perf_counter()
    for x in batches:
        stats.add(x)
    H = stats.hessian
    t1 = time.perf_counter()
    codes, s, z = gptq(w, H, args.group_size, args.symmetric, damp=0.1,
                      refine_rounds=args.refine_rounds)
    t2 = time.perf_counter()
    rtn_codes, rtn_s, rtn_z = rtn(w, args.group_size, args.symmetric)
    obj_gptq = layer_objective(w, codes, s, z, G, H)
    obj_rtn = layer_objective(w, rtn_codes, rtn_s, rtn_z, G, H)
    print(f"{N}x{K}, {stats.count} tokens, group {args.group_size}, "
          f"{'symmetric' if args.symmetric else 'asymmetric'}, refine_rounds {args.refine_rounds}, "
          f"{torch.get_num_threads()} threads")
    print(f"| Hessian | GPTQ pass | total | objective GPTQ / RTN |\n|---|---|---|---|\n"
          f"| {t1 - t0:.2f} s | {t2 - t1:.2f} s | {t2 - t0:.2f} s | {obj_gptq / obj_rtn:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
