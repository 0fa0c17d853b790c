// AVX-512 BF16 path of the fused int4 linear (AMD Zen 4 and Zen 5, Intel Cooper Lake; AMX CPUs
// have it too): the AVX-512 SIMD path (linear_simd.h, instantiated here with this class's
// crossovers) plus a register-blocked vdpbf16ps GEMM for bf16 and fp16 x from kGemmMinRows rows
// on. Built with the AVX-512 flags plus -mavx512bf16.
//
// Exact, like the AMX tiles: each column pair of a word becomes the bf16 pair (1 + q/16) (one
// shift and one ternary-logic op per 16 pairs), and x is bf16: bf16 x itself, fp16 x as two
// planes hi + lo (its top 8 significant bits and the exact remainder). Per group and output
// channel the accumulator starts at -(1 + z/16) sum_k x and gathers sum_k x (1 + q/16), so it
// ends at sum_k x (q - z) / 16, and one FMA drains it: y += 16 s acc.
//
// Blocking: a microkernel of kRows rows of x by kBlocks row blocks of 16 output channels keeps
// 8 x 3 = 24 fp32 accumulators, 3 weight vectors and a broadcast in the 32 zmm registers; per
// column pair 3 tile loads and 8 broadcasts of x feed 24 vdpbf16ps. The (1 + q/16) pairs of
// kBlocks row blocks over kChunkPairs column pairs are built once into an L1-resident tile
// (24 KiB) that every row of x then passes, so building costs 1/M of the products. x is laid out
// in panels of kRows rows ([pair][row][plane] 32-bit bf16 pairs), so the broadcasts walk one
// contiguous stream rather than kRows rows a row length apart (4 KiB aliasing in L1).
//
// Why not the GEMV's integer planes here: on Zen 5 vdpbf16ps issues two per cycle where
// vpdpbusd issues one every ~1.3 cycles (0.14 against 0.36 ns, one core), and both do 32
// multiply-adds of bf16 x per instruction (vpdpbusd: 64 byte products over two int8 planes).
#include <immintrin.h>

// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_ps(), which its flow
// analysis reports as "may be used uninitialized" once inlined: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "act_quant.h"
#include "gemm_blocking.h"
#include "kernels_internal.h"
#include "simd_avx512.h"
#include "store_row.h"

