// Raw-pointer CUDA kernels of int4kit (launchers are torch-free; the glue is cuda/ops_cuda.cpp).
// Each launcher enqueues on `stream` and returns the launch's cudaError_t as an int, so this header
// needs no CUDA include.
#pragma once

#include <cstdint>
#include <string>

#include "int4kit/cuda_layout.h"
#include "int4kit/format.h"

namespace int4kit {
namespace cuda {

// codes uint8 [N, K] -> qweight [N, ceil(K/2)]; codes above 15 set *bad_code (device int) to 1.
int pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight, int* bad_code, void* stream);
// qweight [N, ceil(K/2)] -> codes [N, K]
int unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes, void* stream);
// Round-to-nearest quantization of w (fp32 [N, K]) with the CPU's arithmetic: codes uint8 [N, K],
// scales and zeros fp32 [N, ceil(K/G)], scales rounded to scale_dtype.
int quantize(const float* w, int64_t N, int64_t K, int64_t G, bool symmetric, DType scale_dtype,
             uint8_t* codes, float* scales, float* zeros, void* stream);
// (q - z) * s in fp32 -> out [N, K] of dtype out_dtype. scales, zeros: [N, ceil(K/G)] of
// scale_dtype; zeros == nullptr means symmetric (8).
int dequantize(const uint8_t* qweight, const void* scales, const void* zeros, DType scale_dtype,
               int64_t N, int64_t K, int64_t G, void* out, DType out_dtype, void* stream);


// Canonical (qweight, scales, zeros of shape.scale_dtype; zeros == nullptr: symmetric) -> the CUDA
// prepacked layout, shape.total_bytes() bytes at `packed` (16-byte aligned).
int prepack(const uint8_t* qweight, const void* scales, const void* zeros,
            const cuda_layout::Shape& shape, uint8_t* packed, void* stream);
// The inverse, bit-exact: qweight [N, ceil(K/2)], scales and zeros [N, groups] of shape.scale_dtype.
int unprepack(const uint8_t* packed, const cuda_layout::Shape& shape, uint8_t* qweight,
              void* scales, void* zeros, void* stream);
// The dense weight [N, K] of out_dtype, straight from the prepacked layout (any group size).
int dequantize_prepacked(const uint8_t* packed, const cuda_layout::Shape& shape, void* out,
                         DType out_dtype, void* stream);
// out [M, N] = x [M, K] @ W^T (+ bias [N]), x, bias and out of dtype (F16 or BF16), fp32
// accumulation. x rows are ldx elements apart (ldx a multiple of 64, at least K, zeros between K
// and ldx: the kernel reads whole 64-column chunks), x is 16-byte aligned, K < cuda_layout::kMaxK,
// and the group size is one the fused path reads (cuda_layout::fused_group_ok); other arguments
// return cudaErrorInvalidValue. No allocation, no host synchronisation: CUDA-graph safe.
// `tile` -1 picks the kernel's tile shape by M; 0 .. linear_tile_count() - 1 forces one that
// linear_tile_fits (benchmark sweeps; linear_tile_name describes it).
// When the row tiles alone would leave SMs idle, K is split across blocks and the partial products
// go through `workspace` (linear_workspace_floats(M, shape, tile) floats, 0: none needed) before a
// deterministic reduction; query it on the device that will run the call.
int linear_tile_count();
bool linear_tile_fits(int tile, int64_t K, int64_t G);
std::string linear_tile_name(int tile);
int64_t linear_workspace_floats(int64_t M, const cuda_layout::Shape& shape, int tile);
int linear(const void* x, int64_t M, int64_t ldx, const uint8_t* packed,
           const cuda_layout::Shape& shape, const void* bias, void* out, DType dtype, int tile,
           float* workspace, void* stream);

}  // namespace cuda
}  // namespace int4kit
