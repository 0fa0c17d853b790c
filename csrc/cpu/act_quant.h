// Dynamic per-row fixed-point quantization of activations (ActivationsA8): int8 for the W4A8
// paths, int16 in two int8 planes for the vector GEMVs' bf16 x and int24 in three for their fp32
// and fp16 x. The scalar definition
// (the reference path's prepare_activations_a8; linear_simd.h vectorizes it with the same
// arithmetic).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {
// Internal linkage: this header is compiled into every ISA's translation unit with that ISA's
// flags, so the linker must not pick one of those copies for another (an AVX-512 build of
// quantize called from the AVX2 path would fault on a CPU without AVX-512).
namespace {

// A row's max|x| is found as the largest bit pattern of |x|: for non-negative floats the integer
// order is the float order, and infinities and NaNs (exponent all ones) sort above every finite
// value, so the same pass that finds the scale flags a row the int8 grid cannot represent.
inline uint32_t abs_bits(float v) { return float_to_bits(v) & 0x7FFFFFFFu; }
constexpr uint32_t kNonFiniteBits = 0x7F800000u;  // |x| bits at or above this: Inf or NaN

// The grids, each with its scale for a run of x whose largest |x| has the bits amax_bits:
// 1 for an all-zero run, NaN for a run with an Inf or a NaN (its codes are left unwritten).
//  * Int8Grid (W4A8): one scale per row, max|x| / 127.
//  * Int16Grid and Int24Grid (Activations::xint): one scale per row and group, the power of two
//    that puts max|x| in (kMax / 2, kMax], kMax = 127 * 257 or 127 * 65793: every bf16 value
//    within 2^6 (int16), every fp16 value within 2^11 (int24) of the group's largest is then an
//    exact integer multiple of it (within 2^7 / 2^12 too unless the scale had to double), and any
//    other value is off by at most half of it, under max|x| / kMax. Codes are stored as signed
//    base-256 digits, each an int8 for |q| <= kMax (split_digits).
struct Int8Grid {
  static constexpr int kPlanes = 1;
  static constexpr bool kGroupScales = false;
  static constexpr float kMax = 127.f;
  static float scale_of(uint32_t amax_bits) {
    if (amax_bits >= kNonFiniteBits) return std::numeric_limits<float>::quiet_NaN();
    const float amax = bits_to_float(amax_bits);
    // amax / kMax underflows to 0 for subnormal rows: keep x / scale finite
    return amax > 0.f ? std::max(amax / kMax, std::numeric_limits<float>::denorm_min()) : 1.f;
  }
};
template <int P>
struct FixedPointGrid {
  static constexpr int kPlanes = P;
  static constexpr bool kGroupScales = true;
  // every digit 127: 127 * 257 for int16, 127 * 65793 for int24 (exact in fp32)
  static constexpr float kMax = P == 2 ? 127.f * 257.f : 127.f * 65793.f;
  static float scale_of(uint32_t amax_bits) {
    if (amax_bits >= kNonFiniteBits) return std::numeric_limits<float>::quiet_NaN();
    if (amax_bits == 0) return 1.f;
    const float amax = bits_to_float(amax_bits);
    // 2^(ilogb - b) puts amax in [2^b, 2^(b+1)), b = 8P - 2; one more doubling where that passes
    // kMax. Below 2^-149 the smallest subnormal is the step, and every value is exact.
    const int exponent = std::max(std::ilogb(amax) - (8 * P - 2), -149);
    const float scale = std::ldexp(1.f, exponent);
    return amax / scale > kMax ? 2.f * scale : scale;
  }
};
using Int16Grid = FixedPointGrid<2>;
using Int24Grid = FixedPointGrid<3>;

// q as P signed base-256 digits, the most significant first: q = sum_p digits[p] * 256^(P-1-p).
// Each step takes the low digit in [-128, 127] (q - 256 * ((q + 128) >> 8)) and carries the rest,
// so every digit is an int8 for |q| <= kMax. V is int32_t here and a SIMD int vector in
// linear_simd.h (Ops: high(q) = (q + 128) >> 8, low(q, high) = q - 256 * high).
template <int P, typename V, typename Ops>
void split_digits(V q, V (&digits)[P], Ops ops) {
  for (int p = P - 1; p > 0; --p) {
    const V high = ops.high(q);
    digits[p] = ops.low(q, high);
    q = high;
  }
  digits[0] = q;
}
struct ScalarDigits {
  int32_t high(int32_t q) const { return (q + 128) >> 8; }
  int32_t low(int32_t q, int32_t high) const { return q - 256 * high; }
};

template <typename Grid>
int32_t quantize(float v, float scale) {
  return int32_t(std::clamp(std::nearbyint(v / scale), -Grid::kMax, Grid::kMax));
}

// The scalar row operations; linear_simd.h supplies vector ones with the same arithmetic.
struct ScalarRowOps {
  // largest abs_bits of the K values of a row starting at `offset`
  static uint32_t amax_bits(const void* x, DType dtype, int64_t offset, int64_t K) {
    uint32_t amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, abs_bits(load_as_float(x, dtype, offset + k)));
    return amax;
  }
  // quantizes a leading run of whole words of a group into the planes dst and adds their codes to
  // sums; returns the columns done (the rest are done one by one)
  template <typename Grid>
  static int64_t quantize_words(const void*, DType, int64_t, int64_t, float, int8_t* const*, int32_t*) {
    return 0;
  }
};

