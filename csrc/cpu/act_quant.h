// Dynamic per-row int8 quantization of activations for the W4A8 paths: the scalar definition (the
// reference path's prepare_activations_a8; linear_simd.h vectorizes it with the same arithmetic).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {
// Internal linkage: this header is compiled into every ISA's translation unit with that ISA's
// flags, so the linker must not pick one of those copies for another (an AVX-512 build of
// quantize_int8 called from the AVX2 path would fault on a CPU without AVX-512).
namespace {

// A row's max|x| is found as the largest bit pattern of |x|: for non-negative floats the integer
// order is the float order, and infinities and NaNs (exponent all ones) sort above every finite
// value, so the same pass that finds the scale flags a row the int8 grid cannot represent.
inline uint32_t abs_bits(float v) { return float_to_bits(v) & 0x7FFFFFFFu; }
constexpr uint32_t kNonFiniteBits = 0x7F800000u;  // |x| bits at or above this: Inf or NaN

// The row's scale: max|x| / 127, 1 for an all-zero row, NaN for a row with an Inf or a NaN (its
// codes are left unwritten; the caller must reject x, see ActivationsA8).
inline float int8_scale_of(uint32_t amax_bits) {
  if (amax_bits >= kNonFiniteBits) return std::numeric_limits<float>::quiet_NaN();
  const float amax = bits_to_float(amax_bits);
  // amax / 127 underflows to 0 for amax <= 63 * 2^-149 (subnormal rows): keep x / scale finite
  return amax > 0.f ? std::max(amax / 127.f, std::numeric_limits<float>::denorm_min()) : 1.f;
}

inline int8_t quantize_int8(float v, float scale) {
  return int8_t(std::clamp(std::nearbyint(v / scale), -127.f, 127.f));
}

// The scalar row operations; linear_simd.h supplies vector ones with the same arithmetic.
struct ScalarRowOps {
  // largest abs_bits of the K values of a row starting at `offset`
  static uint32_t amax_bits(const void* x, DType dtype, int64_t offset, int64_t K) {
    uint32_t amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, abs_bits(load_as_float(x, dtype, offset + k)));
    return amax;
  }
  // quantizes a leading run of whole words of a group into dst and adds their codes to *sum;
  // returns the columns done (the rest are done one by one)
  static int64_t quantize_words(const void*, DType, int64_t, int64_t, float, int8_t*, int32_t*) { return 0; }
};

// Quantizes rows [m_begin, m_end) of x into a: codes padded per group like the weights (zeros),
// with column i of every 8-column word stored at position position_of(i) of that word.
template <typename RowOps, typename PositionOf>
void quantize_rows_int8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                        const ActivationsA8& a, int64_t m_begin, int64_t m_end, PositionOf position_of) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float scale = int8_scale_of(RowOps::amax_bits(x, dtype, m * ldx, s.K));
    a.scale[m] = scale;
    if (std::isnan(scale)) continue;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      int8_t* dst = a.xq + m * Kp + g * Gp;
      int32_t sum = 0;
      for (int64_t i = RowOps::quantize_words(x, dtype, src, len, scale, dst, &sum); i < Gp; ++i) {
        const int8_t q = i < len ? quantize_int8(load_as_float(x, dtype, src + i), scale) : 0;
        dst[(i / kCodesPerWord) * kCodesPerWord + position_of(int(i % kCodesPerWord))] = q;
        sum += q;
      }
      a.xq_sum[m * groups + g] = sum;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace int4kit
