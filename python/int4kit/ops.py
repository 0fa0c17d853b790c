"""Python face of the native ops in torch.ops.int4kit, with their fake (meta) implementations so
torch.compile(fullgraph=True) and export can trace through them.

Canonical format (docs/FORMAT.md): for W [N, K] with group size G (-1: per channel),
qweight uint8 [N, ceil(K/2)] (low nibble = even k), scales/zeros [N, ceil(K/G)], w = (q - z) * s.
"""
from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.int4kit)

_ops = torch.ops.int4kit


def cpu_isa() -> str:
    """The CPU path the next linear call takes: INT4KIT_CPU_ISA if set, else the best detected."""
    return _C.cpu_isa()


def cpu_isa_supported(name: str) -> bool:
    return _C.cpu_isa_supported(name)


def cpu_isas() -> list:
    """Every CPU path int4kit has (force one with INT4KIT_CPU_ISA=<name>), supported here or not."""
    return list(_C.cpu_isas())


def cuda_built() -> bool:
    """Whether this build of int4kit carries its CUDA kernels."""
    return _C.cuda_built()


def prepacked_bytes(N: int, K: int, group_size: int, scale_dtype: torch.dtype,
                    device: torch.device, bits: int = 4) -> int:
    """Size of the prepacked layout `prepack` (bits 8: `prepack_int8`, CPU only) makes for
    `device` (CPU or CUDA)."""
    name = str(scale_dtype).removeprefix("torch.")
    if bits == 8:
        return _C.cpu_prepacked_bytes_int8(N, K, group_size, name)
    if torch.device(device).type == "cuda":
        return _C.cuda_prepacked_bytes(N, K, group_size, name)
    return _C.cpu_prepacked_bytes(N, K, group_size, name)


def effective_group_size(group_size: int, K: int) -> int:
    return K if group_size == -1 else group_size