namespace int4kit {
namespace cpu {
namespace avx512bf16 {
namespace {

// The AVX-512 traits with this class's crossover for fp32 x: the int24 GEMV at every M. Its
// FMA GEMM streams fp32 x panels past every row block (11008x4096, M = 1024: 856 ms), and torch's
// fp32 GEMM on the dequantized weight (what the avx512 path hands M >= 1024 to) is no faster than
// F.linear fp32 here (546-562 ms), where the GEMV took 250-284 ms at M = 1023 (Zen 5, two threads).
struct Simd : avx512_simd::Simd {
  static constexpr int64_t kGemmMinRowsFloat = std::numeric_limits<int64_t>::max();
};

// The GEMVs, fp32 x, W4A8 and the dense weights: linear_simd.h in its own namespace (its names
// would collide with the GEMM's below).
namespace simd {
#include "linear_simd.h"
}  // namespace simd

constexpr int kRows = 8;    // rows of x per microkernel, and per panel of x
constexpr int kBlocks = 3;  // row blocks (16 output channels each) per microkernel
constexpr int64_t kChunkPairs = 128;  // column pairs per weight tile: 128 x 3 x 64 B = 24 KiB
constexpr int64_t kRowChunk = 256;    // rows of x per pass over a tile (their sums: 48 KiB)
static_assert(kRowChunk % kRows == 0, "row chunks hold whole panels");
// Rows of x from which the GEMM takes over from the AVX-512 GEMV on int16 / int24 planes
// (INT4KIT_GEMM_MIN_ROWS moves it). That GEMV's vpdpbusd also issues two per cycle on Zen 5, so it
// holds level far up: bench/bench_crossover.py, AMD EPYC (Zen 5), two threads, hot, GEMM / GEMV
// time, bf16 x: 4096x11008 M = 8 1.43x, 16 1.20x, 24 1.09x, 32 0.77-1.01x, 64 0.71-0.94x, 128 0.81x
// (11008x4096 alike); fp16 x level from 32 to 128 (0.64x to 1.16x, noisy).
constexpr int64_t kGemmMinRows = 32;

int planes_for(DType dtype) { return dtype == DType::BF16 ? 1 : 2; }

bool usable(const PackedShape& s, int64_t M, DType dtype) {
  if (s.bits != 4 || dtype == DType::F32) return false;  // fp32 x: the int24 GEMV (Simd above)
  const int64_t forced = forced_gemm_rows();
  return M >= (forced > 0 ? forced : kGemmMinRows);
}

// K in chunks of column pairs (gemm_blocking.h): at most kChunkPairs, whole groups where they fit.
// Every segment is whole words of 8 columns (Gp and kChunkPairs are multiples of 8 columns), so a
// chunk holds at most kChunkPairs / 4 segments.
constexpr int64_t kMaxSegments = kChunkPairs / 4;
int64_t group_pairs(const PackedShape& s) { return s.padded_group() / 2; }

// ---- the weight tile -----------------------------------------------------------------------------
// tile[pair][block][16]: for each of the 16 output channels of row block b + block, a bf16 pair
// over the pair's two columns: exact (1 + q/16) codes, or with kDequantized the weights
// (q - z) s rounded to bf16. params[segment][2][block][16] (exact codes only): 16 s and
// -(1 + z/16). Only the nb blocks in the thread's range are built (the microkernels take B = nb).
constexpr int64_t kPairStride = kBlocks * kBlockN;          // uint32 per tile pair
constexpr int64_t kSegmentParams = 2 * kBlocks * kBlockN;   // floats per segment in params

// The 4 pairs of word vector c (16 output channels x 8 columns) into tile rows row, row +
// kPairStride, ...: column pair p (2p, 2p + 1) sits at bits 4p and 16 + 4p (format.h's
// nibble_shift); shifted to bits 3 and 19, kept by a mask and ORed with 0x3F80 (bf16 1.0) in one
// ternary-logic op (0xEA: a & b | c), it is the bf16 pair (1 + q/16).
inline void store_code_pairs(__m512i c, uint32_t* row) {
  const __m512i mask = _mm512_set1_epi32(0x00780078), one = _mm512_set1_epi32(0x3F803F80);
  _mm512_store_si512(row, _mm512_ternarylogic_epi32(_mm512_slli_epi32(c, 3), mask, one, 0xEA));
  _mm512_store_si512(row + kPairStride, _mm512_ternarylogic_epi32(_mm512_srli_epi32(c, 1), mask, one, 0xEA));
  _mm512_store_si512(row + 2 * kPairStride, _mm512_ternarylogic_epi32(_mm512_srli_epi32(c, 5), mask, one, 0xEA));
  _mm512_store_si512(row + 3 * kPairStride, _mm512_ternarylogic_epi32(_mm512_srli_epi32(c, 9), mask, one, 0xEA));
}

// The same 4 pairs as bf16 weights (q - z) s = q s - z s (one FMA per code, then rounded to
// nearest even): vcvtne2ps2bf16 packs columns 2p and 2p + 1 as two runs of 16, which one vpermw
// interleaves into the 16 lanes' pairs.
inline void store_weight_pairs(__m512i c, __m512 scale, __m512 zs, uint32_t* row) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  auto pair = [&](auto even, auto odd, int p) {
    const __m512 lo = _mm512_fmsub_ps(Simd::codes_to_float<decltype(even)::value>(c), scale, zs);
    const __m512 hi = _mm512_fmsub_ps(Simd::codes_to_float<decltype(odd)::value>(c), scale, zs);
    _mm512_store_si512(row + p * kPairStride, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
  };
  pair(std::integral_constant<int, nibble_shift(0)>{}, std::integral_constant<int, nibble_shift(1)>{}, 0);
  pair(std::integral_constant<int, nibble_shift(2)>{}, std::integral_constant<int, nibble_shift(3)>{}, 1);
  pair(std::integral_constant<int, nibble_shift(4)>{}, std::integral_constant<int, nibble_shift(5)>{}, 2);
  pair(std::integral_constant<int, nibble_shift(6)>{}, std::integral_constant<int, nibble_shift(7)>{}, 3);
}

template <bool kDequantized>
void build_tile(const uint8_t* packed, const PackedShape& s, int64_t b, int64_t nb,
                const KSegment* segs, int nseg, uint32_t* tile, float* params) {
  const int64_t record_bytes = s.group_record_bytes(), block_bytes = s.row_block_bytes();
  for (int64_t v = 0; v < nb; ++v) {
    float* scale16 = params + v * kBlockN;  // segment i's: + i * kSegmentParams
    float* offset = params + (kBlocks + v) * kBlockN;
    for (int i = 0; i < nseg; ++i) {
      const KSegment& sg = segs[i];
      const uint8_t* rec = packed + (b + v) * block_bytes + sg.group * record_bytes;
      const void* rp = record_params(rec, s);
      const __m512 scale = Simd::load_x(rp, s.scale_dtype, scale_index(0));
      const __m512 zero = Simd::load_x(rp, s.scale_dtype, zero_index(0));
      const __m512 zs = _mm512_mul_ps(zero, scale);
      if constexpr (!kDequantized) {
        _mm512_store_ps(scale16 + i * kSegmentParams, _mm512_mul_ps(scale, _mm512_set1_ps(16.f)));
        _mm512_store_ps(offset + i * kSegmentParams, _mm512_fnmadd_ps(zero, _mm512_set1_ps(0.0625f), _mm512_set1_ps(-1.f)));
      }
      const uint32_t* codes = reinterpret_cast<const uint32_t*>(rec) + sg.in_group / 4 * kBlockN;
      uint32_t* row = tile + sg.in_chunk * kPairStride + v * kBlockN;
      for (int64_t w = 0; w < sg.units / 4; ++w, row += 4 * kPairStride) {
        simd::prefetch_ahead(codes + w * kBlockN);
        const __m512i c = Simd::load_words(codes + w * kBlockN);
        if constexpr (kDequantized) store_weight_pairs(c, scale, zs, row);
        else store_code_pairs(c, row);
      }
    }
  }
}

// ---- the microkernels ----------------------------------------------------------------------------
// acc[r][block] += the products of `pairs` column pairs for B of the tile's row blocks (B < kBlocks
// in a thread's last tile, whose other blocks are past its range): x at the panel's first such
// pair ([pair][kRows][P]), the tile at its row. The r, block and plane loops are unrolled before
// GCC's scalar replacement of acc (see linear_simd.h's microkernel), so acc stays in registers.
template <int R, int P, int B>
inline void accumulate(__m512 (&acc)[R][B], const uint32_t* xp, const uint32_t* tp, int64_t pairs) {
  for (int64_t j = 0; j < pairs; ++j, xp += kRows * P, tp += kPairStride) {
    __m512bh w[B];
#pragma GCC unroll 4
    for (int v = 0; v < B; ++v) w[v] = (__m512bh)_mm512_load_si512(tp + v * kBlockN);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int q = 0; q < P; ++q) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[r * P + q]));
#pragma GCC unroll 4
        for (int v = 0; v < B; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xb, w[v]);
      }
  }
}

