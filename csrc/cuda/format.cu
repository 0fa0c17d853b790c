// The canonical-format ops on CUDA: launches of format_kernels.cuh.
#include <cuda_runtime.h>

#include "cuda/format_kernels.cuh"
#include "int4kit/cuda_kernels.h"

namespace int4kit {
namespace cuda {

using namespace format_kernels;

int pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight, int* bad_code, void* stream) {
  const int64_t total = N * ((K + 1) / 2);
  if (total == 0) return cudaSuccess;
  pack_kernel<<<elementwise_grid(total), kElementwiseThreads, 0, static_cast<cudaStream_t>(stream)>>>(codes, N, K, qweight,
                                                                                 bad_code);
  return cudaGetLastError();
}

int unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes, void* stream) {
  if (N * K == 0) return cudaSuccess;
  unpack_kernel<<<elementwise_grid(N * K), kElementwiseThreads, 0, static_cast<cudaStream_t>(stream)>>>(qweight, N, K,
                                                                                     codes);
  return cudaGetLastError();
}

int quantize(const float* w, int64_t N, int64_t K, int64_t G, bool symmetric, DType scale_dtype,
             uint8_t* codes, float* scales, float* zeros, void* stream) {
  const int64_t total = N * ((K + G - 1) / G);
  if (total == 0) return cudaSuccess;
  quantize_kernel<<<elementwise_grid(total), kElementwiseThreads, 0,
                    static_cast<cudaStream_t>(stream)>>>(w, N, K, G, symmetric, scale_dtype, codes,
                                                         scales, zeros);
  return cudaGetLastError();
}

int dequantize(const uint8_t* qweight, const void* scales, const void* zeros, DType scale_dtype,
               int64_t N, int64_t K, int64_t G, void* out, DType out_dtype, void* stream) {
  if (N * K == 0) return cudaSuccess;
  dequantize_kernel<<<elementwise_grid(N * K), kElementwiseThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      qweight, scales, zeros, scale_dtype, N, K, G, out, out_dtype);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace int4kit
