"""How an Int4Linear's canonical tensors split across tensor-parallel ranks (docs/SCALE.md).

Column-wise ("colwise"): each rank holds a slice of the output features N (rows of qweight,
scales, zeros, bias) and sees the whole input. Row-wise ("rowwise"): each rank holds a slice of
the input features K on group boundaries (columns of qweight, groups of scales and zeros) and
produces a partial sum of the output that the ranks add up.

Padding rule. A dimension D split over W ranks in units of u gives every rank the same shard
size c = ceil(D / (W u)) u; rank r covers [r c, (r + 1) c) of D, and positions at or past D are
padding. Padded output rows (colwise) have weight exactly 0 and bias 0, so they output 0; padded
input columns (rowwise) meet inputs that are 0 (the producer's padded rows, or zeros the
row-wise style appends to a replicated input). Units: rowwise u = the group size (each shard
holds whole groups; 2 for per-channel, a byte of two codes), colwise u = 1 unless the consumer
needs more (a row-wise layer reading this output: its unit; attention: whole heads).

The same functions slice in-memory tensors (parallelize_module) and tensors read lazily from a
checkpoint (load_sharded): `read(short_name, dim, start, stop)` returns that slice of one
canonical tensor, so a rank never reads more than its shard.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..nn import INPUT_STATS

STYLES = ("colwise", "rowwise")
# Padding codes: with zero point 8 and scale 1, code 8 dequantizes to exactly 0 (symmetric
# layers have the implicit zero point 8).
PAD_BYTE = 0x88
PAD_ZERO = 8.0

Reader = Callable[[str, Optional[int], int, int], torch.Tensor]


@dataclass(frozen=True)
class Shard:
    """One rank's part of a layer: positions [start, stop) of the split dimension are real, the
    shard holds `size` positions (the rest padding)."""
    style: str
    rank: int
    world: int
    start: int
    stop: int
    size: int

    @property
    def padding(self) -> int:
        return self.size - (self.stop - self.start)


def shard_of(style: str, dim: int, unit: int, rank: int, world: int) -> Shard:
    """Rank `rank`'s shard of a dimension of length `dim` split in units of `unit` (padding rule
    in the module docstring)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if unit < 1:
        raise ValueError(f"unit must be positive, got {unit}")
    size = -(-dim // (world * unit)) * unit
    start = min(rank * size, dim)
    return Shard(style, rank, world, start, min(start + size, dim), size)


def rowwise_unit(group_size: int, unit: int = 1) -> int:
    """The row-wise unit: whole groups (2 for per-channel: two codes share a byte), and a
    multiple of `unit` (what the producer of the input needs)."""
    base = 2 if group_size == -1 else group_size
    return base * unit // _gcd(base, unit)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _pad(tensor: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    """`tensor` extended along `dim` to `size` with `value`."""
    missing = size - tensor.shape[dim]
    if missing == 0:
        return tensor.contiguous()
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype)], dim)


def shard_tensors(read: Reader, settings: dict, shard: Shard) -> Dict[str, torch.Tensor]:
    """A shard's canonical tensors (short names as in the checkpoint) from a layer with
    `settings` (the native config's layer entry), reading only the slices it needs.

    colwise: rows [start, stop) of qweight, scales, zeros and bias, padded with zero-weight rows;
      input_scale and input_perm whole.
    rowwise: columns [start, stop) of the weight (start is even and on a group boundary), groups
      [start / G, ceil(stop / G)) of scales and zeros, padded to `size` columns; no bias (the
      style adds it once, after the reduction); input_scale sliced. input_perm is not sliced
      here: a permuted layer needs its whole input (the style gathers it)."""
    K, G = settings["in_features"], settings["group_size"]
    out: Dict[str, torch.Tensor] = {}
    if shard.style == "colwise":
        rows = (shard.start, shard.stop)
        out["qweight"] = _pad(read("qweight", 0, *rows), 0, shard.size, PAD_BYTE)
        out["scales"] = _pad(read("scales", 0, *rows), 0, shard.size, 1.0)
        if not settings["symmetric"]:
            out["zeros"] = _pad(read("zeros", 0, *rows), 0, shard.size, PAD_ZERO)
        if settings["bias"]:
            out["bias"] = _pad(read("bias", 0, *rows), 0, shard.size, 0.0)
        for name in ("input_scale", "input_perm"):
            if settings[name]:
                out[name] = read(name, None, 0, K)
        return out
    local_groups = 1 if G == -1 else shard.size // G
    g0, g1 = (0, 1) if G == -1 else (shard.start // G, -(-shard.stop // G))
    byte0, byte1 = shard.start // 2, (shard.stop + 1) // 2
    # an odd K's last high nibble becomes a local column: like every padded column, its input is 0
    out["qweight"] = _pad(read("qweight", 1, byte0, byte1), 1, shard.size // 2, PAD_BYTE)
    out["scales"] = _pad(read("scales", 1, g0, g1), 1, local_groups, 1.0)
    if not settings["symmetric"]:
        out["zeros"] = _pad(read("zeros", 1, g0, g1), 1, local_groups, PAD_ZERO)
    if settings["input_scale"]:
        out["input_scale"] = _pad(read("input_scale", 0, shard.start, shard.stop), 0, shard.size,
                                  1.0)
    return out


def local_settings(settings: dict, shard: Shard) -> dict:
    """The settings of the local layer a shard builds (the checkpoint entry's fields)."""
    local = dict(settings)
    local.pop(INPUT_STATS, None)  # the calibration statistics stay with the whole layer
    if shard.style == "colwise":
        local["out_features"] = shard.size
    else:
        local.update(in_features=shard.size, bias=False, input_perm=False)
    return local


def tensor_reader(tensors: Dict[str, torch.Tensor]) -> Reader:
    """A Reader over in-memory canonical tensors."""
    def read(short: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        tensor = tensors[short]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)
    return read

