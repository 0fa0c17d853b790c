// AMX path of the fused int4 linear, for bf16 activations with M >= kMinRows; everything else
// goes to the AVX-512 path. Built with the AVX-512 flags plus -mamx-tile -mamx-bf16 -mamx-int8.
//
// The weights never leave the exact domain: each column pair of a word becomes the bf16 pair
// (1 + q/16) with one shift and one bit-select (as in the AVX-512 bf16 GEMV), 16 such rows make a
// B tile (16 column pairs x 16 output rows, the VNNI layout tdpbf16ps wants), and the A tiles are
// 16 rows x 32 columns of the exact bf16 copy of x. Per group, C = sum_k x (1 + q/16) accumulates
// in fp32 tiles, and the group's scale and zero point are applied on the way out of the tiles:
//   y += s * (16 C - (16 + z) * sum_k x).
// Up to kMTiles C tiles (64 rows of x) share every B tile, so the B tiles of a group are built once
// per 64 rows.
#include <immintrin.h>

// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_ps(), which its flow
// analysis reports as "may be used uninitialized" once inlined: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "kernels_internal.h"
#include "simd_avx512.h"

namespace int4kit {
namespace cpu {
namespace amx {
namespace {

using Simd = avx512_simd::Simd;

constexpr int64_t kTileRows = 16;  // rows of x per A and C tile
constexpr int64_t kTileK = 32;     // bf16 columns of x per A tile = 16 column pairs per B tile
constexpr int kMTiles = 4;         // C tiles (tmm0-3) per pass over a group's B tiles
constexpr int64_t kMinRows = 4;    // below this the AVX-512 bf16 GEMV is as fast
constexpr int64_t kPrefetchBytes = 4096;

// Palette 1: tmm0-3 C (16 rows x 64 bytes fp32), tmm4 A (16 rows x 32 bf16), tmm5 B (16 pair rows
// x 16 columns x 2 bf16). A static object in read-only data: ldtilecfg reads memory the compiler
// cannot have optimised away (llama.cpp's AMX path crashes here because its stack copy was).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
alignas(64) const TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16}};

bool usable(const PackedShape& s, DType dtype, int64_t M) {
  return dtype == DType::BF16 && M >= kMinRows && s.padded_group() % kTileK == 0;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
std::unique_ptr<T[], AlignedFree> aligned_array(int64_t count) {
  return std::unique_ptr<T[], AlignedFree>(
      static_cast<T*>(std::aligned_alloc(64, size_t(round_up(count * int64_t(sizeof(T)), 64)))));
}

// GCC's AMX intrinsics are macros that paste their tile numbers into the assembly text, so tile
// numbers must be literal digits: C tiles are tmm0-3, A is tmm4, B is tmm5 (see kTileConfig).
// Runs STEP(t) for the literal C tiles t < count.
#define INT4KIT_FOR_C_TILES(count, STEP) \
  do {                                  \
    { STEP(0); }                        \
    if ((count) > 1) { STEP(1); }       \
    if ((count) > 2) { STEP(2); }       \
    if ((count) > 3) { STEP(3); }       \
  } while (0)

// B tiles of one group record: tile t, row r = column pair (2r, 2r+1) of columns 32t .. 32t+31,
// i.e. pair r % 4 of word 4t + r / 4.
void build_b_tiles(const uint32_t* codes, int64_t words, uint32_t* tiles) {
  for (int64_t w = 0; w < words; ++w) {
    __builtin_prefetch(reinterpret_cast<const char*>(codes + w * kBlockN) + kPrefetchBytes, 0, 3);
    const __m512i v = Simd::load_words(codes + w * kBlockN);
    uint32_t* row = tiles + w * 4 * kBlockN;  // rows 4w .. 4w+3 across consecutive tiles
    _mm512_store_si512(row, Simd::bf16_pair_codes<-3>(v));
    _mm512_store_si512(row + kBlockN, Simd::bf16_pair_codes<1>(v));
    _mm512_store_si512(row + 2 * kBlockN, Simd::bf16_pair_codes<5>(v));
    _mm512_store_si512(row + 3 * kBlockN, Simd::bf16_pair_codes<9>(v));
  }
}

void store_bf16_row(uint16_t* y, const float* vals, const float* bias, int64_t n0, int64_t N) {
  const int64_t count = std::min<int64_t>(kBlockN, N - n0);
  __m512 v = _mm512_load_ps(vals);
  if (count == kBlockN) {
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
    return;
  }
  for (int64_t j = 0; j < count; ++j) y[j] = float_to_bf16(bias ? vals[j] + bias[n0 + j] : vals[j]);
}

}  // namespace

void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end) {
  if (!usable(s, dtype, a.M)) {
    avx512::prepare_activations(x, dtype, ldx, s, a, m_begin, m_end);
    return;
  }
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      uint16_t* dst = a.x_bf16 + m * Kp + g * Gp;
      std::memcpy(dst, xb + src, size_t(len) * 2);
      std::fill(dst + len, dst + Gp, uint16_t(0));
      __m512 sum = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= len; i += 16) sum = _mm512_add_ps(sum, Simd::load_x(x, dtype, src + i));
      float tail = 0.f;
      for (; i < len; ++i) tail += bf16_to_float(xb[src + i]);
      a.xsum[m * groups + g] = _mm512_reduce_add_ps(sum) + tail;
    }
  }
}