// Exact codes: c[r][block][16] += the chunk's products for R rows of one panel of x (x: the
// panel at the chunk's first pair); xsum: row r's group sums at xsum[r * groups + g]. Each
// segment's accumulators start at its group's zero-point term (or 0 for a group's later pieces)
// and are drained into c with the group's scale.
template <int R, int P, int B>
void microkernel(const uint32_t* x, const uint32_t* tile, const KSegment* segs, int nseg,
                 const float* params, const float* xsum, int64_t groups, float* c) {
  __m512 acc[R][B];
  for (int i = 0; i < nseg; ++i, params += kSegmentParams) {
    const KSegment& sg = segs[i];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xs = _mm512_set1_ps(sg.in_group == 0 ? xsum[r * groups + sg.group] : 0.f);
#pragma GCC unroll 4
      for (int v = 0; v < B; ++v) acc[r][v] = _mm512_mul_ps(_mm512_load_ps(params + (kBlocks + v) * kBlockN), xs);
    }
    accumulate<R, P, B>(acc, x + sg.in_chunk * kRows * P, tile + sg.in_chunk * kPairStride, sg.units);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < B; ++v) {
        float* o = c + (r * kBlocks + v) * kBlockN;
        _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(params + v * kBlockN), acc[r][v], _mm512_load_ps(o)));
      }
  }
}

