// AVX2 + FMA + F16C fused int4 linear on the CPU prepacked layout (format.h). Built with
// -mavx2 -mfma -mf16c only; dispatch.cpp calls it after checking the CPU.
//
// Two paths, chosen by M:
//  * GEMV (M < kGemmMinRows), memory-bound: the weight stream is read once per 4 rows of x. A
//    16-word load gives 8 columns of 16 rows; column i of the word is (word >> 4i) & 0xF, turned to
//    fp32 and multiplied into per-group accumulators. The zero point and scale are applied once per
//    group: y += s * (acc - z * sum(x_group)).
//  * GEMM (M >= kGemmMinRows): a tile of kTileK columns x 16 rows is dequantized to fp32 in a
//    cache-resident buffer, then a 6x16 register-blocked FMA microkernel runs over all rows of x.
#include <immintrin.h>

#include <algorithm>
#include <memory>

#include "kernels_internal.h"

namespace int4kit {
namespace cpu {
namespace avx2 {
namespace {

constexpr int64_t kGemvRows = 4;      // rows of x sharing one pass over the weights
constexpr int64_t kGemmMinRows = 8;   // from here on the dequantize-to-buffer GEMM wins
constexpr int64_t kMicroRows = 6;     // 6 x 16 microkernel: 12 accumulators + 2 weights + 1 x
constexpr int64_t kTileK = 256;       // columns dequantized per tile (16 KiB of fp32)
constexpr int64_t kRowChunk = 192;    // rows of x per accumulator tile (12 KiB)

inline __m256 codes_to_float(__m256i words, int shift) {
  const __m256i nibble = _mm256_and_si256(_mm256_srli_epi32(words, shift), _mm256_set1_epi32(0xF));
  return _mm256_cvtepi32_ps(nibble);
}

// Stores 16 fp32 values (n0 .. n0+15, clipped at N) of one output row, adding bias.
inline void store_row16(void* y, DType dtype, int64_t offset, const float* vals, const float* bias,
                        int64_t n0, int64_t N) {
  const int64_t count = std::min<int64_t>(kBlockN, N - n0);
  alignas(32) float out[kBlockN];
  for (int64_t j = 0; j < count; ++j) out[j] = bias ? vals[j] + bias[n0 + j] : vals[j];
  if (dtype == DType::F32) {
    std::copy(out, out + count, static_cast<float*>(y) + offset);
  } else if (dtype == DType::F16 && count == kBlockN) {
    __m128i* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(y) + offset);
    _mm_storeu_si128(dst, _mm256_cvtps_ph(_mm256_load_ps(out), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(dst + 1, _mm256_cvtps_ph(_mm256_load_ps(out + 8), _MM_FROUND_TO_NEAREST_INT));
  } else {
    for (int64_t j = 0; j < count; ++j) store_from_float(y, dtype, offset + j, out[j]);
  }
}

// ---- GEMV ---------------------------------------------------------------------------------------
template <int R>
void gemv_rows(const Activations& a, int64_t m0, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t b) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const int64_t words = s.words_per_group();
  alignas(32) float out[R][kBlockN] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rec = group_record(packed, s, b, g);
    const uint32_t* codes = record_codes(rec);
    const float* xg[R];
    for (int r = 0; r < R; ++r) xg[r] = a.x + (m0 + r) * Kp + g * Gp;
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * kBlockN));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * kBlockN + 8));
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m256 q0 = codes_to_float(v0, 4 * i), q1 = codes_to_float(v1, 4 * i);
        for (int r = 0; r < R; ++r) {
          const __m256 xb = _mm256_broadcast_ss(xg[r] + w * 8 + i);
          acc[r][0] = _mm256_fmadd_ps(xb, q0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(xb, q1, acc[r][1]);
        }
      }
    }
    const float* sc = record_scales(rec, s);
    const float* zr = record_zeros(rec, s);
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_broadcast_ss(a.xsum + (m0 + r) * groups + g);
      for (int h = 0; h < 2; ++h) {
        const __m256 centred = _mm256_fnmadd_ps(_mm256_loadu_ps(zr + 8 * h), xs, acc[r][h]);
        _mm256_store_ps(out[r] + 8 * h, _mm256_fmadd_ps(_mm256_loadu_ps(sc + 8 * h), centred,
                                                         _mm256_load_ps(out[r] + 8 * h)));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    store_row16(y, dtype, (m0 + r) * ldy + b * kBlockN, out[r], bias, b * kBlockN, s.N);
}

void gemv(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
          void* y, DType dtype, int64_t ldy, int64_t b) {
  int64_t m = 0;
  for (; m + kGemvRows <= a.M; m += kGemvRows) gemv_rows<4>(a, m, packed, s, bias, y, dtype, ldy, b);
  switch (a.M - m) {
    case 3: gemv_rows<3>(a, m, packed, s, bias, y, dtype, ldy, b); break;
    case 2: gemv_rows<2>(a, m, packed, s, bias, y, dtype, ldy, b); break;
    case 1: gemv_rows<1>(a, m, packed, s, bias, y, dtype, ldy, b); break;
    default: break;
  }
}