// Quantizes rows [m_begin, m_end) of x into a on Grid: codes padded per group like the weights
// (zeros), with column i of every 8-column word stored at position position_of(i) of that word.
// A row with an Inf or a NaN gets NaN for its scale (for all of them, with group scales).
template <typename RowOps, typename Grid, typename PositionOf>
void quantize_rows(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                   const ActivationsA8& a, int64_t m_begin, int64_t m_end, PositionOf position_of) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t m = m_begin; m < m_end; ++m) {
    float* const scales = a.scale + (Grid::kGroupScales ? m * groups : m);
    bool finite = true;
    if constexpr (Grid::kGroupScales) {
      for (int64_t g = 0; g < groups; ++g) {
        scales[g] = Grid::scale_of(RowOps::amax_bits(x, dtype, m * ldx + g * s.G, s.group_len(g)));
        finite = finite && !std::isnan(scales[g]);
      }
      if (!finite) std::fill(scales, scales + groups, std::numeric_limits<float>::quiet_NaN());
    } else {
      scales[0] = Grid::scale_of(RowOps::amax_bits(x, dtype, m * ldx, s.K));
      finite = !std::isnan(scales[0]);
    }
    if (!finite) continue;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = scales[Grid::kGroupScales ? g : 0];
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      int8_t* dst[Grid::kPlanes];
      for (int p = 0; p < Grid::kPlanes; ++p) dst[p] = a.plane(p) + m * Kp + g * Gp;
      int32_t sums[Grid::kPlanes] = {};
      int64_t i = RowOps::template quantize_words<Grid>(x, dtype, src, len, scale, dst, sums);
      for (; i < Gp; ++i) {
        const int32_t q = i < len ? quantize<Grid>(load_as_float(x, dtype, src + i), scale) : 0;
        const int64_t at = (i / kCodesPerWord) * kCodesPerWord + position_of(int(i % kCodesPerWord));
        int32_t digits[Grid::kPlanes];
        split_digits(q, digits, ScalarDigits{});
        for (int p = 0; p < Grid::kPlanes; ++p) {
          dst[p][at] = int8_t(digits[p]);
          sums[p] += digits[p];
        }
      }
      for (int p = 0; p < Grid::kPlanes; ++p) a.plane_sums(p)[m * groups + g] = sums[p];
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace int4kit
