// AMX path of the fused int4 linear, from a few rows of x on (min_rows); smaller M goes to the
// AVX-512 path.
// Built with the AVX-512 flags plus -mamx-tile -mamx-bf16 -mamx-int8.
//
// The weights never leave the exact domain: each column pair of a word becomes the bf16 pair
// (1 + q/16) with one shift and one bit-select (build_b_tiles), and 16 such rows make
// a B tile (16 column pairs x 16 output rows: the VNNI layout tdpbf16ps wants). The A tiles are 16
// rows x 32 columns of x in bf16: exact for bf16 x; fp16 and fp32 x are split into 2 or 3 bf16
// planes (x = hi + mid + lo, 8 mantissa bits each), one tdpbf16ps per plane, so fp32 keeps its
// 24 bits. Per group, C = sum_k x (1 + q/16) accumulates in fp32 tiles, and the group's scale
// and zero point are applied on the way out of the tiles: y += s * (16 C - (16 + z) * sum_k x).
// fp32 x whose groups are whole 64-column tiles runs on int8 tiles instead, from the int24 grid
// the GEMV uses (Int24Flavour), and W4A8 on int8 tiles from its int8 x (Int8Flavour).
//
// Tiles: a 2 x 2 block of C tiles (32 rows of x x 2 row blocks = 32 output channels), two A tiles
// and two B tiles, so every A and B tile load feeds two tdpbf16ps. A group's B tiles are rebuilt
// for every 32-row pass (two instructions and one store per 16 column pairs): keeping all groups'
// tiles instead,
// built once per row-block pair, measured slower on LLaMA-sized layers (M = 16: 2.2 vs 1.4 ms
// for 4096x11008), the L1-resident per-group tiles winning over an L2 round trip.
#include <immintrin.h>

// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_ps(), which its flow
// analysis reports as "may be used uninitialized" once inlined: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#include "act_quant.h"
#include "gemm_blocking.h"
#include "kernels_internal.h"
#include "simd_avx512.h"
#include "store_row.h"

namespace int4kit {
namespace cpu {
namespace amx {
namespace {

using Simd = avx512_simd::Simd;

// A group record's 16 scales and 16 zero points as fp32 (the record holds them in s.scale_dtype).
struct GroupParams {
  __m512 scale, zero;
  GroupParams(const uint8_t* rec, const PackedShape& s) : GroupParams(record_params(rec, s), s.scale_dtype) {}