// Dequantized weights (bf16 x): c[r][block][16] += x . tile over the chunk's pairs, one
// accumulation for the whole chunk.
template <int R, int B>
void microkernel_dequantized(const uint32_t* x, const uint32_t* tile, int64_t pairs, float* c) {
  __m512 acc[R][B];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < B; ++v) acc[r][v] = _mm512_load_ps(c + (r * kBlocks + v) * kBlockN);
  accumulate<R, 1, B>(acc, x, tile, pairs);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < B; ++v) _mm512_store_ps(c + (r * kBlocks + v) * kBlockN, acc[r][v]);
}

using MicroFn = void (*)(const uint32_t*, const uint32_t*, const KSegment*, int, const float*,
                         const float*, int64_t, float*);
using DequantizedFn = void (*)(const uint32_t*, const uint32_t*, int64_t, float*);
template <int P, int B, int... R>
constexpr std::array<MicroFn, sizeof...(R) + 1> micro_table(std::integer_sequence<int, R...>) {
  return {nullptr, &microkernel<R + 1, P, B>...};
}
template <int B, int... R>
constexpr std::array<DequantizedFn, sizeof...(R) + 1> dequantized_table(std::integer_sequence<int, R...>) {
  return {nullptr, &microkernel_dequantized<R + 1, B>...};
}
template <int P, int... B>
constexpr std::array<std::array<MicroFn, kRows + 1>, sizeof...(B)> micro_tables(std::integer_sequence<int, B...>) {
  return {micro_table<P, B + 1>(std::make_integer_sequence<int, kRows>{})...};
}
template <int... B>
constexpr std::array<std::array<DequantizedFn, kRows + 1>, sizeof...(B)> dequantized_tables(std::integer_sequence<int, B...>) {
  return {dequantized_table<B + 1>(std::make_integer_sequence<int, kRows>{})...};
}
// kMicro[P - 1][B - 1][r] and kDequantizedMicro[B - 1][r] handle r rows (1 .. kRows) of x and B row
// blocks (1 .. kBlocks): a thread's last tile may hold fewer blocks, whose products would otherwise
// be computed for nothing (2048x256 at M = 512: 8 blocks a thread, 3 tiles for 2.67 tiles' work).
constexpr std::array<std::array<std::array<MicroFn, kRows + 1>, kBlocks>, 2> kMicro = {
    micro_tables<1>(std::make_integer_sequence<int, kBlocks>{}),
    micro_tables<2>(std::make_integer_sequence<int, kBlocks>{})};
constexpr auto kDequantizedMicro = dequantized_tables(std::make_integer_sequence<int, kBlocks>{});

