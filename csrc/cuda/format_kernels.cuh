// CUDA kernels for the canonical format: pack, unpack, quantize (round to nearest) and dequantize.
// Memory-bound element-wise kernels with grid-stride loops: one thread per output byte (pack), per
// code (unpack, dequantize) or per group (quantize). Device code only: format.cu launches it;
// tests/cpp/cuda_emulator.h runs it on a CPU.
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"

namespace int4kit {
namespace cuda {
namespace format_kernels {

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

// One thread per (row, group); the same arithmetic, in the same order, as the CPU's quantize_rtn
// (IEEE division and round-to-nearest-even), so both devices give the same codes, scales and
// zeros bit for bit (0 - lo: a group without negative weights gets z = +0, whatever fmaxf does
// with -0).
__global__ void quantize_kernel(const float* __restrict__ w, int64_t N, int64_t K, int64_t G,
                                bool symmetric, DType scale_dtype, uint8_t* __restrict__ codes,
                                float* __restrict__ scales, float* __restrict__ zeros) {
  const int64_t groups = (K + G - 1) / G, total = N * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / groups, g = i % groups;
    const float* wg = w + n * K + g * G;
    const int64_t len = min(G, K - g * G);
    float lo = 0.f, hi = 0.f;  // the range always includes 0, so 0 is exactly representable
    for (int64_t j = 0; j < len; ++j) {
      lo = fminf(lo, wg[j]);
      hi = fmaxf(hi, wg[j]);
    }
    float s = symmetric ? round_to_dtype(fmaxf(hi, -lo) / 7.5f, scale_dtype)
                        : round_to_dtype((hi - lo) / 15.f, scale_dtype);
    if (!(s > 0.f)) s = 1.f;
    const float z = symmetric ? float(kSymmetricZero)
                              : fminf(fmaxf(rintf((0.f - lo) / s), 0.f), float(kMaxCode));
    scales[i] = s;
    zeros[i] = z;
    uint8_t* cg = codes + n * K + g * G;
    for (int64_t j = 0; j < len; ++j)
      cg[j] = uint8_t(fminf(fmaxf(rintf(wg[j] / s) + z, 0.f), float(kMaxCode)));
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

}  // namespace format_kernels
}  // namespace cuda
}  // namespace int4kit
