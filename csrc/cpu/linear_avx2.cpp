// AVX2 + FMA + F16C instantiation of the vector fused linear (linear_simd.h): 8 fp32 lanes, two
// vectors per 16-row block. Built with -mavx2 -mfma -mf16c only; dispatch.cpp checks the CPU.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <array>
#include <cstdlib>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "act_quant.h"
#include "gemm_blocking.h"
#include "kernels_internal.h"
#include "store_row.h"

namespace int4kit {
namespace cpu {
namespace avx2 {
namespace {

struct Simd {
  using V = __m256;
  using VI = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kMicroRows = 6;  // 6 x 16: 12 accumulators + 2 weight vectors + 1 x
  // linear_simd.h's gemm_min_rows and xint_planes: bf16 x on the int16 grid beat the GEMM below
  // 64 rows (level from there); int24 x only for one row (16 ymm registers), and fp32 / fp16 x
  // with more rows on the float GEMV, which the GEMM beats from 8
  static constexpr int64_t kGemmMinRowsBf16 = 64;
  static constexpr int64_t kGemmMinRowsFloat = 8;
  static constexpr int64_t kInt24MaxRows = 1;
  // W4A8 GEMM (linear_simd.h's gemm_a8): 4 rows x 1 row block (2 vectors) of int16 pair sums,
  // from 24 rows of x. Forced AVX2 on an AMD EPYC (Zen 5), two threads, fastest of 14 calls
  // alternating in one process, ms GEMV -> GEMM, 4096x11008 / 11008x4096: M = 16 2.97 / 3.16 ->
  // 3.19 / 3.43, 20 3.73 / 3.93 -> 3.66 / 4.01, 24 4.41 / 5.99 -> 4.46 / 5.79, 32 5.97 / 7.03 ->
  // 5.53 / 6.05, 128 23.4 / 29.7 -> 19.9 / 24.1, 512 97.3 / 118.7 -> 84.6 / 93.2.
  static constexpr int kA8Rows = 4;
  static constexpr int kA8Blocks = 1;
  static constexpr int64_t kA8GemmMinRows = 24;

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static V broadcast_value(float v) { return _mm256_set1_ps(v); }
  static VI zero_i() { return _mm256_setzero_si256(); }
  static VI low_nibbles(VI w) { return _mm256_and_si256(w, _mm256_set1_epi32(0x0F0F0F0F)); }
  static VI high_nibbles(VI w) { return _mm256_and_si256(_mm256_srli_epi32(w, 4), _mm256_set1_epi32(0x0F0F0F0F)); }
  static VI bcast4(const int8_t* p) {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm256_set1_epi32(four);
  }
  // Plain AVX2 has no vpdpbusd: u8 x s8 pairs to int16 (at most 2 * 15 * 128, no saturation),
  // summed in int16 over a few words (linear_simd.h's gemv_rows_a8), then pairs of int16 to int32.
  static constexpr bool kPairSums = true;
  static VI pair_sums(VI u8, VI s8) { return _mm256_maddubs_epi16(u8, s8); }
  static VI add_pairs(VI a, VI b) { return _mm256_add_epi16(a, b); }
  // pairs[r][j] += pair_sums(tile vector j of one quad, x bytes of row r), the W4A8 GEMM's whole
  // 4 x 2 step (linear_simd.h's accumulate_a8_pairs) as one block of assembly: written with
  // intrinsics, GCC 12 gives each product a register of its own, copies every sum back and keeps
  // one of the eight sums on the stack, whose store-to-load round trip then paces every quad
  // (one thread, 4096x11008, M = 512: 91 against 149 G multiply-adds/s for this block alone)
  static void add_pair_sums_4x2(VI (&pairs)[4][2], const int32_t* tile_quad, const int8_t* x, int64_t ldx) {
    VI w0, w1, xb, product;
    asm("vmovdqa (%[tw]), %[w0]\n\t"
        "vmovdqa 32(%[tw]), %[w1]\n\t"
        "vpbroadcastd (%[x0]), %[xb]\n\t"
        "vpmaddubsw %[xb], %[w0], %[t]\n\tvpaddw %[t], %[p00], %[p00]\n\t"
        "vpmaddubsw %[xb], %[w1], %[t]\n\tvpaddw %[t], %[p01], %[p01]\n\t"
        "vpbroadcastd (%[x0], %[ldx]), %[xb]\n\t"
        "vpmaddubsw %[xb], %[w0], %[t]\n\tvpaddw %[t], %[p10], %[p10]\n\t"
        "vpmaddubsw %[xb], %[w1], %[t]\n\tvpaddw %[t], %[p11], %[p11]\n\t"
        "vpbroadcastd (%[x0], %[ldx], 2), %[xb]\n\t"
        "vpmaddubsw %[xb], %[w0], %[t]\n\tvpaddw %[t], %[p20], %[p20]\n\t"
        "vpmaddubsw %[xb], %[w1], %[t]\n\tvpaddw %[t], %[p21], %[p21]\n\t"
        "vpbroadcastd (%[x3]), %[xb]\n\t"
        "vpmaddubsw %[xb], %[w0], %[t]\n\tvpaddw %[t], %[p30], %[p30]\n\t"
        "vpmaddubsw %[xb], %[w1], %[t]\n\tvpaddw %[t], %[p31], %[p31]"
        : [p00] "+x"(pairs[0][0]), [p01] "+x"(pairs[0][1]), [p10] "+x"(pairs[1][0]), [p11] "+x"(pairs[1][1]),
          [p20] "+x"(pairs[2][0]), [p21] "+x"(pairs[2][1]), [p30] "+x"(pairs[3][0]), [p31] "+x"(pairs[3][1]),
          [w0] "=&x"(w0), [w1] "=&x"(w1), [xb] "=&x"(xb), [t] "=&x"(product)
        : [tw] "r"(tile_quad), [x0] "r"(x), [ldx] "r"(ldx), [x3] "r"(x + 3 * ldx)
        : "memory");
  }
  static VI widen_pairs(VI acc, VI pairs) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static V to_float(VI v) { return _mm256_cvtepi32_ps(v); }
  // ---- W4A8 activation quantization (linear_simd.h's prepare_activations_a8_impl)
  // act_quant.h's abs_bits of 8 values, folded into a running max
  static VI max_abs_bits(VI acc, V v) {
    return _mm256_max_epu32(acc, _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF)));
  }
  static uint32_t hmax_u32(VI v) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    return uint32_t(_mm_cvtsi128_si32(_mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1))));
  }
  // v / scale rounded half to even and clamped to +-max, as int32 lanes
  static VI quantize(V v, V scale, V max) {
    const V r = _mm256_round_ps(_mm256_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), max)), max));
  }
  static VI add_i(VI a, VI b) { return _mm256_add_epi32(a, b); }
  // act_quant.h's ScalarDigits (a digit step of split_digits) in int32 lanes
  static VI high_bytes(VI q) { return _mm256_srai_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(128)), 8); }
  static VI low_bytes(VI q, VI high) { return _mm256_sub_epi32(q, _mm256_slli_epi32(high, 8)); }
  static int32_t hsum_i(VI v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
  }
  // 8 codes = one word, its columns in the W4A8 order (0, 4, 1, 5, 2, 6, 3, 7: a8_position)
  static void store_a8_codes(int8_t* dst, VI q) {
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const __m128i order = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_shuffle_epi8(_mm_packs_epi16(words, words), order));
  }
  // 8 int8 codes (linear_simd.h's int8 records) widened to fp32
  static V bytes_to_float(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static VI load_words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // kLanes int32 sums at an aligned address (the W4A8 GEMM's widened pair sums)
  static VI load_sums(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_sums(int32_t* p, VI v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  template <int kShift>
  static V codes_to_float(VI words) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(words, kShift), _mm256_set1_epi32(0xF)));
  }
  static V load_x(const void* x, DType dtype, int64_t i) {
    const auto* h = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i);
    switch (dtype) {
      case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
      case DType::BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16));
      default: return _mm256_cvtph_ps(_mm_loadu_si128(h));
    }
  }
  static void store_y16(void* y, DType dtype, int64_t offset, const float* out) {
    if (dtype == DType::F32) {
      _mm256_storeu_ps(static_cast<float*>(y) + offset, _mm256_load_ps(out));
      _mm256_storeu_ps(static_cast<float*>(y) + offset + 8, _mm256_load_ps(out + 8));
    } else if (dtype == DType::F16) {
      auto* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + offset);
      _mm_storeu_si128(dst, _mm256_cvtps_ph(_mm256_load_ps(out), _MM_FROUND_TO_NEAREST_INT));
      _mm_storeu_si128(dst + 1, _mm256_cvtps_ph(_mm256_load_ps(out + 8), _MM_FROUND_TO_NEAREST_INT));
    } else {
      for (int j = 0; j < kBlockN; ++j) store_from_float(y, dtype, offset + j, out[j]);
    }
  }
};

#include "linear_simd.h"

}  // namespace

INT4KIT_SIMD_ENTRY_POINTS

}  // namespace avx2
}  // namespace cpu
}  // namespace int4kit
