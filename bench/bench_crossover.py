#!/usr/bin/env python3
"""Where the CPU linear should leave the GEMV for the GEMM, measured on this machine.

For each CPU path, dtype of x, shape and M, ops.linear runs once with the GEMV forced
(INT4KIT_GEMM_MIN_ROWS above M) and once with the GEMM forced (INT4KIT_GEMM_MIN_ROWS=1), each in
its own child process, hot (one weight reused), best of --reps calls; the two alternate --rounds
times and each keeps its minimum (this VM's timings drift by up to 2x between processes). The
table gives both and their ratio; the crossovers int4kit uses are the constants in each ISA's
Simd traits (csrc/cpu/linear_simd.h's gemm_min_rows; docs/benchmarks.md, "GEMV or GEMM").

    python bench/bench_crossover.py                          # this CPU's best path, bf16 and fp32 x
    python bench/bench_crossover.py --isa avx2 avx512 --m 8 16 32 64 128 256 512 1024
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NEVER = 1 << 40  # INT4KIT_GEMM_MIN_ROWS beyond every M: the GEMV throughout


def child(args) -> int:
    """Times ops.linear for every shape and M of the arguments under this process's settings;
    prints {"KxN M": ms} as JSON."""
    from int4kit import ops
    from int4kit import reference as R
    torch.manual_seed(0)
    times = {}
    for shape in args.shapes:
        K, N = map(int, shape.split("x"))
        q, s, z = R.quantize(torch.randn(N, K) * 0.02, args.group_size, False)
        dtype = DTYPES[args.dtype]
        packed = ops.prepack(q, s.to(dtype), z.to(dtype), args.group_size, K)
        for M in args.m:
            x = torch.randn(M, K).to(dtype)
            for _ in range(2):  # warm-up: workspaces grown, weights in cache
                ops.linear(x, packed, N, K, args.group_size, None)
            best = float("inf")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                ops.linear(x, packed, N, K, args.group_size, None)
                best = min(best, time.perf_counter() - t0)
            times[f"{shape} {M}"] = best * 1e3
    print(json.dumps(times))
    return 0


def run_child(args, isa: str, dtype: str, gemm_from: int) -> dict:
    env = dict(os.environ, INT4KIT_CPU_ISA=isa, INT4KIT_GEMM_MIN_ROWS=str(gemm_from))
    command = [sys.executable, os.path.abspath(__file__), "--child", "--dtype", dtype,
               "--group-size", str(args.group_size), "--reps", str(args.reps),
               "--shapes", *args.shapes, "--m", *map(str, args.m)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", nargs="+", default=None,
                   help="CPU paths (avx2, avx512, amx); default: this CPU's best")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096"], help="KxN")
    p.add_argument("--m", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import int4kit
    isas = args.isa or [int4kit.cpu_isa()]
    unsupported = [isa for isa in isas if not int4kit.ops.cpu_isa_supported(isa)]
    if unsupported:
        p.error(f"--isa: this CPU cannot run {unsupported}")
    print(f"{torch.get_num_threads()} threads, hot, best of {args.reps} calls, minimum over "
          f"{args.rounds} alternating rounds; group {args.group_size} asymmetric", flush=True)
    print("| path | x | K x N | M | GEMM ms | GEMV ms | GEMM / GEMV |\n|---|---|---|---|---|---|---|")
    for isa in isas:
        for dtype in args.dtypes:
            best = {"gemm": {}, "gemv": {}}
            for _ in range(args.rounds):
                for path, gemm_from in (("gemm", 1), ("gemv", NEVER)):
                    for key, ms in run_child(args, isa, dtype, gemm_from).items():
                        best[path][key] = min(best[path].get(key, float("inf")), ms)
            for key in best["gemm"]:
                shape, M = key.split()
                gemm, gemv = best["gemm"][key], best["gemv"][key]
                print(f"| {isa} | {dtype} | {shape} | {M} | {gemm:.3f} | {gemv:.3f} | "
                      f"{gemm / gemv:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