 private:
  GroupParams(const void* params, DType t)
      : scale(Simd::load_x(params, t, scale_index(0))), zero(Simd::load_x(params, t, zero_index(0))) {}
};

constexpr int64_t kTileRows = 16;  // rows of x per A and C tile
constexpr int64_t kPassRows = 2 * kTileRows;  // rows of x per pass (two A tiles)
// Below these row counts the AVX-512 GEMV is as fast or faster. fp32 x (three bf16 planes per
// tile) from 4 rows and fp16 x (two) from 3, against the GEMV on int24 x (4096x11008, two threads,
// hot, ms, GEMV / tiles: fp32 M = 3 1.19 / 1.37, M = 4 1.50 / 1.44, cold M = 3 1.70 / 1.92,
// M = 4 2.01 / 1.99; fp16 M = 2 0.88 / 1.20, M = 3 1.16 / 1.20, M = 4 1.49 / 1.18); bf16 x,
// whose GEMV runs on the int16 grid, from 3 (bench_linear.py, two threads, hot / cold: M = 2
// GEMV 0.67-0.69 / 1.25-1.29 ms, tiles 0.84-0.86 / 1.24-1.26; M = 3 level hot, cold 1.40-1.46
// against 1.23-1.31); W4A8 (VNNI GEMV) from 4 (M = 2: 0.95 against 1.07, M = 3 level, M = 4:
// 1.24 against 1.20).
constexpr int64_t kMinRowsA8 = 4;
int64_t min_rows(DType dtype) { return dtype == DType::F32 ? 4 : 3; }
constexpr int64_t kPrefetchBytes = 4096;

// Palette 1, eight tiles of 64-byte rows: tmm0-3 C (C[i][j] = tmm(2i + j) for A tile i and B
// tile j), tmm4-5 A, tmm6-7 B. Static objects in read-only data: ldtilecfg reads memory the
// compiler cannot have optimised away (llama.cpp's AMX path crashes here because its stack copy
// was).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
// A and C tiles of m rows (B tiles always 16): a tile product costs about one cycle per row of A,
// so below 16 rows of x the tiles hold just those rows (4096x11008, one thread: fp32 x M = 4
// 6.66 -> 2.65 ms, bf16 M = 8 2.78 -> 2.15 ms).
constexpr TileConfig tile_config(int m) {
  TileConfig c{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {}};
  for (int t = 0; t < 6; ++t) c.rows[t] = uint8_t(m);
  c.rows[6] = c.rows[7] = 16;
  return c;
}
template <int... M>
constexpr std::array<TileConfig, sizeof...(M)> tile_config_table(std::integer_sequence<int, M...>) {
  return {tile_config(M + 1)...};
}
alignas(64) constexpr std::array<TileConfig, kTileRows> kTileConfigs =
    tile_config_table(std::make_integer_sequence<int, kTileRows>{});
// the configuration for M rows of x: passes of 16 (and 32) rows from M = 16 on
inline const TileConfig* tile_config_for(int64_t M) {
  return &kTileConfigs[std::min(M, kTileRows) - 1];
}

int planes_for(DType dtype) { return dtype == DType::BF16 ? 1 : dtype == DType::F16 ? 2 : 3; }

// Splits 16 fp32 values into bf16 planes hi, mid, lo (truncations, so each remainder is exact).
inline void split_bf16(__m512 v, int planes, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
  const __m512i keep_hi = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 rest = v;
  uint16_t* dst[3] = {hi, mid, lo};
  for (int p = 0; p < planes; ++p) {
    const __m512i bits = _mm512_castps_si512(rest);
    const __m512i top = p + 1 < planes ? _mm512_and_si512(bits, keep_hi) : bits;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[p]), _mm512_cvtepi32_epi16(_mm512_srli_epi32(top, 16)));
    rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(top));
  }
}

inline void store_row(void* y, DType dtype, int64_t offset, const float* vals, const float* bias,
                      int64_t n0, int64_t N) {
  store_row16_as<Simd>(y, dtype, offset, vals, bias, n0, N);
}

// ---- the tile loop, shared by the bf16 (W4A16) and int8 (W4A8) flavours -----------------------
// Bf16 flavour: A = x as bf16 planes, B = bf16(1 + q/16) pairs, tdpbf16ps, fp32 C tiles.
struct Bf16Flavour {
  static constexpr bool kInt8 = false;
  static constexpr bool kDrainPerPlane = false;
  static constexpr int64_t kTileK = 32;  // x columns per A tile (16 bf16 pairs)
  static constexpr int64_t kElemBytes = 2;
  const Activations& a;
  int planes;
  int64_t plane;  // elements per bf16 plane

  static void build_b_tiles(const uint32_t* codes, int64_t words, uint32_t* tiles) {
    for (int64_t w = 0; w < words; ++w) {
      __builtin_prefetch(reinterpret_cast<const char*>(codes + w * kBlockN) + kPrefetchBytes, 0, 3);
      // Column pair p (2p, 2p+1) sits at bits 4p and 16 + 4p: shifted to bits 3 and 19, kept by a
      // mask and ORed with 0x3F80 (bf16 1.0) in one ternary-logic op (0xEA: a & b | c). A GF(2)
      // affine form (two loads, merge-masked vgf2p8affineqb per column) measured slower here,
      // where every pass rebuilds the tiles: MiniLM in bench/demo.py (fp32 x, ~1900 rows)
      // 302-318 ms with it against 271-283 ms, M = 16 bf16 ~5% (bench_kernels).
      const __m512i v = Simd::load_words(codes + w * kBlockN);
      uint32_t* row = tiles + w * 4 * kBlockN;  // tile rows 4w .. 4w+3: column pairs of word w
      const __m512i mask = _mm512_set1_epi32(0x00780078), one = _mm512_set1_epi32(0x3F803F80);
      _mm512_store_si512(row, _mm512_ternarylogic_epi32(_mm512_slli_epi32(v, 3), mask, one, 0xEA));
      _mm512_store_si512(row + kBlockN, _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 1), mask, one, 0xEA));
      _mm512_store_si512(row + 2 * kBlockN, _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 5), mask, one, 0xEA));
      _mm512_store_si512(row + 3 * kBlockN, _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, 9), mask, one, 0xEA));
    }
  }
  const void* a_tile(int p, int64_t offset) const { return a.x_bf16 + p * plane + offset; }
  // out += s * (16 C - (16 + z) sum x) for the first `rows` rows of a drained fp32 C tile, rows
  // m, m + 1, ... of x (the group's scale and zero terms held in registers across the rows)
  void drain_tile(const float (&c)[kTileRows][kBlockN], const GroupParams& p, int64_t rows,
                  int64_t m, int64_t g, int64_t groups, float* o, int /*pass*/) const {
    const __m512 sixteen = _mm512_set1_ps(16.f);
    const __m512 zero16 = _mm512_add_ps(p.zero, sixteen);
    for (int64_t r = 0; r < rows; ++r, o += kBlockN) {
      const __m512 zx = _mm512_mul_ps(zero16, _mm512_set1_ps(a.xsum[(m + r) * groups + g]));
      const __m512 centred = _mm512_fmsub_ps(sixteen, _mm512_load_ps(c[r]), zx);
      _mm512_store_ps(o, _mm512_fmadd_ps(p.scale, centred, _mm512_load_ps(o)));
    }
  }
  void finish_row(int64_t, float*) const {}
};