// ---- GEMM ---------------------------------------------------------------------------------------
// Dequantizes groups [g0, g1) of row block b into tile[k][16] fp32 (k over padded columns).
void dequantize_tile(const uint8_t* packed, const PackedShape& s, int64_t b, int64_t g0, int64_t g1,
                     float* tile) {
  const int64_t words = s.words_per_group();
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* rec = group_record(packed, s, b, g);
    const uint32_t* codes = record_codes(rec);
    const float* sc = record_scales(rec, s);
    const float* zr = record_zeros(rec, s);
    const __m256 s0 = _mm256_loadu_ps(sc), s1 = _mm256_loadu_ps(sc + 8);
    // (q - z) * s = q * s - z * s: one FMA per code
    const __m256 zs0 = _mm256_mul_ps(_mm256_loadu_ps(zr), s0);
    const __m256 zs1 = _mm256_mul_ps(_mm256_loadu_ps(zr + 8), s1);
    float* dst = tile + (g - g0) * s.padded_group() * kBlockN;
    for (int64_t w = 0; w < words; ++w) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * kBlockN));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + w * kBlockN + 8));
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        float* row = dst + (w * 8 + i) * kBlockN;
        _mm256_store_ps(row, _mm256_fmsub_ps(codes_to_float(v0, 4 * i), s0, zs0));
        _mm256_store_ps(row + 8, _mm256_fmsub_ps(codes_to_float(v1, 4 * i), s1, zs1));
      }
    }
  }
}

// c[r][16] += x[r][0:kc] . tile[0:kc][16] for R rows of x (row stride ldx).
template <int R>
void microkernel(const float* x, int64_t ldx, const float* tile, int64_t kc, float* c) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_load_ps(c + r * kBlockN);
    acc[r][1] = _mm256_load_ps(c + r * kBlockN + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(tile + k * kBlockN), w1 = _mm256_load_ps(tile + k * kBlockN + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(c + r * kBlockN, acc[r][0]);
    _mm256_store_ps(c + r * kBlockN + 8, acc[r][1]);
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*);
constexpr MicroFn kMicro[kMicroRows + 1] = {nullptr,         microkernel<1>, microkernel<2>,
                                            microkernel<3>, microkernel<4>, microkernel<5>,
                                            microkernel<6>};

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<float, AlignedFree>;
AlignedBuffer aligned_floats(int64_t count) {
  return AlignedBuffer(static_cast<float*>(std::aligned_alloc(64, size_t(round_up(count * 4, 64)))));
}

void gemm(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
          void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const int64_t tile_groups = std::max<int64_t>(1, kTileK / Gp);
  AlignedBuffer tile = aligned_floats(tile_groups * Gp * kBlockN);
  AlignedBuffer acc = aligned_floats(kRowChunk * kBlockN);
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, a.M - m0);
      std::fill(acc.get(), acc.get() + rows * kBlockN, 0.f);
      for (int64_t g0 = 0; g0 < groups; g0 += tile_groups) {
        const int64_t g1 = std::min(groups, g0 + tile_groups);
        dequantize_tile(packed, s, b, g0, g1, tile.get());
        const int64_t kc = (g1 - g0) * Gp;
        for (int64_t r = 0; r < rows; r += kMicroRows) {
          const int64_t nr = std::min(kMicroRows, rows - r);
          kMicro[nr](a.x + (m0 + r) * Kp + g0 * Gp, Kp, tile.get(), kc, acc.get() + r * kBlockN);
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        store_row16(y, dtype, (m0 + r) * ldy + b * kBlockN, acc.get() + r * kBlockN, bias,
                    b * kBlockN, s.N);
    }
  }
}

inline __m256 load8_as_float(const void* x, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    case DType::BF16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

}  // namespace

void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         int64_t m_begin, int64_t m_end, float* xp, float* xsum) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      float* dst = xp + m * Kp + g * Gp;
      __m256 sum = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= len; i += 8) {
        const __m256 v = load8_as_float(x, dtype, src + i);
        _mm256_storeu_ps(dst + i, v);
        sum = _mm256_add_ps(sum, v);
      }
      float tail = 0.f;
      for (; i < Gp; ++i) {
        dst[i] = i < len ? load_as_float(x, dtype, src + i) : 0.f;
        tail += dst[i];
      }
      xsum[m * groups + g] = hsum(sum) + tail;
    }
  }
}

void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
            void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  if (a.M >= kGemmMinRows) {
    gemm(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  for (int64_t b = block_begin; b < block_end; ++b) gemv(a, packed, s, bias, y, dtype, ldy, b);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace int4kit
