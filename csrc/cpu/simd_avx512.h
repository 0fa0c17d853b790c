// AVX-512 (F/BW/VL/VNNI) SIMD traits for linear_simd.h, shared by the AVX-512 and AMX translation
// units; include only from files compiled with those flags, inside their own anonymous namespace.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "int4kit/format.h"

namespace int4kit {
namespace cpu {
namespace avx512_simd {

struct Simd {
  using V = __m512;
  using VI = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kMicroRows = 12;  // 12 x 16: 12 accumulators + 1 weight vector + 1 x
  // linear_simd.h's gemm_min_rows and xint_planes: the GEMV on fixed-point x beat the GEMM at
  // every M measured for bf16 x (8 to 1024) and below 1024 for fp32 and fp16 x on the int24 grid
  static constexpr int64_t kGemmMinRowsBf16 = std::numeric_limits<int64_t>::max();
  static constexpr int64_t kGemmMinRowsFloat = 1024;
  static constexpr int64_t kInt24MaxRows = std::numeric_limits<int64_t>::max();  // every GEMV row
  // W4A8 GEMM (linear_simd.h's gemm_a8): 8 rows x 3 row blocks, 24 int32 accumulators, from 12
  // rows of x (INT4KIT_GEMM_MIN_ROWS moves it too). 4096x11008, hot, two threads, AMD EPYC (Zen
  // 5), two alternating runs, ms GEMV -> GEMM: M = 8 1.09 / 1.24 -> 1.44 / 1.48, 12 1.66 / 2.37 ->
  // 1.59 / 1.83, 16 2.41 / 2.42 -> 2.14 / 2.27, 24 3.71 / 3.54 -> 2.58 / 2.53, 128 12.0 -> 9.85.
  static constexpr int kA8Rows = 8;
  static constexpr int kA8Blocks = 3;
  static constexpr int64_t kA8GemmMinRows = 12;

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static V broadcast_value(float v) { return _mm512_set1_ps(v); }
  static VI zero_i() { return _mm512_setzero_si512(); }
  static VI low_nibbles(VI w) { return _mm512_and_si512(w, _mm512_set1_epi32(0x0F0F0F0F)); }
  static VI high_nibbles(VI w) { return _mm512_and_si512(_mm512_srli_epi32(w, 4), _mm512_set1_epi32(0x0F0F0F0F)); }
  static VI bcast4(const int8_t* p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm512_set1_epi32(four);
  }
  static constexpr bool kPairSums = false;  // vpdpbusd sums straight into int32
  static VI dot_u8s8(VI acc, VI u8, VI s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }  // VNNI
  // The same in place, as inline assembly: with 24 accumulators live (linear_simd.h's gemm_a8)
  // GCC 12 allocates the intrinsic's result apart from its accumulator, then copies it back and
  // stores it to the stack on every quad; the tied asm operand keeps each in its register.
  static void dot_u8s8_in_place(VI& acc, VI u8, VI s8) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8)); }
  static V to_float(VI v) { return _mm512_cvtepi32_ps(v); }
  static VI load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
  // 16 int8 codes (linear_simd.h's int8 records) widened to fp32
  static V bytes_to_float(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  template <int kShift>
  static V codes_to_float(VI words) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(words, kShift), _mm512_set1_epi32(0xF)));
  }
  static V load_x(const void* x, DType dtype, int64_t i) {
    const auto* h = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i);
    switch (dtype) {
      case DType::F32: return _mm512_loadu_ps(static_cast<const float*>(x) + i);
      case DType::BF16: return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(h)), 16));
      default: return _mm512_cvtph_ps(_mm256_loadu_si256(h));
    }
  }
  // ---- W4A8 activation quantization (linear_simd.h's prepare_activations_a8_impl)
  // act_quant.h's abs_bits of 16 values, folded into a running max
  static VI max_abs_bits(VI acc, V v) {
    return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
  }
  static uint32_t hmax_u32(VI v) { return _mm512_reduce_max_epu32(v); }
  // v / scale rounded half to even and clamped to +-max, as int32 lanes
  static VI quantize(V v, V scale, V max) {
    const V r = _mm512_roundscale_ps(_mm512_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), max)), max));
  }
  static VI add_i(VI a, VI b) { return _mm512_add_epi32(a, b); }
  // act_quant.h's ScalarDigits (a digit step of split_digits) in int32 lanes
  static VI high_bytes(VI q) { return _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8); }
  static VI low_bytes(VI q, VI high) { return _mm512_sub_epi32(q, _mm512_slli_epi32(high, 8)); }
  static int32_t hsum_i(VI v) { return _mm512_reduce_add_epi32(v); }
  // 16 codes = two words of 8 columns, each word's columns in the W4A8 order (0, 4, 1, 5, 2, 6, 3, 7:
  // linear_simd.h's a8_position)
  static void store_a8_codes(int8_t* dst, VI q) {
    const __m128i order = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(q), order));
  }
  // 16 floats rounded to bf16 as format.h's float_to_bf16 does (nearest even, NaN kept quiet), in
  // AVX-512 F integer ops: the AVX-512 path runs on CPUs without AVX-512 BF16 (vcvtneps2bf16)
  // too, such as Intel's Cascade Lake and Ice Lake.
  static __m256i to_bf16(V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet_nan));
  }
  static void store_y16(void* y, DType dtype, int64_t offset, const float* out) {
    const V v = _mm512_load_ps(out);
    auto* h = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + offset);
    switch (dtype) {
      case DType::F32: _mm512_storeu_ps(static_cast<float*>(y) + offset, v); break;
      case DType::BF16: _mm256_storeu_si256(h, to_bf16(v)); break;
      default: _mm256_storeu_si256(h, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); break;
    }
  }
};

}  // namespace avx512_simd
}  // namespace cpu
}  // namespace int4kit