// Int8 flavour: A = x quantized per row to int8 (columns in the W4A8 word order), B = the code
// bytes exactly as vpdpbusd sees them (low nibbles: columns 0,4,1,5 of a word; high: 2,6,3,7),
// tdpbsud (signed A x unsigned B), int32 C tiles.
struct Int8Flavour {
  static constexpr bool kInt8 = true;
  static constexpr bool kDrainPerPlane = false;
  static constexpr int64_t kTileK = 64;  // x columns per A tile (16 rows of 4 bytes in B)
  static constexpr int64_t kElemBytes = 1;
  const ActivationsA8& a;
  int planes = 1;

  static void build_b_tiles(const uint32_t* codes, int64_t words, uint32_t* tiles) {
    for (int64_t w = 0; w < words; ++w) {
      __builtin_prefetch(reinterpret_cast<const char*>(codes + w * kBlockN) + kPrefetchBytes, 0, 3);
      const __m512i v = Simd::load_words(codes + w * kBlockN);
      uint32_t* row = tiles + w * 2 * kBlockN;  // tile rows 2w, 2w+1: word w's two byte quads
      _mm512_store_si512(row, Simd::low_nibbles(v));
      _mm512_store_si512(row + kBlockN, Simd::high_nibbles(v));
    }
  }
  const void* a_tile(int, int64_t offset) const { return a.xq + offset; }
  // out += s * (C - z sum xq) for the first `rows` rows of a drained int32 C tile; the per-row
  // activation scale is applied once per row at the end (finish_row), not per group
  void drain_tile(const float (&c)[kTileRows][kBlockN], const GroupParams& p, int64_t rows,
                  int64_t m, int64_t g, int64_t groups, float* o, int /*pass*/) const {
    const int32_t* xq_sum = a.xq_sum + m * groups + g;
    for (int64_t r = 0; r < rows; ++r, o += kBlockN) {
      const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(c[r]));
      const __m512 centred = _mm512_fnmadd_ps(p.zero, _mm512_set1_ps(float(xq_sum[r * groups])), acc);
      _mm512_store_ps(o, _mm512_fmadd_ps(p.scale, centred, _mm512_load_ps(o)));
    }
  }
  void finish_row(int64_t m, float* o) const {
    _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(a.scale[m])));
  }
};

// Int24 flavour (W4A16 with fp32 x): A = x on Activations::xint's int24 grid, three
// int8 planes of base-256 digits with a power-of-two scale per row and group; B as Int8Flavour.
// A plane's int32 C tiles cannot absorb the next plane's (65536 times the first's digits would
// overflow them), so each plane gets its own pass over the group's tiles and its own drain:
// y += s * scale[m, g] * 256^(2 - p) * (C_p - z * sum_k digits_p). Against fp32 x split into
// three bf16 planes (Bf16Flavour), tdpbsud takes 64 columns per tile product to tdpbf16ps's 32.
struct Int24Flavour {
  static constexpr bool kInt8 = true;
  static constexpr bool kDrainPerPlane = true;
  static constexpr int64_t kTileK = Int8Flavour::kTileK;
  static constexpr int64_t kElemBytes = 1;
  const ActivationsA8& a;
  int planes = Int24Grid::kPlanes;

