"""Runs a function on several CPU processes joined by gloo (torch.distributed), for the
tensor-parallel tests: a file:// rendezvous, one thread per rank, collectives that time out
instead of hanging, and a barrier before the process group is destroyed.

A rank that passed leaves with os._exit(0) once the group is destroyed: the device mesh and the
parallelized modules keep gloo's process group alive past destroy_process_group, and its threads
meeting the interpreter's teardown now and then aborted a passing rank on a loaded CI machine
("terminate called without an active exception"). Skipping that teardown loses nothing a test
checks; a rank that fails still raises, and mp.spawn reports its traceback. faulthandler prints
every thread's stack should a rank still abort.

    run_ranks(check_something, world=2, args=(...))   # check_something(rank, mesh, *args)

The functions live in this module (or another importable one) so the spawned processes can find
them; an assertion in any rank fails the test with that rank's traceback.
"""
import datetime
import faulthandler
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)


def _entry(rank, fn, world, init_file, args):
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        fn(rank, init_device_mesh("cpu", (world,)), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int = 2, args=()):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world, os.path.join(tmp, "rendezvous"), args), nprocs=world)


# ---- models -------------------------------------------------------------------------------------

def tiny_llama_config(padded_heads: bool = False):
    """A random Llama small enough for one thread. Every MLP intermediate size leaves a padded
    shard at world size 2 (group 32: 3 or 5 groups); padded_heads also gives 3 key/value heads."""
    from transformers import LlamaConfig
    heads, kv_heads = (6, 3) if padded_heads else (4, 2)
    return LlamaConfig(hidden_size=16 * heads, intermediate_size=160 if padded_heads else 96,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                       num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
                       attention_bias=padded_heads, attn_implementation="eager")


def quantized_llama(config, dtype=torch.float32, seed=0):
    """The random Llama of `config` with every decoder Linear quantized (RTN, group 32,
    asymmetric), lm_head dense; the same on every process for the same seed."""
    import int4kit
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().to(dtype)
    for name, param in model.named_parameters():
        if name.endswith("bias"):  # transformers initialises biases at zero
            torch.nn.init.normal_(param, std=0.1)
    int4kit.quantize_model(model, int4kit.QuantConfig(group_size=32, symmetric=False),
                           skip=["lm_head"])
    return model


def tokens(seed=1, batch=2, length=7, vocab=128):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def max_relative(out, ref):
    """max |out - ref| / max |ref|: the error measure of docs/SCALE.md."""
    return float((out - ref).abs().max() / ref.abs().max())


# ---- what each rank runs --------------------------------------------------------------------------

def check_llama_matches_one_process(rank, mesh, padded_heads, dtype, bound):
    """A quantized Llama parallelized with llama_plan gives the single-process logits."""
    from torch.distributed.tensor.parallel import parallelize_module
    import int4kit.parallel as tp
    model = quantized_llama(tiny_llama_config(padded_heads), dtype)
    ids = tokens()
    expected = logits(model, ids)
    plan = tp.llama_plan(model)
    parallelize_module(model, mesh, plan)
    down = model.model.layers[0].mlp.down_proj
    intermediate = model.config.intermediate_size
    assert down.tp_shard.shard == tp.shard_of("rowwise", intermediate, 32, rank, mesh.size())
    assert down.in_features == -(-intermediate // (32 * mesh.size())) * 32
    got = logits(model, ids)
    error = max_relative(got, expected)
    assert error <= bound, f"rank {rank}: relative error {error:.3g} > {bound:.3g}"


def check_load_sharded(rank, mesh, directory, verify):
    """load_sharded reads only this rank's slices (verify=False: a whole read of a planned
    tensor fails) and gives the logits of the whole checkpoint loaded on one process."""
    import int4kit
    import int4kit.parallel as tp
    from int4kit.formats.files import CheckpointReader
    from transformers import LlamaForCausalLM
    ids = tokens()
    config = tiny_llama_config()
    with int4kit.skeleton():
        whole = LlamaForCausalLM(config).eval()
    expected = logits(int4kit.load_quantized(whole, directory), ids)
    with int4kit.skeleton():
        model = LlamaForCausalLM(config).eval()
    plan = tp.llama_plan(model, tp.checkpoint_layers(directory))
    planned = tuple(f"{name}.{part}" for name in plan for part in ("qweight", "scales", "zeros"))
    original_get = CheckpointReader.get

    def get(self, key):
        assert verify or key not in planned, f"{key} was read whole"
        return original_get(self, key)

    CheckpointReader.get = get
    try:
        tp.load_sharded(model, directory, mesh, plan, verify=verify)
    finally:
        CheckpointReader.get = original_get
    error = max_relative(logits(model, ids), expected)
    assert error <= 1e-5, f"rank {rank}: relative error {error:.3g}"


class Mlp(torch.nn.Module):
    def __init__(self, up, down):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _layer(n, k, seed, perm=False, act_quant=None, symmetric=False):
    from int4kit import Int4Linear
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    layer = Int4Linear.from_linear(linear, group_size=16, symmetric=symmetric,
                                   act_quant=act_quant)
    layer.input_scale = torch.rand(k) + 0.5
    if perm:
        layer.input_perm = torch.randperm(k)
    return layer


def check_replicated_styles(rank, mesh):
    """Colwise with a gathered output feeding rowwise with a replicated input (which gathers
    through input_perm, scales by input_scale, pads and adds the bias once): the one-process
    output; W4A8 within its documented bound; odd sizes everywhere."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import parallelize_module
    import int4kit.parallel as tp
    x = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(2))
    for act_quant, bound in ((None, 1e-5), ("int8", 3e-2)):
        model = Mlp(_layer(70, 50, 0, act_quant=act_quant), _layer(30, 70, 1, perm=True,
                                                                  act_quant=act_quant))
        with torch.no_grad():
            expected = model(x)
        parallelize_module(model, mesh, {
            "up": tp.Int4ColwiseParallel(output_layouts=Replicate()),
            "down": tp.Int4RowwiseParallel(input_layouts=Replicate())})
        with torch.no_grad():
            got = model(x)
        assert got.shape == expected.shape
        error = max_relative(got, expected)
        assert error <= bound, f"rank {rank} act_quant={act_quant}: {error:.3g} > {bound}"


def check_bad_plans(rank, mesh):
    """Ranks that disagree on a layer's style, a sharded input of the wrong width and a layer
    with input_perm given a sharded input raise TensorParallelError on every rank."""
    import pytest
    from torch.distributed.tensor.parallel import parallelize_module
    import int4kit.parallel as tp
    style = tp.Int4ColwiseParallel() if rank == 0 else tp.Int4RowwiseParallel()
    with pytest.raises(tp.TensorParallelError, match="disagree"):
        parallelize_module(Mlp(_layer(64, 32, 0), _layer(32, 64, 1)), mesh, {"up": style})
    model = Mlp(_layer(64, 32, 0), _layer(32, 64, 1))
    parallelize_module(model, mesh, {"down": tp.Int4RowwiseParallel()})
    with pytest.raises(tp.TensorParallelError, match="expects 32"):
        model.down(torch.randn(2, 64))
    with pytest.raises(tp.TensorParallelError, match="input_perm"):
        parallelize_module(Mlp(_layer(64, 32, 0), _layer(32, 64, 1, perm=True)), mesh,
                           {"down": tp.Int4RowwiseParallel()})
