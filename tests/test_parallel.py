"""Tensor parallelism (int4kit.parallel, docs/SCALE.md): the shard arithmetic against the whole
layer's dequantized weights, then 2- and 3-process gloo runs (tests/distributed.py) against the
same model run in one process."""
import pytest
import torch

import int4kit
import int4kit.parallel as tp
from int4kit import Int4Linear
from int4kit.formats.native import layer_settings
from int4kit.parallel.sharding import local_settings, shard_tensors, tensor_reader

import distributed


def canonical(layer):
    qweight, scales, zeros = layer.canonical()
    tensors = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach()
    return tensors


def local_weight(layer, shard):
    settings = layer_settings(layer)
    tensors = shard_tensors(tensor_reader(canonical(layer)), settings, shard)
    local = local_settings(settings, shard)
    return int4kit.ops.dequantize(tensors["qweight"], tensors["scales"], tensors.get("zeros"),
                                  local["group_size"], local["in_features"], torch.float32), tensors


@pytest.mark.parametrize("dim, unit, world", [(96, 32, 2), (100, 32, 3), (7, 1, 2), (2, 1, 4)])
def test_padding_rule(dim, unit, world):
    shards = [tp.shard_of("rowwise", dim, unit, r, world) for r in range(world)]
    size = shards[0].size
    assert size % unit == 0 and size * world >= dim > (size - unit) * world  # the smallest
    assert [s.start for s in shards] == [min(r * size, dim) for r in range(world)]
    assert sum(s.stop - s.start for s in shards) == dim
    assert all(s.size == size for s in shards)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n, k, group_size, world", [(70, 64, 16, 2), (33, 100, 32, 3),
                                                     (8, 99, -1, 2), (5, 40, 8, 4)])
def test_shards_reassemble_the_layer(symmetric, n, k, group_size, world):
    """Colwise shards stacked and rowwise shards side by side (padding cut off) are the whole
    layer's dequantized weight exactly; padded rows are exactly zero with zero bias."""
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(k, n), group_size, symmetric)
    layer.bias.data.normal_()
    whole = layer.dequantized_weight()
    rows, cols = [], []
    unit = 2 if group_size == -1 else group_size
    for rank in range(world):
        shard = tp.shard_of("colwise", n, 3, rank, world)
        real = shard.stop - shard.start
        w, tensors = local_weight(layer, shard)
        rows.append(w[:real])
        assert not w[real:].any() and not tensors["bias"][real:].any()
        assert torch.equal(tensors["bias"][:real], layer.bias[shard.start:shard.stop])
        shard = tp.shard_of("rowwise", k, unit, rank, world)
        w, tensors = local_weight(layer, shard)
        assert "bias" not in tensors and w.shape == (n, shard.size)
        cols.append(w[:, :shard.stop - shard.start])
    assert torch.equal(torch.cat(rows), whole)
    assert torch.equal(torch.cat(cols, 1), whole)


@pytest.mark.parametrize("padded_heads", [False, True], ids=["even", "padded-heads"])
def test_llama_fp32_matches_one_process(padded_heads):
    """2 ranks, every MLP shard padded (and with padded_heads, 3 key/value heads over 2 ranks):
    within 1e-5 of the single-process logits."""
    distributed.run_ranks(distributed.check_llama_matches_one_process, 2,
                          (padded_heads, torch.float32, 1e-5))


def test_llama_bf16_within_documented_bound():
    """bf16 partial sums are rounded before the fp32 reduction: docs/SCALE.md's bound, 2e-2."""
    distributed.run_ranks(distributed.check_llama_matches_one_process, 2,
                          (False, torch.bfloat16, 2e-2))


@pytest.mark.parametrize("world, verify", [(2, False), (3, True)])
def test_load_sharded_reads_only_its_shard(tmp_path, world, verify):
    """One checkpoint, loaded at world sizes 2 and 3 (at 3 the last rank's key/value shard is
    all padding): the logits of the whole checkpoint on one process."""
    int4kit.save_quantized(distributed.quantized_llama(distributed.tiny_llama_config()), tmp_path)
    distributed.run_ranks(distributed.check_load_sharded, world, (str(tmp_path), verify))


def test_replicated_layouts_bias_perm_and_w4a8():
    distributed.run_ranks(distributed.check_replicated_styles, 2)


def test_bad_plans_raise_on_every_rank():
    distributed.run_ranks(distributed.check_bad_plans, 2)


def test_a_shard_cannot_be_saved(tmp_path):
    layer = Int4Linear(32, 16, group_size=16)
    layer.tp_shard = object()
    with pytest.raises(ValueError, match="tensor-parallel shard"):
        int4kit.save_quantized(torch.nn.Sequential(layer), tmp_path)


def test_styles_refuse_what_they_cannot_shard():
    with pytest.raises(tp.TensorParallelError, match="Shard\\(-1\\) or Replicate"):
        tp.Int4ColwiseParallel(output_layouts=torch.distributed.tensor.Shard(0))
    with pytest.raises(tp.TensorParallelError, match="unit"):
        tp.Int4RowwiseParallel(unit=0)
    with pytest.raises(tp.TensorParallelError, match="a Llama-style decoder"):
        tp.llama_plan(torch.nn.Linear(2, 2))
