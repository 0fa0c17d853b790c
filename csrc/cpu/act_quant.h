// Dynamic per-row int8 quantization of activations for the W4A8 paths, shared by every ISA's
// prepare_activations_a8 (plain C++: it reads each x once, next to a GEMV/GEMM that reads the
// weights).
#pragma once

#include <algorithm>
#include <cmath>

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

// max|x| / 127 over the K values of a row starting at `offset`, or 1 for an all-zero row.
inline float int8_row_scale(const void* x, DType dtype, int64_t offset, int64_t K) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(load_as_float(x, dtype, offset + k)));
  return amax > 0.f ? amax / 127.f : 1.f;
}

inline int8_t quantize_int8(float v, float scale) {
  return int8_t(std::clamp(std::nearbyint(v / scale), -127.f, 127.f));
}

// Quantizes rows [m_begin, m_end) of x into a: codes padded per group like the weights (zeros),
// with column i of every 8-column word stored at position position_of(i) of that word.
template <typename PositionOf>
void quantize_rows_int8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                        const ActivationsA8& a, int64_t m_begin, int64_t m_end, PositionOf position_of) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float scale = int8_row_scale(x, dtype, m * ldx, s.K);
    a.scale[m] = scale;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      int8_t* dst = a.xq + m * Kp + g * Gp;
      int32_t sum = 0;
      for (int64_t i = 0; i < Gp; ++i) {
        const int8_t q = i < len ? quantize_int8(load_as_float(x, dtype, src + i), scale) : 0;
        dst[(i / kCodesPerWord) * kCodesPerWord + position_of(int(i % kCodesPerWord))] = q;
        sum += q;
      }
      a.xq_sum[m * groups + g] = sum;
    }
  }
}

}  // namespace cpu
}  // namespace int4kit
