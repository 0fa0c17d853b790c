"""4-bit codes in 32-bit words, the way the foreign formats store them, and the act-order
permutation. Pure tensor functions: the per-format modules say which dimension is packed and in
which nibble order."""
from typing import Optional, Sequence

import torch

NIBBLES = 8  # 4-bit values per 32-bit word


class NotRepresentable(ValueError):
    """The target format cannot hold these weights exactly (re-quantizing them would)."""
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int32(words: torch.Tensor, dim: int, length: int,
                 order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """int32 words holding 8 nibbles each along `dim` -> uint8 values 0..15, `length` of them
    along `dim` (the padding of the last word is dropped).

    order[i] is the element a word's nibble i (bits 4i..4i+3) holds; None is 0..7 (least
    significant nibble first)."""
    if words.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {words.dtype}")
    moved = words.movedim(dim, -1)
    nibbles = (moved.unsqueeze(-1) >> _SHIFTS) & 0xF  # [..., words, nibble position]
    if order is not None:
        inverse = torch.empty(NIBBLES, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(NIBBLES)
        nibbles = nibbles[..., inverse]  # element j sits at nibble position inverse[j]
    values = nibbles.flatten(-2)[..., :length].to(torch.uint8)
    return values.movedim(-1, dim).contiguous()


def pack_int32(values: torch.Tensor, dim: int, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of unpack_int32: values 0..15 along `dim` -> int32 words (the last one padded with
    zero nibbles)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError("values to pack must lie in 0..15")
    moved = values.movedim(dim, -1).to(torch.int32)
    length = moved.shape[-1]
    padded = -(-length // NIBBLES) * NIBBLES
    moved = torch.nn.functional.pad(moved, (0, padded - length))
    grouped = moved.reshape(*moved.shape[:-1], padded // NIBBLES, NIBBLES)
    if order is not None:
        grouped = grouped[..., list(order)]  # nibble position i holds element order[i]
    # shifting into the sign bit is well defined for int32 tensors (two's complement)
    words = (grouped << _SHIFTS).sum(-1, dtype=torch.int64)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def group_permutation(g_idx: torch.Tensor, group_size: int, what: str) -> Optional[torch.Tensor]:
    """For a g_idx (the group of each input column, GPTQ act-order), the permutation that makes
    every group contiguous and in order, or None when it already is (g_idx[k] = k // G).

    Raises ValueError (naming `what`) unless the groups are equal: group g must hold G columns,
    the last one K - G * (groups - 1)."""
    K = g_idx.numel()
    groups = -(-K // group_size)
    g = g_idx.to(torch.int64)
    if g.dim() != 1 or (K and (int(g.min()) < 0 or int(g.max()) >= groups)):
        raise ValueError(f"{what}: g_idx must hold group indices in 0..{groups - 1} "
                         f"(K = {K}, group size {group_size})")
    expected = torch.full((groups,), group_size, dtype=torch.int64)
    if groups:
        expected[-1] = K - group_size * (groups - 1)
    counts = torch.bincount(g, minlength=groups)
    if not torch.equal(counts, expected):
        bad = int((counts != expected).nonzero()[0])
        raise ValueError(f"{what}: g_idx does not split the {K} input columns into equal groups "
                         f"of {group_size}: group {bad} has {int(counts[bad])} columns, expected "
                         f"{int(expected[bad])}")
    if torch.equal(g, torch.arange(K) // group_size):
        return None
    return torch.argsort(g, stable=True)