void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
            void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  if (!usable(s, dtype, a.M)) {
    avx512::linear(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const int64_t words = s.words_per_group(), tiles_per_group = Gp / kTileK;
  const int64_t record_bytes = s.group_record_bytes(), block_bytes = s.row_block_bytes();
  auto b_tiles = aligned_array<uint32_t>(tiles_per_group * kTileRows * kBlockN);
  auto out = aligned_array<float>(kMTiles * kTileRows * kBlockN);
  alignas(64) float c[kTileRows][kBlockN];
  const __m512 sixteen = _mm512_set1_ps(16.f);

  _tile_loadconfig(&kTileConfig);
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t m0 = 0; m0 < a.M; m0 += kMTiles * kTileRows) {
      const int m_tiles = int(std::min<int64_t>(kMTiles, ceil_div(a.M - m0, kTileRows)));
      const int64_t rows = std::min<int64_t>(m_tiles * kTileRows, a.M - m0);
      std::fill(out.get(), out.get() + m_tiles * kTileRows * kBlockN, 0.f);
      const uint8_t* rec = packed + b * block_bytes;
      for (int64_t g = 0; g < groups; ++g, rec += record_bytes) {
        build_b_tiles(reinterpret_cast<const uint32_t*>(rec), words, b_tiles.get());
#define ZERO_C(t) _tile_zero(t)
        INT4KIT_FOR_C_TILES(m_tiles, ZERO_C);
        for (int64_t t = 0; t < tiles_per_group; ++t) {
          _tile_loadd(5, b_tiles.get() + t * kTileRows * kBlockN, kBlockN * 4);
          const uint16_t* a_col = a.x_bf16 + m0 * Kp + g * Gp + t * kTileK;
#define MULTIPLY(i)                                          \
  _tile_loadd(4, a_col + (i) * kTileRows * Kp, Kp * 2); \
  _tile_dpbf16ps(i, 4, 5)
          INT4KIT_FOR_C_TILES(m_tiles, MULTIPLY);
        }
        const float* sc = reinterpret_cast<const float*>(rec + words * kBlockN * 4);
        const __m512 scale = _mm512_loadu_ps(sc);
        const __m512 zero16 = _mm512_add_ps(_mm512_loadu_ps(sc + kBlockN), sixteen);
        // C tile i -> rows m0 + 16i .. of the fp32 accumulators, scale and zero point applied
        auto apply_group = [&](int i) {
          for (int64_t r = 0; r < kTileRows && i * kTileRows + r < rows; ++r) {
            const int64_t m = m0 + i * kTileRows + r;
            float* o = out.get() + (i * kTileRows + r) * kBlockN;
            const __m512 zx = _mm512_mul_ps(zero16, _mm512_set1_ps(a.xsum[m * groups + g]));
            const __m512 centred = _mm512_fmsub_ps(sixteen, _mm512_load_ps(c[r]), zx);
            _mm512_store_ps(o, _mm512_fmadd_ps(scale, centred, _mm512_load_ps(o)));
          }
        };
#define DRAIN_C(i)                    \
  _tile_stored(i, c, kBlockN * 4); \
  apply_group(i)
        INT4KIT_FOR_C_TILES(m_tiles, DRAIN_C);
#undef ZERO_C
#undef MULTIPLY
#undef DRAIN_C
      }
      for (int64_t r = 0; r < rows; ++r)
        store_bf16_row(static_cast<uint16_t*>(y) + (m0 + r) * ldy + b * kBlockN,
                       out.get() + r * kBlockN, bias, b * kBlockN, s.N);
    }
  }
  _tile_release();
}

bool request_permission() {
  // Linux hands out the AMX tile state per process on request (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); without it the first tile instruction faults.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace amx
}  // namespace cpu
}  // namespace int4kit
