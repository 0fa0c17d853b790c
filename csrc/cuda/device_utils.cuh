// Device helpers shared by the CUDA kernels: scalar dtype conversions and the records of the CUDA
// prepacked layout (see int4kit/cuda_layout.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int4kit/format.h"

namespace int4kit {
namespace cuda {

constexpr int kElementwiseThreads = 256;

// Grid for a grid-stride loop over n elements.
inline unsigned elementwise_grid(int64_t n) {
  const int64_t blocks = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  return unsigned(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

__device__ inline float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return __half2float(static_cast<const __half*>(p)[i]);
  }
}

// v as Out (float, bf16 or fp16), rounded to nearest even.
template <typename Out>
__device__ inline Out from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ inline void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
  }
}

// The value of v after a round trip through dtype t (round to nearest even), as the CPU does.
__device__ inline float round_to_dtype(float v, DType t) {
  switch (t) {
    case DType::F32: return v;
    case DType::BF16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return __half2float(__float2half_rn(v));
  }
}

// Raw bits of one scale or zero value of the record dtype, to float.
__device__ inline float bits_to_value(uint32_t bits, DType t) {
  switch (t) {
    case DType::F32: return __uint_as_float(bits);
    case DType::BF16: return __uint_as_float(bits << 16);
    default: return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

// One lane record of the prepacked layout, decoded: scale and zero point of rows g and g+8.
struct LaneRecord {
  float scale_lo, scale_hi, zero_lo, zero_hi;
};

// `raw` holds the record as loaded: four fp32 words, or (F16/BF16) two words of 16-bit pairs in
// .x = (scale lo | scale hi << 16) and .y = (zero lo | zero hi << 16).
__device__ inline LaneRecord decode_record(uint4 raw, DType t) {
  if (t == DType::F32)
    return {__uint_as_float(raw.x), __uint_as_float(raw.y), __uint_as_float(raw.z),
            __uint_as_float(raw.w)};
  return {bits_to_value(raw.x & 0xFFFFu, t), bits_to_value(raw.x >> 16, t),
          bits_to_value(raw.y & 0xFFFFu, t), bits_to_value(raw.y >> 16, t)};
}

}  // namespace cuda
}  // namespace int4kit
