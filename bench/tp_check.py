#!/usr/bin/env python3
"""Tensor parallelism on GPUs (NCCL): a random Llama quantized on every rank the same way,
parallelized with int4kit.parallel.llama_plan, against the same model on one GPU. The CPU/gloo
version of this check is tests/test_parallel.py; this one needs several GPUs
(bench/gpu_check.sh runs it when the device has them).

    torchrun --nproc_per_node=2 bench/tp_check.py
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import distributed  # noqa: E402  (the tests' model builders)


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    import int4kit.parallel as tp
    mesh = init_device_mesh("cuda", (world,))
    worst = 0.0
    for padded in (False, True):
        for dtype, bound in ((torch.float16, 5e-3), (torch.bfloat16, 2e-2)):
            model = distributed.quantized_llama(distributed.tiny_llama_config(padded), dtype)
            model = model.cuda()
            ids = distributed.tokens(length=32).cuda()
            expected = distributed.logits(model, ids)
            parallelize_module(model, mesh, tp.llama_plan(model))
            error = distributed.max_relative(distributed.logits(model, ids), expected)
            worst = max(worst, error / bound)
            if rank == 0:
                print(f"padded={padded} {dtype}: relative error {error:.3g} (bound {bound})",
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("tp_check: " + ("ok" if worst <= 1 else "FAILED"), flush=True)
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
