"""AWQ checkpoints (AutoAWQ, as transformers and vLLM load them), one layer at a time, into
int4kit's canonical tensors. AWQ stores asymmetric 4-bit codes with integer zero points and
dequantizes as w = (q - z) * s, like the canonical format; only the packing differs.

GEMM version, in_features K, out_features N, g = K / G groups:
  qweight int32 [K, N/8]  packed along N; nibble i of word [k, c] holds column 8c + ORDER[i]
  qzeros  int32 [g, N/8]  packed the same way
  scales  fp16  [g, N]
GEMV version:
  qweight int32 [N, K/8]  packed along K, nibble i of word [n, c] holds column 8c + i
  qzeros  int32 [N, W]    packed along groups the same way, W = ceil(g / 8) rounded up to a
                          multiple of 1, 2 or 4 words (G >= 128, 64, 32); the padding is 0
  scales  fp16  [N, 8W]   the first g columns are the scales, the rest padding
"""
from typing import Dict, Tuple

import torch

from .. import ops
from .native import canonical_settings
from .packing import unpack_int32

# the GEMM kernels' interleaving: nibble position i of a word holds column ORDER[i] of its 8
GEMM_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
VERSIONS = ("gemm", "gemv")


def gemv_zero_words(K: int, G: int) -> int:
    """Words per row of a GEMV layer's qzeros (AutoAWQ pads them for its kernels)."""
    multiple = 1 if G >= 128 else 2 if G == 64 else 4 if G == 32 else None
    if multiple is None:
        raise ValueError(f"AWQ GEMV supports group sizes 32, 64 and >= 128, got {G}")
    words = -(-(K // G) // 8)
    return -(-words // multiple) * multiple


def awq_to_canonical(tensors: Dict[str, torch.Tensor], group_size: int, version: str,
                     where: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """One AWQ layer (qweight, qzeros, scales, optional bias) -> (canonical tensors, settings)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dim() != 2 or t.dtype != torch.int32:
            raise ValueError(f"{where}.{name}: expected a 2-D int32 tensor, got "
                             f"{list(t.shape)} {t.dtype}")
    if scales.dim() != 2 or scales.dtype != torch.float16:  # AWQ's kernels take half scales
        raise ValueError(f"{where}.scales: expected a 2-D float16 tensor, got "
                         f"{list(scales.shape)} {scales.dtype}")
    if version == "gemm":
        K, N = qweight.shape[0], qweight.shape[1] * 8
    else:
        N, K = qweight.shape[0], qweight.shape[1] * 8
    if K == 0 or N == 0:
        raise ValueError(f"{where}.qweight: an empty layer ({list(qweight.shape)})")
    G = K if group_size == -1 else group_size
    if G <= 0 or G % 2 or K % G:
        raise ValueError(f"{where}: AWQ needs in_features ({K}) to be a multiple of an even "
                         f"group size, got {group_size}")
    groups = K // G
    if version == "gemm":
        expect = {"qzeros": (groups, N // 8), "scales": (groups, N)}
    else:
        words = gemv_zero_words(K, G)
        expect = {"qzeros": (N, words), "scales": (N, words * 8)}
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{where}.{name}: with qweight {list(qweight.shape)} (K = {K}, "
                             f"N = {N}) and group size {G}, expected shape {list(shape)}, got "
                             f"{list(tensors[name].shape)}")
    if version == "gemm":
        codes = unpack_int32(qweight, 1, N, GEMM_ORDER).t()  # [N, K]
        zeros = unpack_int32(qzeros, 1, N, GEMM_ORDER).t()  # [N, groups]
        scales = scales.t()
    else:
        codes = unpack_int32(qweight, 1, K)
        zeros = unpack_int32(qzeros, 1, groups)
        scales = scales[:, :groups]
    out = {"qweight": ops.pack(codes.contiguous()), "scales": scales.contiguous(),
           "zeros": zeros.to(scales.dtype).contiguous()}
    if tensors.get("bias") is not None:
        out["bias"] = tensors["bias"]
    return out, canonical_settings(out, K, group_size, "awq")