  static void build_b_tiles(const uint32_t* codes, int64_t words, uint32_t* tiles) {
    Int8Flavour::build_b_tiles(codes, words, tiles);
  }
  const void* a_tile(int p, int64_t offset) const { return a.plane(p) + offset; }
  void drain_tile(const float (&c)[kTileRows][kBlockN], const GroupParams& p, int64_t rows,
                  int64_t m, int64_t g, int64_t groups, float* o, int plane) const {
    const float digit_weight = float(1 << (8 * (Int24Grid::kPlanes - 1 - plane)));
    const int32_t* sums = a.plane_sums(plane) + m * groups + g;
    const float* x_scale = a.scale + m * groups + g;
    for (int64_t r = 0; r < rows; ++r, o += kBlockN) {
      const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(c[r]));
      const __m512 centred = _mm512_fnmadd_ps(p.zero, _mm512_set1_ps(float(sums[r * groups])), acc);
      // the power-of-two x scale first: exact, where s * scale could underflow for tiny x
      const __m512 x_part = _mm512_mul_ps(centred, _mm512_set1_ps(x_scale[r * groups] * digit_weight));
      _mm512_store_ps(o, _mm512_fmadd_ps(p.scale, x_part, _mm512_load_ps(o)));
    }
  }
  void finish_row(int64_t, float*) const {}
};

template <typename Flavour>
bool tiles_fit(const PackedShape& s, int64_t M, int64_t min_rows) {
  return M >= min_rows && s.padded_group() % Flavour::kTileK == 0;
}

// Int8 weights (s.bits 8) have no tile kernel yet: the AVX-512 paths run them.
bool usable(const PackedShape& s, int64_t M, DType dtype) {
  return s.bits == 4 && tiles_fit<Bf16Flavour>(s, M, min_rows(dtype));
}

// fp32 x runs on int8 tiles from the int24 grid (Int24Flavour) where groups are whole 64-column
// tiles; fp16 x (two bf16 planes) and bf16 x on bf16 tiles. Three int8 planes with a drain each
// against three or two bf16 planes with one (4096x11008, two threads, hot, ms, bf16 planes ->
// int24): fp32 M = 4 1.44 -> 1.22, 16 2.40 -> 2.35, 128 23.6 -> 20.6, 512 212 -> 120; fp16
// M = 16 1.87 -> 2.23, 128 15.5 -> 19.8 (the per-plane drains cost what the shorter tiles save).
bool int24_tiles(const PackedShape& s, DType dtype) {
  return dtype == DType::F32 && s.padded_group() % Int24Flavour::kTileK == 0;
}

// GCC's AMX intrinsics paste tile numbers into the assembly text: they must be literals. C tile
// (i, j) is tmm(2i + j): A tile i (tmm4 + i, rows 16i ..) times B tile j (tmm6 + j, row block j).

// C(0, j) += A0 B_j and, with two_a, C(1, j) += A1 B_j, for j < (pair ? 2 : 1); the B tiles are
// loaded by the caller; A0 is at a_tile, A1 16 rows further.
template <bool kInt8>
inline void multiply_a_tiles(const void* a_tile, int64_t a_stride, bool pair, bool two_a) {
  _tile_loadd(4, a_tile, a_stride);
  if constexpr (kInt8) {
    _tile_dpbsud(0, 4, 6);
    if (pair) _tile_dpbsud(1, 4, 7);
  } else {
    _tile_dpbf16ps(0, 4, 6);
    if (pair) _tile_dpbf16ps(1, 4, 7);
  }
  if (!two_a) return;
  _tile_loadd(5, static_cast<const uint8_t*>(a_tile) + kTileRows * a_stride, a_stride);
  if constexpr (kInt8) {
    _tile_dpbsud(2, 5, 6);
    if (pair) _tile_dpbsud(3, 5, 7);
  } else {
    _tile_dpbf16ps(2, 5, 6);
    if (pair) _tile_dpbf16ps(3, 5, 7);
  }
}

inline void zero_c_tiles() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Stores each live C tile (i, j) into c and calls drain(i, j) on it.
template <typename Drain>
inline void drain_c_tiles(float (&c)[kTileRows][kBlockN], bool pair, bool two_a, Drain&& drain) {
  _tile_stored(0, c, kBlockN * 4);
  drain(0, 0);
  if (pair) {
    _tile_stored(1, c, kBlockN * 4);
    drain(0, 1);
  }
  if (!two_a) return;
  _tile_stored(2, c, kBlockN * 4);
  drain(1, 0);
  if (pair) {
    _tile_stored(3, c, kBlockN * 4);
    drain(1, 1);
  }
}

