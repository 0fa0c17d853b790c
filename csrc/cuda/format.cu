// CUDA kernels for the canonical format: pack, unpack and dequantize. Memory-bound element-wise
// kernels: one thread per output byte (pack) or per code (unpack, dequantize), grid-stride loops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "int4kit/cuda_kernels.h"

namespace int4kit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return unsigned(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t N, int64_t K,
                            uint8_t* __restrict__ qweight, int* bad_code) {
  const int64_t row_bytes = (K + 1) / 2, total = N * row_bytes;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / row_bytes, j = i % row_bytes;
    const uint8_t lo = codes[n * K + 2 * j];
    const uint8_t hi = (2 * j + 1 < K) ? codes[n * K + 2 * j + 1] : 0;
    if ((lo | hi) > 15) *bad_code = 1;
    qweight[i] = uint8_t((lo & 0xF) | ((hi & 0xF) << 4));
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ qweight, int64_t N, int64_t K,
                              uint8_t* __restrict__ codes) {
  const int64_t row_bytes = (K + 1) / 2, total = N * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    const uint8_t byte = qweight[n * row_bytes + (k >> 1)];
    codes[i] = (k & 1) ? (byte >> 4) : (byte & 0xF);
  }
}

__device__ inline float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return __half2float(static_cast<const __half*>(p)[i]);
  }
}

__device__ inline void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ qweight, const void* scales,
                                  const void* zeros, DType scale_dtype, int64_t N, int64_t K,
                                  int64_t G, void* out, DType out_dtype) {
  const int64_t row_bytes = (K + 1) / 2, groups = (K + G - 1) / G, total = N * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K, sg = n * groups + k / G;
    const uint8_t byte = qweight[n * row_bytes + (k >> 1)];
    const float q = float((k & 1) ? (byte >> 4) : (byte & 0xF));
    const float z = zeros ? load_float(zeros, scale_dtype, sg) : float(kSymmetricZero);
    store_float(out, out_dtype, i, (q - z) * load_float(scales, scale_dtype, sg));
  }
}

}  // namespace

int pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight, int* bad_code, void* stream) {
  const int64_t total = N * ((K + 1) / 2);
  if (total == 0) return cudaSuccess;
  pack_kernel<<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(codes, N, K, qweight,
                                                                                 bad_code);
  return cudaGetLastError();
}

int unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes, void* stream) {
  if (N * K == 0) return cudaSuccess;
  unpack_kernel<<<grid_for(N * K), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(qweight, N, K,
                                                                                     codes);
  return cudaGetLastError();
}

int dequantize(const uint8_t* qweight, const void* scales, const void* zeros, DType scale_dtype,
               int64_t N, int64_t K, int64_t G, void* out, DType out_dtype, void* stream) {
  if (N * K == 0) return cudaSuccess;
  dequantize_kernel<<<grid_for(N * K), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      qweight, scales, zeros, scale_dtype, N, K, G, out, out_dtype);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace int4kit