def num_groups(K: int, group_size: int) -> int:
    G = effective_group_size(group_size, K)
    return -(-K // G)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> canonical qweight [N, ceil(K/2)]."""
    return _ops.pack(codes)


def unpack(qweight: torch.Tensor, K: int) -> torch.Tensor:
    return _ops.unpack(qweight, K)


def quantize(weight: torch.Tensor, group_size: int = 128,
             symmetric: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: weight [N, K] -> (qweight, scales, zeros); zeros are 8 when symmetric."""
    return _ops.quantize(weight, group_size, symmetric)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               group_size: int, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _ops.dequantize(qweight, scales, zeros, group_size, K, dtype)


def prepack(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
            group_size: int, K: int) -> torch.Tensor:
    """Canonical format -> the prepacked layout of the tensors' device (a flat uint8 tensor):
    SIMD blocks on CPU, tensor-core fragments on CUDA (docs/FORMAT.md)."""
    return _ops.prepack(qweight, scales, zeros, group_size, K)


def unprepack(packed: torch.Tensor, N: int, K: int, group_size: int,
              scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ops.unprepack(packed, N, K, group_size, scale_dtype)


def linear(x: torch.Tensor, packed: torch.Tensor, N: int, K: int, group_size: int,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequantize(W).T + bias, fused, from the prepacked layout."""
    return _ops.linear(x, packed, N, K, group_size, bias)


def linear_w4a8(x: torch.Tensor, packed: torch.Tensor, N: int, K: int, group_size: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Like linear, with x quantized per row to int8 on the fly (scale max|x|/127): W4A8."""
    return _ops.linear_w4a8(x, packed, N, K, group_size, bias)


# ---- int8 weights (Int8Linear): canonical qweight uint8 [N, K], one code per byte ---------------

def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = (q - z) * s (z = 128 when zeros is None) in float32, then dtype; plain torch ops, so it
    runs on any device (Int8Linear's forward off the CPU: this, then the dense matmul)."""
    N, K = qweight.shape
    G = effective_group_size(group_size, K)
    groups = -(-K // G)
    if tuple(scales.shape) != (N, groups) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"scales (and zeros) must have shape [{N}, {groups}] for qweight "
                         f"{list(qweight.shape)} at group_size {group_size}, got "
                         f"{list(scales.shape)}"
                         + ("" if zeros is None else f" and {list(zeros.shape)}"))
    q = torch.nn.functional.pad(qweight.float(), (0, groups * G - K)).view(N, groups, G)
    z = 128.0 if zeros is None else zeros.float()[..., None]
    w = ((q - z) * scales.float()[..., None]).view(N, groups * G)[:, :K]
    return w.to(dtype)


def prepack_int8(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 group_size: int) -> torch.Tensor:
    """Canonical int8 (qweight uint8 [N, K]) -> the CPU prepacked int8 layout (docs/FORMAT.md)."""
    return _ops.prepack_int8(qweight, scales, zeros, group_size)


def unprepack_int8(packed: torch.Tensor, N: int, K: int, group_size: int,
                   scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ops.unprepack_int8(packed, N, K, group_size, scale_dtype)


def linear_int8(x: torch.Tensor, packed: torch.Tensor, N: int, K: int, group_size: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequantize_int8(W).T + bias, fused, from the int8 prepacked layout."""
    return _ops.linear_int8(x, packed, N, K, group_size, bias)


# ---- GPTQ's column loop ----------------------------------------------------------------------------

def gptq_columns(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_of_col: torch.Tensor, codes: torch.Tensor, errors: torch.Tensor,
                 fractional: bool, max_code: int) -> None:
    """One sub-block of a GPTQ pass on W^T, in place (CPU, float32 or float64): for each row c of
    w [cols, n] in order, codes[c] = clamp(round(w[c] / s) + z, 0, max_code) (round(w[c] / s + z)
    when `fractional`) with s, z the rows group_of_col[c] of scales, zeros [groups, n];
    errors[c] = (w[c] - (codes[c] - z) s) / hinv[c, c]; then w[r] -= hinv[c, r] errors[c] for
    every later row r. w, codes and errors are written in place and need unit stride along n
    (views are fine); the other arguments may have any layout."""
    _ops.gptq_columns(w, hinv, scales, zeros, group_of_col, codes, errors, fractional, max_code)


# ---- fake implementations: shapes and dtypes only ------------------------------------------------

@torch.library.register_fake("int4kit::pack")
def _pack_fake(codes):
    torch._check(codes.dim() == 2, lambda: "int4kit: codes must be 2-D")
    return codes.new_empty((codes.shape[0], (codes.shape[1] + 1) // 2))


@torch.library.register_fake("int4kit::unpack")
def _unpack_fake(qweight, K):
    return qweight.new_empty((qweight.shape[0], K))


@torch.library.register_fake("int4kit::quantize")
def _quantize_fake(weight, group_size, symmetric):
    N, K = weight.shape
    groups = num_groups(K, group_size)
    scales = weight.new_empty((N, groups))
    return weight.new_empty((N, (K + 1) // 2), dtype=torch.uint8), scales, torch.empty_like(scales)


@torch.library.register_fake("int4kit::dequantize")
def _dequantize_fake(qweight, scales, zeros, group_size, K, dtype):
    return scales.new_empty((qweight.shape[0], K), dtype=dtype)


@torch.library.register_fake("int4kit::prepack")
def _prepack_fake(qweight, scales, zeros, group_size, K):
    return qweight.new_empty((prepacked_bytes(qweight.shape[0], K, group_size, scales.dtype,
                                              qweight.device),))


@torch.library.register_fake("int4kit::unprepack")
def _unprepack_fake(packed, N, K, group_size, scale_dtype):
    groups = num_groups(K, group_size)
    scales = packed.new_empty((N, groups), dtype=scale_dtype)
    return packed.new_empty((N, (K + 1) // 2)), scales, torch.empty_like(scales)


@torch.library.register_fake("int4kit::linear")
def _linear_fake(x, packed, N, K, group_size, bias):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("int4kit::linear_w4a8")
def _linear_w4a8_fake(x, packed, N, K, group_size, bias):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("int4kit::prepack_int8")
def _prepack_int8_fake(qweight, scales, zeros, group_size):
    N, K = qweight.shape
    return qweight.new_empty((prepacked_bytes(N, K, group_size, scales.dtype, qweight.device, 8),))


@torch.library.register_fake("int4kit::unprepack_int8")
def _unprepack_int8_fake(packed, N, K, group_size, scale_dtype):
    scales = packed.new_empty((N, num_groups(K, group_size)), dtype=scale_dtype)
    return packed.new_empty((N, K)), scales, torch.empty_like(scales)


@torch.library.register_fake("int4kit::linear_int8")
def _linear_int8_fake(x, packed, N, K, group_size, bias):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("int4kit::gptq_columns")
def _gptq_columns_fake(w, hinv, scales, zeros, group_of_col, codes, errors, fractional, max_code):
    return None