// ---- K chunks: x stays in L2 while the row blocks pass over it ----------------------------------
// Every row-block pair reads all of x's tile rows. When x (M rows of K, as the tiles read it) is
// larger than L2, it would come from L3 once per row-block pair: M = 128 bf16 rows of K = 11008
// are 2.8 MB against a 2 MB L2. So K is taken in chunks of whole groups, at most kChunkBytes of x
// each, and every row block of the thread's range passes over one chunk before the next; the
// output rows then live in fp32 partial sums between chunks (M x 16 floats per row block). Those
// are bounded by kMaxPartialBytes per thread: beyond it (thousands of rows) every chunk would
// stream more partial sums than the x it saves, so K is taken whole, as without chunks.
constexpr int64_t kChunkBytes = int64_t(1) << 20;
constexpr int64_t kMaxPartialBytes = int64_t(16) << 20;

// Bytes of the fp32 partial sums that carry M rows of `blocks` row blocks from chunk to chunk
// (PartialSums across chunks: whole 32-row passes).
int64_t partial_sum_bytes(int64_t M, int64_t blocks) {
  return round_up(M, kPassRows) * blocks * kBlockN * int64_t(sizeof(float));
}

struct KChunks {
  int64_t groups_per_chunk, count;
};
KChunks k_chunks(const PackedShape& s, int64_t M, int64_t x_bytes_per_column, int64_t blocks) {
  const int64_t fit = kChunkBytes / (x_bytes_per_column * s.padded_group());  // whole groups
  const int64_t count = fit == 0 ? 1 : ceil_div(s.groups(), fit);
  // one chunk: x fits, or not even one group of it does (chunks would only add partial sums)
  if (count == 1 || partial_sum_bytes(M, blocks) > kMaxPartialBytes)
    return {s.groups(), 1};
  return {ceil_div(s.groups(), count), count};  // spread evenly; the last may be a little shorter
}

// The fp32 partial sums of the output rows, [row block][row][16]. With one chunk a pass's rows
// are finished before the next pass starts, so one row-block pair's 32 rows are enough.
class PartialSums {
 public:
  PartialSums(int64_t M, int64_t blocks, bool across_chunks)
      : rows_(across_chunks ? round_up(M, kPassRows) : kPassRows),  // whole passes
        across_chunks_(across_chunks),
        sums_(aligned_array<float>(across_chunks ? partial_sum_bytes(M, blocks) / int64_t(sizeof(float))
                                                 : 2 * rows_ * kBlockN)) {}
  // row m0 of row block `block` (counted from the start of the thread's range)
  float* rows(int64_t block, int64_t m0) {
    return sums_.get() + ((across_chunks_ ? block : block & 1) * rows_ + (across_chunks_ ? m0 : 0)) * kBlockN;
  }
  int64_t stride_bytes() const { return kBlockN * 4; }

 private:
  int64_t rows_;
  bool across_chunks_;
  AlignedArray<float> sums_;
};