// bf16 x from kBf16DequantizedMinRows rows (kernels.h) runs on dequantized weights: one
// accumulation per chunk instead of a drain per group (4096x11008 M = 128, two threads, hot: G = 128
// 15.1 -> 14.7 ms, G = 32 19.4 -> 14.6 ms).
bool dequantized(int64_t M, DType dtype) { return dtype == DType::BF16 && M >= kBf16DequantizedMinRows; }

// ---- the GEMM over row blocks [block_begin, block_end) -------------------------------------------
// A pass takes kPassTiles tiles (24 row blocks) and a row chunk of x: per chunk of K, each tile is
// built in turn into L1 and every panel of x passes it. x is read from L3 or DRAM once per pass
// (its chunk window, kRowChunk rows x kChunkPairs pairs: 128 KiB, 256 for fp16, stays in L2 for
// the later tiles), and the first tile requests each next panel's window into L2 while it runs:
// a new panel is a new page, which the hardware prefetcher does not foresee. The c rows of a pass
// (384 KiB) live in L2 too. Zen 5, two threads, bf16 x, hot, median ratio to F.linear bf16 over
// 8-12 alternating rounds, one tile per pass -> this: 11008x4096 M = 512 0.95 -> 0.98-0.99,
// M = 1024 0.65 -> 1.01 (x 22.5 MB), 128 1.10 -> 1.13; 4096x11008 M = 512 1.05 -> 1.08, M = 32
// level (1.35); the x prefetch alone: M = 512 0.955 -> 0.98-0.99.
constexpr int64_t kPassTiles = 8;

void gemm(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
          void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  const int P = planes_for(dtype);
  const bool dequant = dequantized(a.M, dtype);
  const int64_t half = s.padded_k() / 2, groups = s.groups(), step = chunk_units(group_pairs(s), kChunkPairs);
  const uint32_t* xpairs = reinterpret_cast<const uint32_t*>(a.x_bf16);
  constexpr int64_t kTileWords = kChunkPairs * kPairStride, kParams = kMaxSegments * kSegmentParams;
  const int64_t c_rows = std::min(round_up(a.M, kRows), kRowChunk);
  const int64_t c_floats = c_rows * kBlocks * kBlockN;  // one tile's output rows
  auto tile = aligned_array<uint32_t>(kTileWords);
  auto params = aligned_array<float>(kParams);
  auto c = aligned_array<float>(kPassTiles * c_floats);
  KSegment segs[kMaxSegments];
  for (int64_t b0 = block_begin; b0 < block_end; b0 += kPassTiles * kBlocks) {
    const int64_t pass_blocks = std::min(kPassTiles * kBlocks, block_end - b0);
    const int64_t ntiles = ceil_div(pass_blocks, int64_t(kBlocks));
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, a.M - m0);
      std::fill(c.get(), c.get() + ntiles * c_floats, 0.f);
      for (int64_t c0 = 0; c0 < half; c0 += step) {
        const int64_t c1 = std::min(half, c0 + step);
        const int nseg = k_segments(group_pairs(s), c0, c1, segs);
        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t b = b0 + t * kBlocks, nb = std::min<int64_t>(kBlocks, pass_blocks - t * kBlocks);
          if (dequant) build_tile<true>(packed, s, b, nb, segs, nseg, tile.get(), params.get());
          else build_tile<false>(packed, s, b, nb, segs, nseg, tile.get(), params.get());
          for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
            const int64_t m = m0 + r0;  // a multiple of kRows: the start of a panel
            const int64_t live = std::min<int64_t>(kRows, rows - r0);
            const uint32_t* x = xpairs + ((m / kRows) * half + c0) * kRows * P;
            float* out = c.get() + t * c_floats + r0 * kBlocks * kBlockN;
            if (t == 0 && r0 + kRows < rows) prefetch_window(x + half * kRows * P, (c1 - c0) * kRows * P * 4);
            if (dequant)
              kDequantizedMicro[nb - 1][live](x, tile.get(), c1 - c0, out);
            else
              kMicro[P - 1][nb - 1][live](x, tile.get(), segs, nseg, params.get(), a.xsum + m * groups, groups, out);
          }
        }
      }
      for (int64_t t = 0; t < ntiles; ++t)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t v = 0; v < std::min<int64_t>(kBlocks, pass_blocks - t * kBlocks); ++v) {
            const int64_t b = b0 + t * kBlocks + v;
            store_row16_as<Simd>(y, dtype, (m0 + r) * ldy + b * kBlockN,
                                 c.get() + t * c_floats + (r * kBlocks + v) * kBlockN, bias, b * kBlockN, s.N);
          }
    }
  }
}

