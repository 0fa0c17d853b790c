"""GPTQ and AWQ checkpoints written the way those projects' packers write them, and read back
with those formats' own dequantization formulas: test oracles written from the published
formats, independently of int4kit's importer (which must agree with them exactly).

GPTQ (AutoGPTQ's QuantLinear.pack): qweight int32 [K/8, N], word [i, n] |= q[8i + j, n] << 4j;
qzeros int32 [groups, N/8] likewise along N, holding z - 1 in v1 (in uint32 arithmetic, so a
zero point of 0 becomes 0xFFFFFFFF and sets every nibble from j up) and z in v2; scales
[groups, N]; g_idx [K]. Readers compute w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n],
with z = nibble + 1 for v1.

AWQ (AutoAWQ's WQLinear_GEMM.from_linear): intweight [K, N]; qweight int32 [K, N/8] with
qweight[:, c] |= intweight[:, 8c + ORDER[i]] << 4i for ORDER = 0 2 4 6 1 3 5 7; qzeros the same
over [groups, N]; scales [groups, N] fp16. WQLinear_GEMV: qweight [N, K/8] with natural order
along K, qzeros [N, W] along groups (W padded), scales [N, 8W] (padded).
"""
import json
import os

import numpy as np
import safetensors.torch
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize_asym(w: torch.Tensor, G: int, g_idx: torch.Tensor, symmetric: bool,
                  scale_dtype: torch.dtype, zero_floor: int = 0):
    """Plain min-max quantization per (row, group given by g_idx): returns int codes [N, K],
    zeros [groups, N] (ints), scales [groups, N] in scale_dtype. Zero points can be 0."""
    N, K = w.shape
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, N)
    zeros = torch.empty(groups, N, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if symmetric:
            s = cols.abs().amax(1) / 7.5
            z = torch.full((N,), 8)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = (hi - lo) / 15
            z = torch.round(-lo / s).clamp(zero_floor, 15).to(torch.int64)
        scales[g] = s.clamp(min=1e-6)
        zeros[g] = z
    scales = scales.to(scale_dtype)
    s_full = scales.float()[g_idx].t()  # [N, K]
    z_full = zeros[g_idx].t()
    codes = torch.clamp(torch.round(w / s_full) + z_full, 0, 15).to(torch.int64)
    return codes, zeros, scales


def gptq_pack(codes, zeros, v1: bool):
    """AutoGPTQ's packer, in numpy uint32 arithmetic (its v1 overflow included)."""
    K, N = codes.shape[1], codes.shape[0]
    iw = codes.t().numpy().astype(np.uint32)
    qweight = np.zeros((K // 8, N), dtype=np.uint32)
    for row in range(K // 8):
        for j in range(8):
            qweight[row] |= iw[row * 8 + j] << np.uint32(4 * j)
    z = (zeros - 1 if v1 else zeros).numpy().astype(np.int64).astype(np.uint32)
    qzeros = np.zeros((z.shape[0], N // 8), dtype=np.uint32)
    for col in range(N // 8):
        for j in range(8):
            qzeros[:, col] |= z[:, col * 8 + j] << np.uint32(4 * j)
    return (torch.from_numpy(qweight.view(np.int32).copy()),
            torch.from_numpy(qzeros.view(np.int32).copy()))


def gptq_dequantize(qweight, qzeros, scales, g_idx, v1: bool) -> torch.Tensor:
    """What GPTQ readers compute: float32 [N, K]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    z = ((qzeros.unsqueeze(-1) >> shifts) & 0xF).reshape(qzeros.shape[0], -1)
    if v1:
        z = z + 1
    g = g_idx.long()
    return ((q.float() - z.float()[g]) * scales.float()[g]).t().contiguous()


def awq_pack_gemm(codes, zeros):
    """AutoAWQ's GEMM packer: codes [N, K], zeros [groups, N] -> qweight [K, N/8], qzeros."""
    def pack(mat):  # mat [rows, N] ints
        mat = mat.numpy().astype(np.uint32)
        out = np.zeros((mat.shape[0], mat.shape[1] // 8), dtype=np.uint32)
        for col in range(mat.shape[1] // 8):
            for i in range(8):
                out[:, col] |= mat[:, col * 8 + AWQ_ORDER[i]] << np.uint32(4 * i)
        return torch.from_numpy(out.view(np.int32).copy())
    return pack(codes.t()), pack(zeros)


def awq_pack_gemv(codes, zeros, scales, G):
    """AutoAWQ's GEMV packer: qweight [N, K/8], qzeros [N, W], scales [N, 8W] (padded)."""
    N, K = codes.shape
    groups = K // G
    multiple = 1 if G >= 128 else 2 if G == 64 else 4
    width = -(-(-(-groups // 8)) // multiple) * multiple

    def pack(mat, words):
        mat = mat.numpy().astype(np.uint32)
        out = np.zeros((mat.shape[0], words), dtype=np.uint32)
        for col in range(words):
            for i in range(8):
                if col * 8 + i < mat.shape[1]:
                    out[:, col] |= mat[:, col * 8 + i] << np.uint32(4 * i)
        return torch.from_numpy(out.view(np.int32).copy())
    padded_scales = torch.zeros(N, width * 8, dtype=scales.dtype)
    padded_scales[:, :groups] = scales.t()
    return pack(codes, K // 8), pack(zeros.t(), width), padded_scales


def awq_dequantize(codes, zeros, scales, G) -> torch.Tensor:
    """AutoAWQ's dequantization, (q - z) * s, from the unpacked integers: float32 [N, K]."""
    g = torch.arange(codes.shape[1]) // G
    return ((codes.float() - zeros.float()[g].t()) * scales.float()[g].t()).contiguous()


def write_hf_folder(path, model, tensors: dict, quantization_config: dict, side_config=None):
    """A Hugging Face folder: config.json (with quantization_config) and model.safetensors holding
    `tensors` plus every state-dict tensor of `model` that is not a replaced layer's weight."""
    os.makedirs(path, exist_ok=True)
    layers = {key.rsplit(".", 1)[0] for key in tensors}
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in layers}
    state.update(tensors)
    safetensors.torch.save_file(state, os.path.join(path, "model.safetensors"),
                                metadata={"format": "pt"})
    config = model.config.to_dict()
    if quantization_config is not None:  # None: the tool's own side config says it
        config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if side_config is not None:
        with open(os.path.join(path, side_config[0]), "w") as f:
            json.dump(side_config[1], f)
