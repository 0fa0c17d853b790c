"""Beyond one device: tensor-parallel Int4Linear on torch.distributed, loading a checkpoint
shard by shard, and quantizing models larger than memory block by block (docs/SCALE.md).

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    parallelize_module(model, mesh, int4kit.parallel.llama_plan(model))      # a quantized model
    int4kit.parallel.load_sharded(skeleton, directory, mesh, plan)           # or from a checkpoint
    int4kit.quantize_checkpoint(src_dir, dst_dir, config, calib_data)       # larger than memory
"""
from .loading import checkpoint_layers, load_sharded, resolve_plan
from .sharding import Shard, shard_of
from .streaming import quantize_checkpoint
from .tensor_parallel import (Int4ColwiseParallel, Int4RowwiseParallel, TensorParallelError,
                              llama_plan)

__all__ = ["Int4ColwiseParallel", "Int4RowwiseParallel", "TensorParallelError", "llama_plan",
           "load_sharded", "checkpoint_layers", "resolve_plan", "Shard", "shard_of",
           "quantize_checkpoint"]
