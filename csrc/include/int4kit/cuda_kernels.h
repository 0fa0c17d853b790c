// Raw-pointer CUDA kernels of int4kit (launchers are torch-free; the glue is cuda/ops_cuda.cpp).
// Each launcher enqueues on `stream` and returns the launch's cudaError_t as an int, so this header
// needs no CUDA include.
#pragma once

#include <cstdint>

#include "int4kit/format.h"

namespace int4kit {
namespace cuda {

// codes uint8 [N, K] -> qweight [N, ceil(K/2)]; codes above 15 set *bad_code (device int) to 1.
int pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight, int* bad_code, void* stream);
// qweight [N, ceil(K/2)] -> codes [N, K]
int unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes, void* stream);
// (q - z) * s in fp32 -> out [N, K] of dtype out_dtype. scales, zeros: [N, ceil(K/G)] of
// scale_dtype; zeros == nullptr means symmetric (8).
int dequantize(const uint8_t* qweight, const void* scales, const void* zeros, DType scale_dtype,
               int64_t N, int64_t K, int64_t G, void* out, DType out_dtype, void* stream);

}  // namespace cuda
}  // namespace int4kit
