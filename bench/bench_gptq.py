#!/usr/bin/env python3
"""GPTQ speed on one large layer: a 4096 x 4096 Linear from 64k calibration tokens (issue target:
<= 10 s on the 2-core dev machine), split into collecting the Hessian (the calibration engine's
LayerStats, 2048-token batches) and the GPTQ pass, with the layer objective against RTN.

The activations are synthetic but correlated (a random mixing matrix plus noise), so the Hessian is
dense and well conditioned like a real layer's input statistics.

    python bench/bench_gptq.py                     # 4096 x 4096, 64k tokens, group 128 asymmetric
    python bench/bench_gptq.py --features 2048 --tokens 16384 --group-size 32
    python bench/bench_gptq.py --refine-rounds 2            # plus two grid refits, one more pass
"""
import argparse
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4096, help="in_features = out_features")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--refine-rounds", type=int, default=0,
                   help="QuantConfig.refine_rounds: grid refits alternated with GPTQ passes")
    args = p.parse_args(argv)
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