template <typename Flavour>
void tiled_linear(const Flavour& f, int64_t M, const uint8_t* packed, const PackedShape& s,
                  const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
                  int64_t block_end) {
  constexpr int64_t kTileK = Flavour::kTileK;
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const int64_t words = s.words_per_group(), tiles_per_group = Gp / kTileK;
  const int64_t record_bytes = s.group_record_bytes(), block_bytes = s.row_block_bytes();
  const int64_t a_stride = Kp * Flavour::kElemBytes;
  const int64_t b_tile_words = tiles_per_group * kTileRows * kBlockN;
  const KChunks chunks = k_chunks(s, M, round_up(M, kTileRows) * Flavour::kElemBytes * f.planes,
                                 block_end - block_begin);
  PartialSums sums(M, block_end - block_begin, chunks.count > 1);
  auto b_tiles = aligned_array<uint32_t>(2 * b_tile_words);  // one set per row block of the pair
  alignas(64) float c[kTileRows][kBlockN];  // a drained C tile (fp32 or int32)

  _tile_loadconfig(tile_config_for(M));
  for (int64_t g0 = 0; g0 < groups; g0 += chunks.groups_per_chunk) {
    const int64_t g1 = std::min(groups, g0 + chunks.groups_per_chunk);
    for (int64_t b = block_begin; b < block_end; b += 2) {
      const bool pair = b + 1 < block_end;  // odd leftover block: B tile 1 stays unused
      for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
        const int64_t rows = std::min(kPassRows, M - m0);
        const bool two_a = rows > kTileRows;
        float* out[2] = {sums.rows(b - block_begin, m0), pair ? sums.rows(b + 1 - block_begin, m0) : nullptr};
        if (g0 == 0)
          for (int j = 0; j < (pair ? 2 : 1); ++j) std::fill(out[j], out[j] + kPassRows * kBlockN, 0.f);
        const uint8_t* rec0 = packed + b * block_bytes + g0 * record_bytes;
        for (int64_t g = g0; g < g1; ++g, rec0 += record_bytes) {
          const uint8_t* rec1 = rec0 + block_bytes;
          Flavour::build_b_tiles(reinterpret_cast<const uint32_t*>(rec0), words, b_tiles.get());
          if (pair) Flavour::build_b_tiles(reinterpret_cast<const uint32_t*>(rec1), words, b_tiles.get() + b_tile_words);
          // one pass over the group's tiles with every plane of x into the same C tiles, or with
          // kDrainPerPlane one pass and one drain per plane (their digits weigh differently)
          const int passes = Flavour::kDrainPerPlane ? f.planes : 1;
          for (int pass = 0; pass < passes; ++pass) {
            const int first_plane = Flavour::kDrainPerPlane ? pass : 0;
            const int end_plane = Flavour::kDrainPerPlane ? pass + 1 : f.planes;
            zero_c_tiles();
            for (int64_t t = 0; t < tiles_per_group; ++t) {
              const uint32_t* b_tile = b_tiles.get() + t * kTileRows * kBlockN;
              _tile_loadd(6, b_tile, kBlockN * 4);
              if (pair) _tile_loadd(7, b_tile + b_tile_words, kBlockN * 4);
              for (int p = first_plane; p < end_plane; ++p)
                multiply_a_tiles<Flavour::kInt8>(f.a_tile(p, m0 * Kp + g * Gp + t * kTileK), a_stride,
                                                 pair, two_a);
            }
            // C tile (i, j) -> rows 16i.. of row block j's fp32 accumulators. The group's scales
            // are read at each drain: read once per group before the passes, fp32 x at M = 16 ran
            // slower (4096x11008, hot: 2.41-2.43 -> 2.68-2.89 ms).
            drain_c_tiles(c, pair, two_a, [&](int i, int j) {
              f.drain_tile(c, GroupParams(j ? rec1 : rec0, s), std::min(kTileRows, rows - i * kTileRows), m0 + i * kTileRows,
                           g, groups, out[j] + i * kTileRows * kBlockN, pass);
            });
          }
        }
        if (g1 < groups) continue;
        for (int64_t j = 0; j < (pair ? 2 : 1); ++j)
          for (int64_t r = 0; r < rows; ++r) {
            float* o = out[j] + r * kBlockN;
            f.finish_row(m0 + r, o);
            store_row(y, dtype, (m0 + r) * ldy + (b + j) * kBlockN, o, bias, (b + j) * kBlockN, s.N);
          }
      }
    }
  }
  _tile_release();
}

// ---- bf16 x at large M: dequantized B tiles, one drain -------------------------------------------
// With many rows of bf16 x, draining C tiles once per group costs more than the tile products.
// From kDequantRows rows on, the B tiles of a row-block pair are dequantized once to bf16
// ((q - z) * s rounded to bf16: the rounding a bf16 dense layer's weights have) per K chunk, and
// C accumulates over the whole chunk; between chunks the C tiles go to the partial sums and back.
constexpr int64_t kDequantRows = kBf16DequantizedMinRows;

// B tiles of groups [g0, g1) of one row block: tile t covers columns 32t .. 32t+31 of the range;
// row r holds the bf16 pair (w[2r], w[2r+1]) of the tile's columns for each of the 16 output rows.
void build_dequantized_b_tiles(const uint8_t* block, const PackedShape& s, int64_t g0, int64_t g1,
                               uint32_t* tiles) {
  const int64_t words = s.words_per_group(), record_bytes = s.group_record_bytes();
  // pairs (2p, 2p+1) arrive as [w_2p for 16 lanes | w_2p+1 for 16 lanes]; interleave per lane
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  uint32_t* row = tiles;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* rec = block + g * record_bytes;
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(rec);
    const GroupParams params(rec, s);
    const __m512 scale = params.scale;
    const __m512 zs = _mm512_mul_ps(params.zero, scale);  // (q - z) s = q s - z s
    for (int64_t w = 0; w < words; ++w, row += 4 * kBlockN) {
      __builtin_prefetch(reinterpret_cast<const char*>(codes + w * kBlockN) + kPrefetchBytes, 0, 3);
      const __m512i v = Simd::load_words(codes + w * kBlockN);
      auto pair = [&](auto even, auto odd, int p) {
        const __m512 lo = _mm512_fmsub_ps(Simd::codes_to_float<decltype(even)::value>(v), scale, zs);
        const __m512 hi = _mm512_fmsub_ps(Simd::codes_to_float<decltype(odd)::value>(v), scale, zs);
        const __m512i packed_pair = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
        _mm512_store_si512(row + p * kBlockN, _mm512_permutexvar_epi16(interleave, packed_pair));
      };
      pair(std::integral_constant<int, nibble_shift(0)>{}, std::integral_constant<int, nibble_shift(1)>{}, 0);
      pair(std::integral_constant<int, nibble_shift(2)>{}, std::integral_constant<int, nibble_shift(3)>{}, 1);
      pair(std::integral_constant<int, nibble_shift(4)>{}, std::integral_constant<int, nibble_shift(5)>{}, 2);
      pair(std::integral_constant<int, nibble_shift(6)>{}, std::integral_constant<int, nibble_shift(7)>{}, 3);
    }
  }
}

