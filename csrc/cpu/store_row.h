// Writing one 16-wide output row of the fused linear, shared by the vector paths: a template over
// the including file's Simd traits, so it is compiled with that file's ISA flags.
#pragma once

#include <algorithm>

#include "int4kit/format.h"

namespace int4kit {
namespace cpu {

// Writes 16 fp32 values of one output row (n0 .. n0+15, clipped at N) plus bias as dtype; vals is
// 64-byte aligned (Simd::store_y16 loads it so when there is no bias to add first).
template <typename Simd>
inline void store_row16_as(void* y, DType dtype, int64_t offset, const float* vals,
                           const float* bias, int64_t n0, int64_t N) {
  const int64_t count = std::min<int64_t>(kBlockN, N - n0);
  if (count == kBlockN && bias == nullptr) {
    Simd::store_y16(y, dtype, offset, vals);
    return;
  }
  alignas(64) float out[kBlockN];
  for (int64_t j = 0; j < count; ++j) out[j] = bias ? vals[j] + bias[n0 + j] : vals[j];
  if (count == kBlockN) {
    Simd::store_y16(y, dtype, offset, out);
  } else {
    for (int64_t j = 0; j < count; ++j) store_from_float(y, dtype, offset + j, out[j]);
  }
}

}  // namespace cpu
}  // namespace int4kit