// Columns i .. Gp - 1 of a group (its last len % 16 columns, then padding zeros) into one row's
// pairs of planes, a pair at a time: dst is the row's pair i / 2 (pairs kRows * P apart); returns
// the columns' sum.
float prepare_tail(const void* x, DType dtype, int64_t src, int64_t len, int64_t i, int64_t Gp, int P,
                   uint32_t* dst) {
  float sum = 0.f;
  for (; i < Gp; i += 2, dst += kRows * P) {
    uint32_t pair[2] = {0, 0};
    for (int e = 0; e < 2; ++e) {
      const float v = i + e < len ? load_as_float(x, dtype, src + i + e) : 0.f;
      sum += v;
      const uint32_t bits = float_to_bits(v), hi = bits & 0xFFFF0000u;
      pair[0] |= (hi >> 16) << (16 * e);
      pair[1] |= (float_to_bits(v - bits_to_float(hi)) >> 16) << (16 * e);
    }
    for (int q = 0; q < P; ++q) dst[q] = pair[q];
  }
  return sum;
}

// Row m of x into its panel (pairs of bf16 planes) and its group sums into a.xsum.
void prepare_row(const void* x, DType dtype, int64_t ldx, const PackedShape& s, const Activations& a,
                 int64_t m) {
  const int P = planes_for(dtype);
  const int64_t Gp = s.padded_group(), half = s.padded_k() / 2, groups = s.groups();
  uint32_t* panel = reinterpret_cast<uint32_t*>(a.x_bf16) + (m / kRows) * half * kRows * P + (m % kRows) * P;
  const __m512i keep_hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
    uint32_t* dst = panel + g * (Gp / 2) * kRows * P;  // pair i / 2 of the group: + (i / 2) * kRows * P
    __m512 sum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m512 v = Simd::load_x(x, dtype, src + i);
      sum = _mm512_add_ps(sum, v);
      // the planes' bf16 bits: the top half of v's bits (exact for bf16 x); for fp16 x that is a
      // truncation, and the remainder (at most 3 significant bits) is exact in bf16
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i hi = _mm512_and_si512(bits, keep_hi);
      __m512i plane_bits[2] = {hi, _mm512_castps_si512(_mm512_sub_ps(v, _mm512_castsi512_ps(hi)))};
      for (int q = 0; q < P; ++q) {
        alignas(32) uint32_t pairs[8];  // 16 bf16 = 8 pairs, columns (2t, 2t + 1) in pair t
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), _mm512_cvtepi32_epi16(_mm512_srli_epi32(plane_bits[q], 16)));
        for (int t = 0; t < 8; ++t) dst[(i / 2 + t) * kRows * P + q] = pairs[t];
      }
    }
    const float tail = prepare_tail(x, dtype, src, len, i, Gp, P, dst + (i / 2) * kRows * P);
    a.xsum[m * groups + g] = _mm512_reduce_add_ps(sum) + tail;
  }
}