// C tile (i, j) <-> rows 16i.. of row block j's partial sums, stride 64 bytes (literal tile numbers)
inline void load_c_tiles(float* const (&out)[2], int64_t stride, bool pair, bool two_a) {
  _tile_loadd(0, out[0], stride);
  if (pair) _tile_loadd(1, out[1], stride);
  if (!two_a) return;
  _tile_loadd(2, out[0] + kTileRows * kBlockN, stride);
  if (pair) _tile_loadd(3, out[1] + kTileRows * kBlockN, stride);
}
inline void store_c_tiles(float* const (&out)[2], int64_t stride, bool pair, bool two_a) {
  _tile_stored(0, out[0], stride);
  if (pair) _tile_stored(1, out[1], stride);
  if (!two_a) return;
  _tile_stored(2, out[0] + kTileRows * kBlockN, stride);
  if (pair) _tile_stored(3, out[1] + kTileRows * kBlockN, stride);
}

void dequantized_linear(const Activations& a, const uint8_t* packed, const PackedShape& s,
                        const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
                        int64_t block_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  const int64_t block_bytes = s.row_block_bytes();
  const KChunks chunks = k_chunks(s, a.M, round_up(a.M, kTileRows) * 2, block_end - block_begin);
  const int64_t chunk_tile_words = chunks.groups_per_chunk * Gp / Bf16Flavour::kTileK * kTileRows * kBlockN;
  PartialSums sums(a.M, block_end - block_begin, chunks.count > 1);
  auto b_tiles = aligned_array<uint32_t>(2 * chunk_tile_words);
  alignas(64) float c[kTileRows][kBlockN];
  _tile_loadconfig(tile_config_for(a.M));
  for (int64_t g0 = 0; g0 < groups; g0 += chunks.groups_per_chunk) {
    const int64_t g1 = std::min(groups, g0 + chunks.groups_per_chunk);
    const int64_t tiles = (g1 - g0) * Gp / Bf16Flavour::kTileK;
    for (int64_t b = block_begin; b < block_end; b += 2) {
      const bool pair = b + 1 < block_end;  // odd leftover block: B tile 1 stays unused
      build_dequantized_b_tiles(packed + b * block_bytes, s, g0, g1, b_tiles.get());
      if (pair) build_dequantized_b_tiles(packed + (b + 1) * block_bytes, s, g0, g1, b_tiles.get() + chunk_tile_words);
      for (int64_t m0 = 0; m0 < a.M; m0 += kPassRows) {
        const int64_t rows = std::min(kPassRows, a.M - m0);
        const bool two_a = rows > kTileRows;
        float* const out[2] = {sums.rows(b - block_begin, m0),
                               pair ? sums.rows(b + 1 - block_begin, m0) : nullptr};
        if (g0 == 0) zero_c_tiles();
        else load_c_tiles(out, sums.stride_bytes(), pair, two_a);
        for (int64_t t = 0; t < tiles; ++t) {
          const uint32_t* b_tile = b_tiles.get() + t * kTileRows * kBlockN;
          _tile_loadd(6, b_tile, kBlockN * 4);
          if (pair) _tile_loadd(7, b_tile + chunk_tile_words, kBlockN * 4);
          multiply_a_tiles<false>(a.x_bf16 + m0 * Kp + g0 * Gp + t * Bf16Flavour::kTileK, Kp * 2,
                                  pair, two_a);
        }
        if (g1 < groups) {
          store_c_tiles(out, sums.stride_bytes(), pair, two_a);
          continue;
        }
        // C tile (i, j): rows m0 + 16i .. of row block b + j, straight to y
        drain_c_tiles(c, pair, two_a, [&](int i, int j) {
          for (int64_t r = 0; r < kTileRows && i * kTileRows + r < rows; ++r)
            store_row(y, dtype, (m0 + i * kTileRows + r) * ldy + (b + j) * kBlockN, c[r], bias,
                      (b + j) * kBlockN, s.N);
        });
      }
    }
  }
  _tile_release();
}

}  // namespace

