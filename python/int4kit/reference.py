"""Plain-PyTorch reference of int4kit's quantize / dequantize / linear: the oracle the tests compare
the native kernels against. Written for clarity, not speed; it follows the canonical format and the
round-to-nearest rules of docs/FORMAT.md step for step.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

SYMMETRIC_ZERO = 8
MAX_CODE = 15
# int8 weights (Int8Linear): one code per byte, 0..255, symmetric zero point 128
SYMMETRIC_ZERO_INT8 = 128
MAX_CODE_INT8 = 255


def _code_range(bits: int) -> Tuple[int, int]:
    """(symmetric zero point, largest code) of `bits`-bit weights."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return (SYMMETRIC_ZERO, MAX_CODE) if bits == 4 else (SYMMETRIC_ZERO_INT8, MAX_CODE_INT8)


def _group_size(group_size: int, K: int) -> int:
    return K if group_size == -1 else group_size


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> [N, ceil(K/2)]: even k in the low nibble, odd k in the high nibble."""
    N, K = codes.shape
    c = F.pad(codes.to(torch.int32), (0, K % 2))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def unpack(qweight: torch.Tensor, K: int) -> torch.Tensor:
    q = qweight.to(torch.int32)
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], 2 * q.shape[1])
    return codes[:, :K].to(torch.uint8)


def quantize(weight: torch.Tensor, group_size: int = 128, symmetric: bool = True,
             bits: int = 4) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest. Returns (qweight, scales, zeros) with scales and zeros in weight's dtype;
    bits 8 gives int8's qweight, the codes themselves [N, K]."""
    zero, max_code = _code_range(bits)
    N, K = weight.shape
    G = _group_size(group_size, K)
    groups = -(-K // G)
    w = F.pad(weight.float(), (0, groups * G - K)).view(N, groups, G)  # zero padding: range has 0
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    if symmetric:
        s = torch.maximum(hi, -lo) / (max_code / 2)
    else:
        s = (hi - lo) / max_code
    s = s.to(weight.dtype).float()  # codes are computed with the scale as it will be stored
    s = torch.where(s > 0, s, torch.ones_like(s))
    if symmetric:
        z = torch.full_like(s, zero)
    else:
        z = torch.round((0 - lo) / s).clamp(0, max_code)  # +0, not -0, when lo = 0
    codes = (torch.round(w / s[..., None]) + z[..., None]).clamp(0, max_code)
    codes = codes.reshape(N, groups * G)[:, :K].to(torch.uint8)
    return codes if bits == 8 else pack(codes), s.to(weight.dtype), z.to(weight.dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, K: int, dtype: torch.dtype = torch.float64,
               bits: int = 4) -> torch.Tensor:
    """w = (q - z) * s, computed in float64 and rounded once to dtype."""
    zero, _ = _code_range(bits)
    G = _group_size(group_size, K)
    q = (qweight if bits == 8 else unpack(qweight, K)).double()
    s = scales.double().repeat_interleave(G, dim=1)[:, :K]
    z = (zeros.double().repeat_interleave(G, dim=1)[:, :K] if zeros is not None
         else torch.full_like(q, zero))
    return ((q - z) * s).to(dtype)


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
           zeros: Optional[torch.Tensor], group_size: int,
           bias: Optional[torch.Tensor] = None, bits: int = 4) -> torch.Tensor:
    """Dequantize in float64, then matmul in float64: the oracle for the fused kernels."""
    K = x.shape[-1]
    w = dequantize(qweight, scales, zeros, group_size, K, torch.float64, bits)
    return F.linear(x.double(), w, None if bias is None else bias.double())


def quantize_activations_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row int8: scale = max|x| / 127 per row (1 for an all-zero row), codes
    round_half_even(x / scale) clamped to +-127. Returns (codes as float32, scales [..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / scale).clamp(-127, 127), scale


def linear_w4a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: Optional[torch.Tensor], group_size: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A8 oracle: x quantized per row to int8 as the kernels do, then the float64 linear."""
    codes, scale = quantize_activations_int8(x)
    return linear(codes.double() * scale.double(), qweight, scales, zeros, group_size, bias)
