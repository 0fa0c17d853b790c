"""GPTQ checkpoints (AutoGPTQ / GPTQModel, as vLLM and transformers load them), one layer at a
time, to and from int4kit's canonical tensors.

A GPTQ layer with in_features K, out_features N, group size G and g = ceil(K/G) groups holds:
  qweight  int32 [K/8, N]   codes packed along K: word [i, n] holds row k = 8i + j in bits 4j..4j+3
  qzeros   int32 [g, N/8]   zero points packed along N the same way
  scales   fp16/bf16 [g, N]
  g_idx    int32 [K]        the group of each input column (k // G, or shuffled by act-order)
  bias     [N]              optional
and dequantizes as w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].

The two checkpoint formats differ in the zero points only: "gptq" (v1) stores z - 1 and its
readers add 1 back (so v1 holds z in 1..16); "gptq_v2" stores z. AutoGPTQ's v1 packer wrote a
zero point of 0 as -1 in 32 bits, which set the nibble and every nibble above it in the word to
15: those words read back as z = 16, and that is what every v1 reader (AutoGPTQ, exllama,
vLLM) computes with, so it is what the import keeps (z = 16 fits the canonical format's
floating-point zero points). docs/CHECKPOINT.md has the table.
"""
from typing import Dict, Optional, Tuple

import torch

from .. import ops
from .native import canonical_settings
from .packing import NotRepresentable, group_permutation, pack_int32, unpack_int32

VERSIONS = ("gptq", "gptq_v2")


def gptq_to_canonical(tensors: Dict[str, torch.Tensor], group_size: int, version: str,
                      where: str) -> Tuple[Dict[str, torch.Tensor], dict, int]:
    """One GPTQ layer -> (canonical tensors, layer settings, number of v1 zero points read as 16).

    tensors: qweight, qzeros, scales and optionally g_idx, bias (short names). where: the layer's
    name and file, for error messages."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for name, t, dtypes in (("qweight", qweight, (torch.int32,)), ("qzeros", qzeros, (torch.int32,)),
                            ("scales", scales, (torch.float16, torch.bfloat16, torch.float32))):
        if t.dim() != 2 or t.dtype not in dtypes:
            raise ValueError(f"{where}.{name}: expected a 2-D {' or '.join(map(str, dtypes))} "
                             f"tensor, got {list(t.shape)} {t.dtype}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if K == 0 or N == 0:
        raise ValueError(f"{where}.qweight: an empty layer ({list(qweight.shape)})")
    G = K if group_size == -1 else group_size
    groups = -(-K // G)
    if G % 2 or G <= 0 or G > K:
        raise ValueError(f"{where}: group_size {group_size} cannot be stored by int4kit (it needs "
                         f"-1 or an even size up to in_features = {K})")
    if tuple(scales.shape) != (groups, N) or tuple(qzeros.shape) != (groups, -(-N // 8)):
        raise ValueError(f"{where}: with qweight {list(qweight.shape)} (K = {K}, N = {N}) and "
                         f"group size {G}, scales must be [{groups}, {N}] and qzeros "
                         f"[{groups}, {-(-N // 8)}]; got {list(scales.shape)} and "
                         f"{list(qzeros.shape)}")
    codes = unpack_int32(qweight, 0, K).t()  # [N, K]
    zeros = unpack_int32(qzeros, 1, N).to(torch.int64)  # [groups, N]
    overflowed = 0
    if version == "gptq":
        zeros = zeros + 1
        overflowed = int((zeros == 16).sum())
    perm = None
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.numel() != K or g_idx.dtype.is_floating_point:
            raise ValueError(f"{where}.g_idx: expected an integer tensor of shape [{K}], got "
                             f"{list(g_idx.shape)} {g_idx.dtype}")
        perm = group_permutation(g_idx, G, f"{where}.g_idx")
    if perm is not None:  # columns reordered so that every group is contiguous: exact
        codes = codes[:, perm]
    symmetric = bool((zeros == 8).all())
    out = {"qweight": ops.pack(codes.contiguous()), "scales": scales.t().contiguous()}
    if not symmetric:
        out["zeros"] = zeros.t().to(scales.dtype).contiguous()  # integers <= 16: exact
    if tensors.get("bias") is not None:
        out["bias"] = tensors["bias"]
    if perm is not None:
        out["input_perm"] = perm
    return out, canonical_settings(out, K, group_size, "gptq"), overflowed


def canonical_to_gptq(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      group_size: int, K: int, input_perm: Optional[torch.Tensor],
                      version: str, where: str) -> Dict[str, torch.Tensor]:
    """Canonical tensors -> one GPTQ layer (qweight, qzeros, scales, g_idx), exactly.

    Raises ValueError naming the layer and the reason when GPTQ cannot hold the weights exactly:
    K or N not a multiple of 8, fractional zero points or zero points outside 0..15 (v2) /
    1..16 (v1)."""
    N = qweight.shape[0]
    if K % 8 or N % 8:
        raise ValueError(f"{where}: GPTQ packs 8 codes per int32 along in_features and "
                         f"out_features, so both must be multiples of 8; this layer is "
                         f"{N} x {K}")
    G = K if group_size == -1 else group_size
    groups = -(-K // G)
    z = (torch.full((N, groups), 8.0) if zeros is None else zeros.float())
    low, high = (1, 16) if version == "gptq" else (0, 15)
    if not torch.equal(z, z.round()) or z.min() < low or z.max() > high:
        bad = z[(z != z.round()) | (z < low) | (z > high)][0].item()
        raise NotRepresentable(f"{where}: {version} stores integer zero points in {low}..{high}"
                         + (" (v1 stores z - 1 in 4 bits)" if version == "gptq" else "")
                         + f"; this layer has {bad:g}")
    codes = ops.unpack(qweight, K)  # [N, K], stored column order
    g_idx = torch.arange(K, dtype=torch.int32) // G
    if input_perm is not None:  # back to the model's column order: column perm[k] is group k // G
        original = torch.empty_like(codes)
        original[:, input_perm] = codes
        codes = original
        g_idx = torch.empty_like(g_idx).index_copy_(0, input_perm, g_idx)
    stored_z = z.t().to(torch.int64) - (1 if version == "gptq" else 0)  # [groups, N]
    return {"qweight": pack_int32(codes.t(), 0), "qzeros": pack_int32(stored_z, 1),
            "scales": scales.t().contiguous(), "g_idx": g_idx}