ActivationSizes activation_sizes(const PackedShape& s, int64_t M, DType dtype) {
  if (!usable(s, M, dtype)) return avx512::activation_sizes(s, M, dtype);
  if (int24_tiles(s, dtype))  // xint, whole 16-row tiles per plane; its sums and scales take `sums`
    return {0, M * s.groups(), 0, round_up(M, kTileRows) * s.padded_k(), Int24Grid::kPlanes};
  return {0, M * s.groups(), planes_for(dtype) * round_up(M, kTileRows) * s.padded_k()};
}

void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end) {
  if (!usable(s, a.M, dtype)) {
    avx512::prepare_activations(x, dtype, ldx, s, a, m_begin, m_end);
    return;
  }
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  if (int24_tiles(s, dtype)) {
    avx512::prepare_x_int24(x, dtype, ldx, s, a.xint, m_begin, m_end);
    // A row with an Inf or a NaN has NaN scales (which make its outputs NaN) and no codes: give it
    // zero codes and sums, so the tiles never read what the buffer held before.
    for (int64_t m = m_begin; m < m_end; ++m) {
      if (!std::isnan(a.xint.scale[m * groups])) continue;
      for (int p = 0; p < Int24Grid::kPlanes; ++p) {
        std::memset(a.xint.plane(p) + m * Kp, 0, size_t(Kp));
        std::fill(a.xint.plane_sums(p) + m * groups, a.xint.plane_sums(p) + (m + 1) * groups, 0);
      }
    }
    return;
  }
  const int64_t plane = round_up(a.M, kTileRows) * Kp;  // elements per bf16 plane
  const int planes = planes_for(dtype);
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
      uint16_t* dst = a.x_bf16 + m * Kp + g * Gp;
      __m512 sum = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= len; i += 16) {
        const __m512 v = Simd::load_x(x, dtype, src + i);
        sum = _mm512_add_ps(sum, v);
        split_bf16(v, planes, dst + i, dst + plane + i, dst + 2 * plane + i);
      }
      float tail = 0.f;
      for (; i < Gp; ++i) {
        float rest = i < len ? load_as_float(x, dtype, src + i) : 0.f;
        tail += rest;
        for (int p = 0; p < planes; ++p) {
          const uint32_t bits = float_to_bits(rest) & (p + 1 < planes ? 0xFFFF0000u : 0xFFFFFFFFu);
          dst[p * plane + i] = uint16_t(bits >> 16);
          rest -= bits_to_float(bits);
        }
      }
      a.xsum[m * groups + g] = _mm512_reduce_add_ps(sum) + tail;
    }
  }
}

void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
            void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  if (!usable(s, a.M, dtype)) {
    avx512::linear(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  if (dtype == DType::BF16 && a.M >= kDequantRows) {
    dequantized_linear(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  if (int24_tiles(s, dtype)) {
    tiled_linear(Int24Flavour{a.xint}, a.M, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  const Bf16Flavour f{a, planes_for(dtype), round_up(a.M, kTileRows) * s.padded_k()};
  tiled_linear(f, a.M, packed, s, bias, y, dtype, ldy, block_begin, block_end);
}

// W4A8 shares the AVX-512 path's int8 activation layout; groups of whole 64-column tiles run on
// AMX int8 tiles, the rest on AVX-512 VNNI.
void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  avx512::prepare_activations_a8(x, dtype, ldx, s, a, m_begin, m_end);
}

void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end) {
  if (!tiles_fit<Int8Flavour>(s, a.M, kMinRowsA8)) {
    avx512::linear_a8(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
    return;
  }
  tiled_linear(Int8Flavour{a}, a.M, packed, s, bias, y, dtype, ldy, block_begin, block_end);
}

void dequantize_transposed(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,
                           DType dtype, int64_t block_begin, int64_t block_end) {
  avx512::dequantize_transposed(packed, s, wt, ldw, dtype, block_begin, block_end);
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