// v[r] holds 8 32-bit elements of row r; afterwards v[c] holds column c (element r from row r).
inline void transpose8x8(__m256i (&v)[8]) {
  __m256i t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_epi32(v[2 * k], v[2 * k + 1]);      // r0 c0, r1 c0, r0 c1, r1 c1 | c4, c5
    t[2 * k + 1] = _mm256_unpackhi_epi32(v[2 * k], v[2 * k + 1]);  // c2, c3 | c6, c7
  }
  for (int k = 0; k < 2; ++k) {
    u[4 * k] = _mm256_unpacklo_epi64(t[4 * k], t[4 * k + 2]);          // rows 4k .. 4k+3 of c0 | c4
    u[4 * k + 1] = _mm256_unpackhi_epi64(t[4 * k], t[4 * k + 2]);      // c1 | c5
    u[4 * k + 2] = _mm256_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);  // c2 | c6
    u[4 * k + 3] = _mm256_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);  // c3 | c7
  }
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    v[c + 4] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}

// Rows m .. m + kRows - 1 of bf16 x (one whole panel; one plane): per 16 columns the rows' 8 pairs
// (one 256-bit load each) are transposed 8 x 8 into the panel's [pair][row] order and stored as 8
// vectors, where prepare_row writes each row's pairs one by one. The same sums in the same order
// as prepare_row's. (2048x256 at M = 512, one thread: the prepare was ~12% of the call.)
void prepare_panel_bf16(const void* x, int64_t ldx, const PackedShape& s, const Activations& a, int64_t m) {
  const int64_t Gp = s.padded_group(), half = s.padded_k() / 2, groups = s.groups();
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  uint32_t* panel = reinterpret_cast<uint32_t*>(a.x_bf16) + (m / kRows) * half * kRows;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
    uint32_t* dst = panel + g * (Gp / 2) * kRows;  // pair i / 2, row r: + (i / 2) * kRows + r
    __m512 sum[kRows];
    for (int r = 0; r < kRows; ++r) sum[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      __m256i v[kRows];
      for (int r = 0; r < kRows; ++r) {
        v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + src + r * ldx + i));
        sum[r] = _mm512_add_ps(sum[r], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v[r]), 16)));
      }
      transpose8x8(v);
      for (int t = 0; t < 8; ++t) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i / 2 + t) * kRows), v[t]);
    }
    for (int r = 0; r < kRows; ++r) {
      const float tail = prepare_tail(x, DType::BF16, src + r * ldx, len, i, Gp, 1, dst + (i / 2) * kRows + r);
      a.xsum[(m + r) * groups + g] = _mm512_reduce_add_ps(sum[r]) + tail;
    }
  }
}

}  // namespace

ActivationSizes activation_sizes(const PackedShape& s, int64_t M, DType dtype) {
  if (!usable(s, M, dtype)) return simd::activation_sizes_impl(s, M, dtype);
  return {0, M * s.groups(), round_up(M, kRows) * s.padded_k() * planes_for(dtype)};
}

void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end) {
  if (!usable(s, a.M, dtype)) {
    simd::prepare_activations_impl(x, dtype, ldx, s, a, m_begin, m_end);
    return;
  }
  for (int64_t m = m_begin; m < m_end;) {
    if (dtype == DType::BF16 && m % kRows == 0 && m + kRows <= m_end) {
      prepare_panel_bf16(x, ldx, s, a, m);
      m += kRows;
    } else {
      prepare_row(x, dtype, ldx, s, a, m++);
    }
  }
}

void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
            void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  if (!usable(s, a.M, dtype)) {
    simd::linear_impl(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  gemm(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
}

// W4A8 and the dense weights: the AVX-512 SIMD path's kernels.
void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  simd::prepare_activations_a8_impl(x, dtype, ldx, s, a, m_begin, m_end);
}

void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end) {
  simd::linear_a8_impl(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
}

void dequantize_transposed(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,
                           DType dtype, int64_t block_begin, int64_t block_end) {
  simd::dequantize_transposed_impl(packed, s, wt, ldw, dtype, block_begin, block_end);
}

}  // namespace avx512bf16
}  // namespace cpu
}  // namespace int4kit
