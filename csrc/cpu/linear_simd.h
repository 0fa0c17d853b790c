// The vector fused int4 linear on the CPU prepacked layout (format.h), written once over a SIMD
// traits type and instantiated by each ISA's translation unit (linear_avx2.cpp, linear_avx512.cpp),
// which defines `Simd` and includes this file inside its own namespace (after act_quant.h,
// gemm_blocking.h and store_row.h). Only include it from such a file: everything here is compiled
// with that file's -m flags.
//
// Simd provides: V (fp32 vector), VI (int vector), kLanes (8 or 16), kMicroRows (rows of the GEMM
// microkernel), zero(), load(p), store(p, v) (aligned), loadu(p), storeu(p, v), broadcast(p),
// fmadd(a, b, c) = a*b+c, fnmadd(a, b, c) = c-a*b, fmsub(a, b, c) = a*b-c, mul, add, hsum(v),
// load_words(p) (kLanes uint32), codes_to_float<kShift>(words) = float((words >> kShift) & 0xF),
// load_x(p, dtype, i) (kLanes values of x as fp32), store_y16(y, dtype, offset, out) (16 aligned
// fp32 values written to y as dtype), kInt24MaxRows (xint_planes), high_bytes and low_bytes
// (act_quant.h's ScalarDigits per lane, for the GEMV's fixed-point x). For W4A8: zero_i(),
// low_nibbles(w), high_nibbles(w) (bytes of codes), bcast4(p) (4 int8 in every lane), kPairSums:
// false with dot_u8s8(acc, u8, s8) and dot_u8s8_in_place (4-way byte dot product into int32
// lanes), true with pair_sums(u8, s8) (int16 sums of byte pairs), add_pairs and widen_pairs(acc,
// pairs) (into int32 lanes), add_pair_sums_4x2 and load_sums / store_sums (the W4A8 GEMM's step
// and its int32 sums in memory); to_float(vi), and the quantizer's max_abs_bits, hmax_u32, quantize,
// add_i, hsum_i, store_a8_codes; the W4A8 GEMM's kA8Rows x kA8Blocks microkernel and
// kA8GemmMinRows, the rows from which it runs.
//
// Two paths, chosen by M (gemm_min_rows: a crossover measured per ISA and dtype of x):
//  * GEMV, memory-bound at small M: the weight stream is read once per kGemvRows rows of x (at
//    larger M each row block's weights stay in cache while every row of x passes them).
//    One word vector holds 8 columns of kLanes rows. x runs as fixed point (Activations::xint) on
//    W4A8's integer kernel: masks give the code bytes of 4 columns per lane, which meet 4 bytes of
//    x in byte dot products; bf16 x as int16 (two int8 planes, two dot products per code byte),
//    fp32 and fp16 x as int24 (three) for up to kInt24MaxRows rows. Scale and zero point are
//    applied once per group: y += s * (acc - z * sum(x_group)). On AVX-512 bf16 x takes 4
//    vpdpbusd per 128 codes where bf16 dot products took 8 vdpbf16ps (2.5 cycles each here,
//    against 0.67): M = 1, L2-resident 2048x1024, one thread 68 -> 46 us; on AVX2 (vpmaddubsw,
//    int16 pair sums widened every 4 words) against shift, mask and convert 114 -> 64 us; fp32 x
//    on int24 against the float GEMV: AVX-512 75 (GF(2)-affine unit floats) -> 44 us, AVX2 117
//    -> 77 us.
//    The float GEMV (fp32 and fp16 x with more rows on AVX2, and rows with an Inf or a NaN)
//    shifts, masks and converts each column to fp32 and multiplies it into per-group accumulators.
//  * GEMM (from gemm_min_rows: int8 records, AVX2 with more rows): a tile of kTileK columns x 16
//    rows is dequantized to fp32 in an L1-resident buffer, then a kMicroRows x 16 register-blocked
//    FMA microkernel sweeps all rows of x. x is laid out in panels of kMicroRows rows ([Kp][kMicroRows] each), so the microkernel's
//    broadcasts walk one contiguous stream instead of kMicroRows rows 4 KiB-aliased in L1.

constexpr int64_t kVecs = kBlockN / Simd::kLanes;  // vectors per 16-row block
constexpr int64_t kGemvRows = 4;                   // rows of x sharing one pass over the weights
constexpr int64_t kTileK = 256;                    // columns dequantized per tile (16 KiB fp32)
constexpr int64_t kRowChunk = 192;                 // rows of x per accumulator tile (12 KiB)
constexpr int64_t kPanel = Simd::kMicroRows;       // rows of x per GEMM panel
static_assert(kRowChunk % kPanel == 0, "row chunks must hold whole panels");

// The rows of x from which the GEMM takes over from the GEMV, measured per ISA (the Simd traits;
// docs/benchmarks.md, "GEMV or GEMM"): the GEMV on fixed-point x (byte dot products) against
// fp32 FMAs on dequantized tiles. Int8 records have only the float GEMV, which the GEMM beats from
// 8 rows.
constexpr int64_t kGemmMinRowsInt8 = 8;
inline int64_t gemm_min_rows(const PackedShape& s, DType dtype) {
  if (s.bits == 8) return kGemmMinRowsInt8;
  if (const int64_t forced = forced_gemm_rows(); forced > 0) return forced;
  return dtype == DType::BF16 ? Simd::kGemmMinRowsBf16 : Simd::kGemmMinRowsFloat;
}
inline bool use_gemm(const PackedShape& s, int64_t M, DType dtype) {
  return M >= gemm_min_rows(s, dtype);
}

// The GEMV streams each row block once; the hardware prefetcher alone reached ~12 GB/s of the
// ~23 GB/s this machine reads from DRAM with two cores, a software prefetch 4 KiB ahead (one per
// 64-byte word) ~18.5 GB/s. Measured 2-32 KiB: 3-8 KiB is the plateau. Into L2 (prefetcht1), not
// L1: the misses in flight are then bounded by L2's queue rather than L1's few fill buffers
// (4096x11008 and 11008x4096 cold M = 1, three alternating runs each: W4A8 1.21 -> 1.13 ms,
// W4A16 1.39 -> 1.35 ms).
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch_ahead(const uint32_t* word) {
  __builtin_prefetch(reinterpret_cast<const char*>(word) + kPrefetchBytes, 0, 2);
}

// Loop-invariant sizes of one problem, computed once (PackedShape recomputes them by division).
struct Geometry {
  int64_t Kp, Gp, groups, words, record_bytes, block_bytes, params_offset;
  DType scale_dtype;
  explicit Geometry(const PackedShape& s)
      : Kp(s.padded_k()), Gp(s.padded_group()), groups(s.groups()), words(s.words_per_group()),
        record_bytes(s.group_record_bytes()), block_bytes(s.row_block_bytes()),
        params_offset(s.params_offset()), scale_dtype(s.scale_dtype) {}
  // kLanes scales / zero points of a record, from lane `lane`, as fp32
  typename Simd::V scales(const uint8_t* rec, int64_t lane) const { return param(rec, scale_index(lane)); }
  typename Simd::V zeros(const uint8_t* rec, int64_t lane) const { return param(rec, zero_index(lane)); }

 private:
  typename Simd::V param(const uint8_t* rec, int64_t index) const {
    return Simd::load_x(rec + params_offset, scale_dtype, index);
  }
};

// Applies fn(i, column_i_as_fp32[kVecs]) for the 8 columns of word w of a group record, with the
// shift amounts as compile-time constants.
template <typename Fn, int... I>
inline void for_each_column_impl(const uint32_t* words, Fn&& fn, std::integer_sequence<int, I...>) {
  typename Simd::VI v[kVecs];
  for (int64_t h = 0; h < kVecs; ++h) v[h] = Simd::load_words(words + h * Simd::kLanes);
  (
      [&] {
        typename Simd::V q[kVecs];
        for (int64_t h = 0; h < kVecs; ++h) q[h] = Simd::template codes_to_float<nibble_shift(I)>(v[h]);
        fn(I, q);
      }(),
      ...);
}
template <typename Fn>
inline void for_each_column(const uint32_t* words, Fn&& fn) {
  for_each_column_impl(words, fn, std::make_integer_sequence<int, kCodesPerWord>{});
}

// The same for the 8 columns of chunk w of an int8 record (format.h: 16 bytes per column), each
// column's bytes widened to fp32 lanes.
template <typename Fn, int... I>
inline void for_each_byte_column_impl(const uint8_t* chunk, Fn&& fn, std::integer_sequence<int, I...>) {
  (
      [&] {
        typename Simd::V q[kVecs];
        for (int64_t h = 0; h < kVecs; ++h) q[h] = Simd::bytes_to_float(chunk + I * kBlockN + h * Simd::kLanes);
        fn(I, q);
      }(),
      ...);
}

// Calls fn(w, i, column_as_fp32[kVecs]) for every column w * kCodesPerWord + i (i = 0..7, a
// compile-time constant) of a group record's codes, int4 (kBits = 4) or int8, prefetching the
// weight stream kPrefetchBytes ahead (one prefetch per 64 bytes).
template <int kBits, typename Fn>
inline void for_each_record_column(const uint8_t* rec, const Geometry& geo, Fn&& fn) {
  constexpr int64_t kChunkBytes = kBlockN * kCodesPerWord * kBits / 8;  // 8 columns: 64 or 128
  for (int64_t w = 0; w < geo.words; ++w) {
    const uint8_t* chunk = rec + w * kChunkBytes;
    for (int64_t line = 0; line < kChunkBytes; line += 64)
      prefetch_ahead(reinterpret_cast<const uint32_t*>(chunk + line));
    auto column = [&](int i, const typename Simd::V* q) { fn(w, i, q); };
    if constexpr (kBits == 4)
      for_each_column(reinterpret_cast<const uint32_t*>(chunk), column);
    else
      for_each_byte_column_impl(chunk, column, std::make_integer_sequence<int, kCodesPerWord>{});
  }
}

inline void store_row16(void* y, DType dtype, int64_t offset, const float* vals, const float* bias,
                        int64_t n0, int64_t N) {
  store_row16_as<Simd>(y, dtype, offset, vals, bias, n0, N);
}

// ---- GEMV ---------------------------------------------------------------------------------------
// Rows [m0, m0 + R) of y for row block b, on float x: each column's codes as fp32 (shift, mask,
// convert) in FMAs, acc = sum x q. It takes what the fixed-point GEMV does not (xint_planes): fp32
// and fp16 x with more rows than the ISA's kInt24MaxRows, and rows with an Inf or a NaN. Each
// accumulator is split kSplit ways (by column) so consecutive FMAs do not wait on each other's
// latency when R is small (8 chains cover the FMA latency at two FMAs per cycle).
template <int R, int kBits = 4>
void gemv_rows(const Activations& a, int64_t m0, const uint8_t* packed, const Geometry& geo,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t b, int64_t N) {
  constexpr int kSplit = std::max<int>(1, std::min<int>(4, 8 / (R * kVecs)));
  alignas(64) float out[R][kBlockN] = {};
  const uint8_t* rec = packed + b * geo.block_bytes;
  for (int64_t g = 0; g < geo.groups; ++g, rec += geo.record_bytes) {
    const float* xg[R];
    for (int r = 0; r < R; ++r) xg[r] = a.x + (m0 + r) * geo.Kp + g * geo.Gp;
    typename Simd::V acc[R][kSplit][kVecs];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kSplit; ++c)
        for (int64_t h = 0; h < kVecs; ++h) acc[r][c][h] = Simd::zero();
    for_each_record_column<kBits>(rec, geo, [&](int64_t w, int i, const typename Simd::V* q) {
      for (int r = 0; r < R; ++r) {
        const typename Simd::V xb = Simd::broadcast(xg[r] + w * kCodesPerWord + i);
        for (int64_t h = 0; h < kVecs; ++h)
          acc[r][i % kSplit][h] = Simd::fmadd(xb, q[h], acc[r][i % kSplit][h]);
      }
    });
    typename Simd::V scale[kVecs], zero[kVecs];
    for (int64_t h = 0; h < kVecs; ++h) {
      scale[h] = geo.scales(rec, h * Simd::kLanes);
      zero[h] = geo.zeros(rec, h * Simd::kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const typename Simd::V xs = Simd::broadcast(a.xsum + (m0 + r) * geo.groups + g);
      for (int64_t h = 0; h < kVecs; ++h) {
        typename Simd::V sum = acc[r][0][h];
        for (int c = 1; c < kSplit; ++c) sum = Simd::add(sum, acc[r][c][h]);
        const typename Simd::V centred = Simd::fnmadd(zero[h], xs, sum);  // sum x q - z sum x
        float* o = out[r] + h * Simd::kLanes;
        Simd::store(o, Simd::fmadd(scale[h], centred, Simd::load(o)));
      }
    }
  }
  for (int r = 0; r < R; ++r) store_row16(y, dtype, (m0 + r) * ldy + b * kBlockN, out[r], bias, b * kBlockN, N);
}

// Calls fn(std::integral_constant<int, R>, m0) over rows of x in chunks of up to kGemvRows.
template <typename Fn>
void for_row_chunks(int64_t M, Fn&& fn) {
  int64_t m = 0;
  for (; m + kGemvRows <= M; m += kGemvRows) fn(std::integral_constant<int, kGemvRows>{}, m);
  switch (M - m) {
    case 3: fn(std::integral_constant<int, 3>{}, m); break;
    case 2: fn(std::integral_constant<int, 2>{}, m); break;
    case 1: fn(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// ---- GEMM ---------------------------------------------------------------------------------------
// Dequantizes groups [g0, g1) of row block b into tile[k][16] fp32 (k over padded columns).
template <int kBits>
void dequantize_tile(const uint8_t* packed, const Geometry& geo, int64_t b, int64_t g0, int64_t g1,
                     float* tile) {
  const uint8_t* rec = packed + b * geo.block_bytes + g0 * geo.record_bytes;
  for (int64_t g = g0; g < g1; ++g, rec += geo.record_bytes) {
    typename Simd::V s[kVecs], zs[kVecs];
    for (int64_t h = 0; h < kVecs; ++h) {  // (q - z) * s = q * s - z * s: one FMA per code
      s[h] = geo.scales(rec, h * Simd::kLanes);
      zs[h] = Simd::mul(geo.zeros(rec, h * Simd::kLanes), s[h]);
    }
    float* dst = tile + (g - g0) * geo.Gp * kBlockN;
    for_each_record_column<kBits>(rec, geo, [&](int64_t w, int i, const typename Simd::V* q) {
      float* row = dst + (w * kCodesPerWord + i) * kBlockN;
      for (int64_t h = 0; h < kVecs; ++h)
        Simd::store(row + h * Simd::kLanes, Simd::fmsub(q[h], s[h], zs[h]));
    });
  }
}

// c[r][16] += x[r][0:kc] . tile[0:kc][16] for R rows of one x panel (x[k * kPanel + r]).
// The r and h loops must be unrolled before GCC's scalar replacement of the acc array: left to the
// later unroller, GCC 12 kept every accumulator in a register *and* stored it to the stack on each
// k (12 extra stores per 12 FMAs on AVX2, ~20% of the GEMM's time).
template <int R>
void microkernel(const float* x, const float* tile, int64_t kc, float* c) {
  typename Simd::V acc[R][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int64_t h = 0; h < kVecs; ++h) acc[r][h] = Simd::load(c + r * kBlockN + h * Simd::kLanes);
  for (int64_t k = 0; k < kc; ++k) {
    typename Simd::V wv[kVecs];
#pragma GCC unroll 4
    for (int64_t h = 0; h < kVecs; ++h) wv[h] = Simd::load(tile + k * kBlockN + h * Simd::kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const typename Simd::V xb = Simd::broadcast(x + k * kPanel + r);
#pragma GCC unroll 4
      for (int64_t h = 0; h < kVecs; ++h) acc[r][h] = Simd::fmadd(xb, wv[h], acc[r][h]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int64_t h = 0; h < kVecs; ++h) Simd::store(c + r * kBlockN + h * Simd::kLanes, acc[r][h]);
}

using MicroFn = void (*)(const float*, const float*, int64_t, float*);
template <int... R>
constexpr std::array<MicroFn, sizeof...(R) + 1> micro_table(std::integer_sequence<int, R...>) {
  return {nullptr, &microkernel<R + 1>...};
}
// kMicro[r] handles r rows, r = 1 .. kMicroRows
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, Simd::kMicroRows>{});

// Row blocks per pass over a row chunk of x: per tile of columns, each block's tile is dequantized
// in turn and every panel passes it, so x's window (kRowChunk rows x kTileK columns, 192 KiB of
// fp32) stays in L2 for the pass's later blocks and is read from L3 or DRAM once per pass, not
// once per block; the first block requests each next panel's window ahead (a new panel is a new
// page). The pass's sums: 96 KiB. AMD EPYC Zen 5, two threads, AVX2 path (torch limited to AVX2),
// bf16 x, median ratio to F.linear fp32 over 3 alternating rounds, one block per pass -> 8 (4):
// 11008x4096 M = 512 (x 22.5 MB of fp32 panels) 0.73 -> 1.12 (1.07), fp32 x 0.88 -> 1.09;
// 4096x11008 M = 128 1.54 -> 1.67, M = 32 2.0 -> 2.2. (The avx512 path's bf16 x, on its GEMV, is
// unaffected.)
constexpr int64_t kPassBlocks = 8;

template <int kBits>
void gemm(const Activations& a, const uint8_t* packed, const Geometry& geo, const float* bias,
          void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end, int64_t N) {
  const int64_t tile_groups = std::max<int64_t>(1, kTileK / geo.Gp);
  auto tile = aligned_array<float>(tile_groups * geo.Gp * kBlockN);
  const int64_t block_sums = std::min(round_up(a.M, kPanel), kRowChunk) * kBlockN;  // one block's
  auto acc = aligned_array<float>(kPassBlocks * block_sums);
  for (int64_t b0 = block_begin; b0 < block_end; b0 += kPassBlocks) {
    const int64_t nb = std::min(kPassBlocks, block_end - b0);
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, a.M - m0);
      std::fill(acc.get(), acc.get() + nb * block_sums, 0.f);
      for (int64_t g0 = 0; g0 < geo.groups; g0 += tile_groups) {
        const int64_t g1 = std::min(geo.groups, g0 + tile_groups);
        const int64_t kc = (g1 - g0) * geo.Gp;
        for (int64_t v = 0; v < nb; ++v) {
          dequantize_tile<kBits>(packed, geo, b0 + v, g0, g1, tile.get());
          for (int64_t r = 0; r < rows; r += kPanel) {
            const float* window = a.x + (m0 + r) * geo.Kp + g0 * geo.Gp * kPanel;  // of panel (m0 + r) / kPanel
            if (v == 0 && r + kPanel < rows) prefetch_window(window + geo.Kp * kPanel, kc * kPanel * 4);
            kMicro[std::min(kPanel, rows - r)](window, tile.get(), kc, acc.get() + v * block_sums + r * kBlockN);
          }
        }
      }
      for (int64_t v = 0; v < nb; ++v)
        for (int64_t r = 0; r < rows; ++r)
          store_row16(y, dtype, (m0 + r) * ldy + (b0 + v) * kBlockN, acc.get() + v * block_sums + r * kBlockN,
                      bias, (b0 + v) * kBlockN, N);
    }
  }
}

// ---- W4A8 ---------------------------------------------------------------------------------------
// Masking a word with 0x0F0F0F0F gives, per lane, the bytes of columns (0, 4, 1, 5); shifting it
// right by 4 first gives (2, 6, 3, 7). x is quantized with each word's 8 columns stored in that
// order, so two 4-byte broadcasts meet the two code vectors in integer dot products.
constexpr int a8_position(int column) { return 2 * (column % 4) + column / 4; }

// Rows [m0, m0 + R) of y for row block b, with x on Grid (act_quant.h): W4A8's int8 x, or
// Activations::xint's int16 / int24 x in two / three planes, whose dot products are combined per
// group as base-256 digits, (256 * (high plane's) + (next plane's)) * 256 + ... With few rows
// and planes each plane keeps two accumulators, for the low and the high nibbles of a word, so no
// vpdpbusd waits on another's latency (the chained form ran 1.1x slower; kNibbleSums below).
// With kPairSums (AVX2: no vpdpbusd, so vpmaddubsw gives int16 pair sums, vpmaddwd widens them),
// the pair sums of up to kWordsPerWiden words add up in int16 before one widening: each is at most
// 2 * 15 * 128 = 3840 in size, two per word (low and high nibbles), 4 words 30720 < 2^15.
// The W4A8 kernels take the traits as a template parameter S (always Simd) so that S::kPairSums's
// branches are dependent: `if constexpr` then discards the one whose functions this ISA's Simd
// lacks (AVX-512 has no pair_sums, AVX2 no dot_u8s8); with Simd named directly both must compile.
template <int R, typename Grid, typename S = Simd>
void gemv_rows_a8(const ActivationsA8& a, int64_t m0, const uint8_t* packed, const Geometry& geo,
                  const float* bias, void* y, DType dtype, int64_t ldy, int64_t b, int64_t N) {
  constexpr int P = Grid::kPlanes;
  constexpr bool kPairSums = S::kPairSums;
  constexpr int64_t kWordsPerWiden = kPairSums ? 4 : std::numeric_limits<int64_t>::max() / 2;
  // dot products into two accumulators per plane (low and high nibbles) where few chains would
  // otherwise wait on each other's latency; one where R * P chains are plenty (and two would not
  // fit the registers: 4 rows x 3 planes x 2 = 24 of 32 zmm)
  constexpr int kNibbleSums = kPairSums || R * P <= 8 ? 2 : 1;
  const int8_t* planes[P];
  const int32_t* plane_sums[P];
  for (int p = 0; p < P; ++p) {
    planes[p] = a.plane(p);
    plane_sums[p] = a.plane_sums(p);
  }
  alignas(64) float out[R][kBlockN] = {};
  const uint8_t* rec = packed + b * geo.block_bytes;
  for (int64_t g = 0; g < geo.groups; ++g, rec += geo.record_bytes) {
    const uint32_t* codes = reinterpret_cast<const uint32_t*>(rec);
    const int8_t* xg[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) xg[r][p] = planes[p] + (m0 + r) * geo.Kp + g * geo.Gp;
    typename Simd::VI acc[R][P][kNibbleSums][kVecs];  // [row][plane][low / high nibbles]
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        for (int n = 0; n < kNibbleSums; ++n)
          for (int64_t h = 0; h < kVecs; ++h) acc[r][p][n][h] = Simd::zero_i();
    for (int64_t w0 = 0; w0 < geo.words; w0 += kWordsPerWiden) {
      [[maybe_unused]] typename Simd::VI pairs[R][P][kVecs];
      if constexpr (kPairSums)
        for (int r = 0; r < R; ++r)
          for (int p = 0; p < P; ++p)
            for (int64_t h = 0; h < kVecs; ++h) pairs[r][p][h] = Simd::zero_i();
      for (int64_t w = w0; w < std::min(geo.words, w0 + kWordsPerWiden); ++w) {
        prefetch_ahead(codes + w * kBlockN);
        typename Simd::VI lo[kVecs], hi[kVecs];
        for (int64_t h = 0; h < kVecs; ++h) {
          const typename Simd::VI v = Simd::load_words(codes + w * kBlockN + h * Simd::kLanes);
          lo[h] = Simd::low_nibbles(v);
          hi[h] = Simd::high_nibbles(v);
        }
        for (int r = 0; r < R; ++r)
          for (int p = 0; p < P; ++p) {
            const typename Simd::VI x_lo = Simd::bcast4(xg[r][p] + w * kCodesPerWord);
            const typename Simd::VI x_hi = Simd::bcast4(xg[r][p] + w * kCodesPerWord + 4);
            for (int64_t h = 0; h < kVecs; ++h) {
              if constexpr (kPairSums) {
                pairs[r][p][h] = S::add_pairs(pairs[r][p][h], S::pair_sums(lo[h], x_lo));
                pairs[r][p][h] = S::add_pairs(pairs[r][p][h], S::pair_sums(hi[h], x_hi));
              } else {
                acc[r][p][0][h] = S::dot_u8s8(acc[r][p][0][h], lo[h], x_lo);
                acc[r][p][kNibbleSums - 1][h] = S::dot_u8s8(acc[r][p][kNibbleSums - 1][h], hi[h], x_hi);
              }
            }
          }
      }
      if constexpr (kPairSums)
        for (int r = 0; r < R; ++r)
          for (int p = 0; p < P; ++p)
            for (int64_t h = 0; h < kVecs; ++h) acc[r][p][0][h] = S::widen_pairs(acc[r][p][0][h], pairs[r][p][h]);
    }
    typename Simd::V scale[kVecs], zero[kVecs];
    for (int64_t h = 0; h < kVecs; ++h) {
      scale[h] = geo.scales(rec, h * Simd::kLanes);
      zero[h] = geo.zeros(rec, h * Simd::kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t m = m0 + r;
      const typename Simd::V x_scale = Simd::broadcast(a.scale + (Grid::kGroupScales ? m * geo.groups + g : m));
      for (int64_t h = 0; h < kVecs; ++h) {
        typename Simd::V centred = Simd::zero();  // sum xq q - z sum xq, over the planes
        for (int p = 0; p < P; ++p) {
          const typename Simd::V xs = Simd::broadcast_value(float(plane_sums[p][m * geo.groups + g]));
          typename Simd::VI sum = acc[r][p][0][h];
          if constexpr (kNibbleSums == 2) sum = Simd::add_i(sum, acc[r][p][1][h]);
          const typename Simd::V plane = Simd::fnmadd(zero[h], xs, Simd::to_float(sum));
          centred = p == 0 ? plane : Simd::fmadd(centred, Simd::broadcast_value(256.f), plane);
        }
        // centred * x_scale first: exact for the power-of-two scales of the int16 / int24 grids,
        // where scale * x_scale could underflow for tiny x
        float* o = out[r] + h * Simd::kLanes;
        Simd::store(o, Simd::fmadd(scale[h], Simd::mul(centred, x_scale), Simd::load(o)));
      }
    }
  }
  for (int r = 0; r < R; ++r) store_row16(y, dtype, (m0 + r) * ldy + b * kBlockN, out[r], bias, b * kBlockN, N);
}

template <typename S>
struct SimdDigits {  // act_quant.h's ScalarDigits, per int32 lane
  typename S::VI high(typename S::VI q) const { return S::high_bytes(q); }
  typename S::VI low(typename S::VI q, typename S::VI high) const { return S::low_bytes(q, high); }
};

// act_quant.h's row operations kLanes columns at a time (the scalar form costs ~6 ns per value:
// at M = 128, K = 11008 a third of the W4A8 GEMM's time). Same arithmetic, so the same codes: IEEE
// division by the row scale, round half to even, clamp to +-127.
struct SimdRowOps {
  static_assert(Simd::kLanes % kCodesPerWord == 0, "vector steps must cover whole words");
  static uint32_t amax_bits(const void* x, DType dtype, int64_t offset, int64_t K) {
    typename Simd::VI amax_v = Simd::zero_i();
    int64_t k = 0;
    for (; k + Simd::kLanes <= K; k += Simd::kLanes) amax_v = Simd::max_abs_bits(amax_v, Simd::load_x(x, dtype, offset + k));
    uint32_t amax = Simd::hmax_u32(amax_v);
    for (; k < K; ++k) amax = std::max(amax, abs_bits(load_as_float(x, dtype, offset + k)));
    return amax;
  }
  template <typename Grid, typename S = Simd>
  static int64_t quantize_words(const void* x, DType dtype, int64_t src, int64_t len, float scale,
                                int8_t* const* dst, int32_t* sums) {
    const typename S::V scale_v = S::broadcast_value(scale), max_v = S::broadcast_value(Grid::kMax);
    typename S::VI sum_v[Grid::kPlanes];
    for (auto& v : sum_v) v = S::zero_i();
    int64_t i = 0;
    for (; i + S::kLanes <= len; i += S::kLanes) {
      const typename S::VI q = S::quantize(S::load_x(x, dtype, src + i), scale_v, max_v);
      typename S::VI bytes[Grid::kPlanes];
      split_digits(q, bytes, SimdDigits<S>{});
      for (int p = 0; p < Grid::kPlanes; ++p) {
        sum_v[p] = S::add_i(sum_v[p], bytes[p]);
        S::store_a8_codes(dst[p] + i, bytes[p]);
      }
    }
    for (int p = 0; p < Grid::kPlanes; ++p) sums[p] += S::hsum_i(sum_v[p]);
    return i;
  }
};

void prepare_activations_a8_impl(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                                 const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  quantize_rows<SimdRowOps, Int8Grid>(x, dtype, ldx, s, a, m_begin, m_end, a8_position);
}

// ---- W4A8 GEMM (4-way byte dot products: vpdpbusd on AVX-512 VNNI, vpmaddubsw pairs on AVX2) -----
// From Simd::kA8GemmMinRows rows the GEMV's weight vectors would be decoded once per few rows;
// here the code bytes of kA8Blocks row blocks over a chunk of columns are laid out once in an L1
// tile that every row of x passes, and a microkernel of kA8Rows rows x kA8Blocks blocks keeps its
// accumulators in registers (AVX-512: 8 x 3, 24 int32 accumulators; per quad of columns 3 tile
// loads and 8 broadcasts of 4 x bytes feed 24 vpdpbusd of 64 multiply-adds each). Tile quad 2w
// holds word w's low nibbles (columns 0, 4, 1, 5 of each lane) and quad 2w + 1 its high nibbles
// (2, 6, 3, 7): x's bytes 4q .. 4q + 3 in the W4A8 order (a8_position) are exactly what meets quad
// q. Per group the int32 sums are drained into fp32: c += s (acc - z sum xq); the row's scale is
// applied once at the end. AVX2 (kPairSums) sums vpmaddubsw's int16 pairs over kA8QuadsPerWiden
// quads before widening them into int32 sums kept in memory (touched once per 8 quads): 4 x 2
// vectors of int16 pairs in registers, stepped by Simd::add_pair_sums_4x2, 143 G multiply-adds/s a
// core at M = 512 on Zen 5 where its GEMV reached ~100 and fp32 FMAs ~56.
constexpr int kA8Rows = Simd::kA8Rows;
constexpr int kA8Blocks = Simd::kA8Blocks;
constexpr int64_t kA8ChunkQuads = 128;  // 512 columns: 8 KiB of tile per row block
constexpr int64_t kA8TileStride = kA8Blocks * kBlockN;  // int32 per tile quad
constexpr int64_t kA8SegmentParams = 2 * kA8Blocks * kBlockN;  // floats: s and z of each block
// vpmaddubsw's int16 pair sums are at most 2 * 15 * 128 = 3840 in magnitude (codes 0..15, x
// bytes -128..127), so 8 quads of them stay under 2^15
constexpr int64_t kA8QuadsPerWiden = 8;

// The tile's nb row blocks in the thread's range (the microkernels take B = nb).
template <typename S = Simd>
void build_a8_tile(const uint8_t* packed, const Geometry& geo, int64_t b, int64_t nb,
                   const KSegment* segs, int nseg, int32_t* tile, float* params) {
  for (int64_t v = 0; v < nb; ++v) {
    for (int i = 0; i < nseg; ++i) {
      const KSegment& sg = segs[i];
      const uint8_t* rec = packed + (b + v) * geo.block_bytes + sg.group * geo.record_bytes;
      for (int64_t h = 0; h < kVecs; ++h) {
        S::store(params + i * kA8SegmentParams + v * kBlockN + h * S::kLanes, geo.scales(rec, h * S::kLanes));
        S::store(params + i * kA8SegmentParams + (kA8Blocks + v) * kBlockN + h * S::kLanes,
                 geo.zeros(rec, h * S::kLanes));
      }
      const uint32_t* codes = reinterpret_cast<const uint32_t*>(rec) + sg.in_group / 2 * kBlockN;
      int32_t* row = tile + sg.in_chunk * kA8TileStride + v * kBlockN;
      for (int64_t w = 0; w < sg.units / 2; ++w, row += 2 * kA8TileStride) {
        prefetch_ahead(codes + w * kBlockN);
        for (int64_t h = 0; h < kVecs; ++h) {
          const typename S::VI c = S::load_words(codes + w * kBlockN + h * S::kLanes);
          const typename S::VI lo = S::low_nibbles(c), hi = S::high_nibbles(c);
          std::memcpy(row + h * S::kLanes, &lo, sizeof(lo));  // one whole-vector store each
          std::memcpy(row + kA8TileStride + h * S::kLanes, &hi, sizeof(hi));
        }
      }
    }
  }
}

// acc[r][j] += the byte dot products of `quads` quads of columns for V vectors of the tile (fewer
// than kA8Blocks * kVecs in a thread's last tile): row r's x bytes at x + r * ldx, the tile at its
// quad. The r and j loops are unrolled before GCC's scalar replacement of acc (see microkernel),
// so acc stays in registers.
template <int R, typename S, int V>
inline void accumulate_a8(typename S::VI (&acc)[R][V], const int8_t* x, int64_t ldx,
                          const int32_t* tq, int64_t quads) {
  for (int64_t q = 0; q < quads; ++q, x += 4, tq += kA8TileStride) {
    typename S::VI w[V];
#pragma GCC unroll 4
    for (int j = 0; j < V; ++j) w[j] = S::load_words(reinterpret_cast<const uint32_t*>(tq + j * S::kLanes));
    const int8_t* xr = x;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r, xr += ldx) {
      const typename S::VI xb = S::bcast4(xr);
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) S::dot_u8s8_in_place(acc[r][j], w[j], xb);
    }
  }
}

// The same with int16 pair sums (kPairSums): R x V of them in registers, widened into the int32
// sums acc[r][j] (kLanes each) in memory every kA8QuadsPerWiden quads (16 ymm registers do not
// hold both sets).
template <int R, typename S, int V>
inline void accumulate_a8_pairs(int32_t (&acc)[R][V][S::kLanes], const int8_t* x, int64_t ldx,
                                const int32_t* tq, int64_t quads) {
  for (int64_t q0 = 0; q0 < quads; q0 += kA8QuadsPerWiden) {
    typename S::VI pairs[R][V];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) pairs[r][j] = S::zero_i();
    for (int64_t q = q0; q < std::min(quads, q0 + kA8QuadsPerWiden); ++q) {
      if constexpr (R == 4 && V == 2) {  // the full microkernel: in assembly
        S::add_pair_sums_4x2(pairs, tq + q * kA8TileStride, x + q * 4, ldx);
      } else {  // a thread's last rows
        typename S::VI w[V];
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) w[j] = S::load_words(reinterpret_cast<const uint32_t*>(tq + q * kA8TileStride + j * S::kLanes));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const typename S::VI xb = S::bcast4(x + r * ldx + q * 4);
#pragma GCC unroll 4
          for (int j = 0; j < V; ++j) pairs[r][j] = S::add_pairs(pairs[r][j], S::pair_sums(w[j], xb));
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) S::store_sums(acc[r][j], S::widen_pairs(S::load_sums(acc[r][j]), pairs[r][j]));
  }
}

// c[r][block][16] += s (sum xq q - z sum xq) over the chunk's segments for R rows of x and B row
// blocks (row r's bytes of the chunk at x + r * ldx, its group sums at xq_sum[r * groups + g]).
template <int R, typename S, int B>
void microkernel_a8(const int8_t* x, int64_t ldx, const int32_t* tile, const KSegment* segs, int nseg,
                    const float* params, const int32_t* xq_sum, int64_t groups, float* c) {
  constexpr int V = B * kVecs;
  typename S::VI acc[R][V];
  for (int i = 0; i < nseg; ++i, params += kA8SegmentParams) {
    const KSegment& sg = segs[i];
    const int8_t* xs0 = x + sg.in_chunk * 4;
    const int32_t* tq = tile + sg.in_chunk * kA8TileStride;
    if constexpr (S::kPairSums) {
      alignas(64) int32_t sums[R][V][S::kLanes];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) S::store_sums(sums[r][j], S::zero_i());
      accumulate_a8_pairs<R, S, V>(sums, xs0, ldx, tq, sg.units);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[r][j] = S::load_sums(sums[r][j]);
    } else {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < V; ++j) acc[r][j] = S::zero_i();
      accumulate_a8<R, S, V>(acc, xs0, ldx, tq, sg.units);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const typename S::V xs = S::broadcast_value(sg.in_group == 0 ? float(xq_sum[r * groups + sg.group]) : 0.f);
#pragma GCC unroll 4
      for (int j = 0; j < V; ++j) {  // vector j of a row's outputs, scales and zero points alike
        float* o = c + r * kA8Blocks * kBlockN + j * S::kLanes;
        const typename S::V centred =
            S::fnmadd(S::load(params + kA8Blocks * kBlockN + j * S::kLanes), xs, S::to_float(acc[r][j]));
        S::store(o, S::fmadd(S::load(params + j * S::kLanes), centred, S::load(o)));
      }
    }
  }
}

using MicroA8Fn = void (*)(const int8_t*, int64_t, const int32_t*, const KSegment*, int, const float*,
                           const int32_t*, int64_t, float*);
template <typename S, int B, int... R>
constexpr std::array<MicroA8Fn, sizeof...(R) + 1> micro_a8_table(std::integer_sequence<int, R...>) {
  return {nullptr, &microkernel_a8<R + 1, S, B>...};
}
// [B - 1][r]: B row blocks (1 .. kA8Blocks), r rows (1 .. kA8Rows)
template <typename S, int... B>
constexpr std::array<std::array<MicroA8Fn, kA8Rows + 1>, sizeof...(B)> micro_a8_tables(std::integer_sequence<int, B...>) {
  return {micro_a8_table<S, B + 1>(std::make_integer_sequence<int, kA8Rows>{})...};
}

// Tiles per pass over a row chunk of x (as the avx512bf16 GEMM): per chunk of columns each tile is
// built in turn and the rows pass it, so x's window (kRowChunk rows x 512 bytes: 96 KiB) stays in
// L2 for the later tiles, and the first tile requests the next rows' window ahead. One tile per
// pass streamed all of x (5.6 MB at 11008x4096, M = 512) past every 3 row blocks.
constexpr int64_t kA8PassTiles = 8;

template <typename S = Simd>
void gemm_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s, const float* bias,
             void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  static constexpr auto kMicroA8 = micro_a8_tables<S>(std::make_integer_sequence<int, kA8Blocks>{});
  const Geometry geo(s);
  const int64_t group_quads = geo.Gp / 4, total_quads = geo.Kp / 4;
  const int64_t step = chunk_units(group_quads, kA8ChunkQuads);
  constexpr int64_t kMaxSegments = kA8ChunkQuads / 2;  // whole words of 8 columns: 2 quads each
  auto tile = aligned_array<int32_t>(kA8ChunkQuads * kA8TileStride);
  auto params = aligned_array<float>(kMaxSegments * kA8SegmentParams);
  const int64_t c_floats = std::min(round_up(a.M, kA8Rows), kRowChunk) * kA8Blocks * kBlockN;  // a tile's
  auto c = aligned_array<float>(kA8PassTiles * c_floats);
  KSegment segs[kMaxSegments];
  for (int64_t b0 = block_begin; b0 < block_end; b0 += kA8PassTiles * kA8Blocks) {
    const int64_t pass_blocks = std::min(kA8PassTiles * kA8Blocks, block_end - b0);
    const int64_t ntiles = ceil_div(pass_blocks, int64_t(kA8Blocks));
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, a.M - m0);
      std::fill(c.get(), c.get() + ntiles * c_floats, 0.f);
      for (int64_t q0 = 0; q0 < total_quads; q0 += step) {
        const int64_t q1 = std::min(total_quads, q0 + step);
        const int nseg = k_segments(group_quads, q0, q1, segs);
        for (int64_t t = 0; t < ntiles; ++t) {
          const int64_t nb = std::min<int64_t>(kA8Blocks, pass_blocks - t * kA8Blocks);
          build_a8_tile<S>(packed, geo, b0 + t * kA8Blocks, nb, segs, nseg, tile.get(), params.get());
          for (int64_t r0 = 0; r0 < rows; r0 += kA8Rows) {
            const int64_t m = m0 + r0, live = std::min<int64_t>(kA8Rows, rows - r0);
            const int8_t* x = a.xq + m * geo.Kp + q0 * 4;
            if (t == 0)  // the next rows' window
              for (int64_t r = live; r < std::min<int64_t>(2 * kA8Rows, rows - r0); ++r)
                prefetch_window(x + r * geo.Kp, (q1 - q0) * 4);
            kMicroA8[nb - 1][live](x, geo.Kp, tile.get(), segs, nseg, params.get(), a.xq_sum + m * geo.groups,
                                   geo.groups, c.get() + t * c_floats + r0 * kA8Blocks * kBlockN);
          }
        }
      }
      for (int64_t t = 0; t < ntiles; ++t)
        for (int64_t r = 0; r < rows; ++r) {
          const typename S::V x_scale = S::broadcast(a.scale + m0 + r);
          for (int64_t v = 0; v < std::min<int64_t>(kA8Blocks, pass_blocks - t * kA8Blocks); ++v) {
            const int64_t b = b0 + t * kA8Blocks + v;
            float* o = c.get() + t * c_floats + (r * kA8Blocks + v) * kBlockN;
            for (int64_t h = 0; h < kVecs; ++h) S::store(o + h * S::kLanes, S::mul(S::load(o + h * S::kLanes), x_scale));
            store_row16(y, dtype, (m0 + r) * ldy + b * kBlockN, o, bias, b * kBlockN, s.N);
          }
        }
    }
  }
}

inline void linear_a8_impl(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
                           const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
                           int64_t block_end) {
  const int64_t forced = forced_gemm_rows();
  if (a.M >= (forced > 0 ? forced : Simd::kA8GemmMinRows))
    return gemm_a8(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
  const Geometry geo(s);
  for (int64_t b = block_begin; b < block_end; ++b)
    for_row_chunks(a.M, [&](auto rows, int64_t m) {
      gemv_rows_a8<decltype(rows)::value, Int8Grid>(a, m, packed, geo, bias, y, dtype, ldy, b, s.N);
    });
}

// True if rows [m0, m0 + R) of xint hold codes (no Inf or NaN in those rows of x).
template <int R>
bool rows_have_codes(const ActivationsA8& xint, int64_t m0, int64_t groups) {
  for (int r = 0; r < R; ++r)
    if (std::isnan(xint.scale[(m0 + r) * groups])) return false;
  return true;
}

// The GEMV of row block b over all rows of x, R rows at a time, on the fixed-point x that
// prepare_activations made (xint_planes: Int16Grid for bf16 x, Int24Grid otherwise; the grid is
// told by the planes the activations hold).
template <typename Grid>
void gemv_on(const Activations& a, const uint8_t* packed, const Geometry& geo, const float* bias,
             void* y, DType dtype, int64_t ldy, int64_t b, int64_t N) {
  for_row_chunks(a.M, [&](auto rows, int64_t m) {
    constexpr int R = decltype(rows)::value;
    if (rows_have_codes<R>(a.xint, m, geo.groups))
      return gemv_rows_a8<R, Grid>(a.xint, m, packed, geo, bias, y, dtype, ldy, b, N);
    // a row with an Inf or a NaN: only such rows have the float copy, so each row on its own
    for (int64_t r = m; r < m + R; ++r) {
      if (rows_have_codes<1>(a.xint, r, geo.groups))
        gemv_rows_a8<1, Grid>(a.xint, r, packed, geo, bias, y, dtype, ldy, b, N);
      else
        gemv_rows<1>(a, r, packed, geo, bias, y, dtype, ldy, b, N);
    }
  });
}
// The float GEMV of row block b over all rows of x (int8 records always take it).
template <int kBits>
void gemv_float(const Activations& a, const uint8_t* packed, const Geometry& geo, const float* bias,
                void* y, DType dtype, int64_t ldy, int64_t b, int64_t N) {
  for_row_chunks(a.M, [&](auto rows, int64_t m) {
    gemv_rows<decltype(rows)::value, kBits>(a, m, packed, geo, bias, y, dtype, ldy, b, N);
  });
}
void gemv(const Activations& a, const uint8_t* packed, const Geometry& geo, const float* bias,
          void* y, DType dtype, int64_t ldy, int64_t b, int64_t N) {
  if (a.xint.xq == nullptr) {
    gemv_float<4>(a, packed, geo, bias, y, dtype, ldy, b, N);
  } else if (a.xint.planes == Int16Grid::kPlanes) {
    gemv_on<Int16Grid>(a, packed, geo, bias, y, dtype, ldy, b, N);
  } else {
    gemv_on<Int24Grid>(a, packed, geo, bias, y, dtype, ldy, b, N);
  }
}

// ---- dense weights for a library GEMM -----------------------------------------------------------
// dequantize_tile's rows, one per real column k, are rows of W^T. The row blocks are the inner loop,
// so consecutive stores fill consecutive 16-column pieces of the same rows of W^T (block by block,
// each tile row went to a different page: ~2 ns a weight in TLB misses).
template <int kBits>
void dequantize_transposed_codes(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,
                                 DType dtype, int64_t block_begin, int64_t block_end) {
  const Geometry geo(s);
  const int64_t tile_groups = std::max<int64_t>(1, kTileK / geo.Gp);
  auto tile = aligned_array<float>(tile_groups * geo.Gp * kBlockN);
  for (int64_t g0 = 0; g0 < geo.groups; g0 += tile_groups) {
    const int64_t g1 = std::min(geo.groups, g0 + tile_groups);
    for (int64_t b = block_begin; b < block_end; ++b) {
      dequantize_tile<kBits>(packed, geo, b, g0, g1, tile.get());
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t i = 0; i < s.group_len(g); ++i)
          store_row16(wt, dtype, (g * s.G + i) * ldw + b * kBlockN,
                      tile.get() + ((g - g0) * geo.Gp + i) * kBlockN, nullptr, b * kBlockN, s.N);
    }
  }
}

// ---- entry points -------------------------------------------------------------------------------
// Int8 records (PackedShape::bits 8) go through the same entry points: no fixed-point x (their
// codes up to 255 would overflow vpmaddubsw's int16 pair sums), the float GEMV and the tile GEMM
// on byte columns; the weight stream is twice int4's, so at M = 1 the widening of each code stays
// under the memory time.
void dequantize_transposed_impl(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,
                                DType dtype, int64_t block_begin, int64_t block_end) {
  if (s.bits == 8) dequantize_transposed_codes<8>(packed, s, wt, ldw, dtype, block_begin, block_end);
  else dequantize_transposed_codes<4>(packed, s, wt, ldw, dtype, block_begin, block_end);
}

// The planes of the GEMV's fixed-point x (Activations::xint), 0 where it runs on floats: two
// (int16) for bf16 x, whose 8 significant bits that grid holds exactly within 2^7 of a group's
// largest value; three (int24) for fp32 and fp16 x, within a ulp of fp32 of the group's largest,
// up to Simd::kInt24MaxRows rows (its error is the size of the rounding of the fp32 sums it
// replaces). Three planes of byte dot products per row against fp32 FMAs on the codes, which
// share each decoded column among the rows (4096x11008, two threads, hot, ms, float -> int24):
// AVX-512 (unit floats before) M = 1 0.91 -> 0.61, 2 1.14 -> 0.87, 3 1.45 -> 1.15,
// 4 1.92 -> 1.46, 7 3.53 -> 2.5; AVX2 M = 1 1.36 -> 0.91, but 2 1.78 -> 1.91, 4 2.75 -> 3.95
// (16 ymm registers hold the pair sums and accumulators of one row of three planes). Int8 records
// take none.
inline int xint_planes(const PackedShape& s, int64_t M, DType dtype) {
  if (use_gemm(s, M, dtype) || s.bits == 8) return 0;
  if (dtype == DType::BF16) return Int16Grid::kPlanes;
  return M <= Simd::kInt24MaxRows ? Int24Grid::kPlanes : 0;
}

ActivationSizes activation_sizes_impl(const PackedShape& s, int64_t M, DType dtype) {
  const int64_t Kp = s.padded_k();
  const bool gemm = use_gemm(s, M, dtype);
  const int planes = xint_planes(s, M, dtype);
  return {(gemm ? round_up(M, kPanel) : M) * Kp, M * s.groups(), 0, planes > 0 ? M * Kp : 0, planes};
}

// Row m of x as fp32 in a.x (padded like the weights) and its group sums in a.xsum: a row of the
// float GEMV, or a panel row of the GEMM.
void prepare_float_row(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                       const Geometry& geo, const Activations& a, int64_t m) {
  const bool panels = use_gemm(s, a.M, dtype);
  // GEMV reads rows; GEMM reads panels of kPanel rows, column-major inside the panel
  float* row = panels ? a.x + (m / kPanel) * geo.Kp * kPanel + m % kPanel : a.x + m * geo.Kp;
  const int64_t stride = panels ? kPanel : 1;
  for (int64_t g = 0; g < geo.groups; ++g) {
    const int64_t len = s.group_len(g), src = m * ldx + g * s.G;
    float* dst = row + g * geo.Gp * stride;
    typename Simd::V sum = Simd::zero();
    int64_t i = 0;
    for (; i + Simd::kLanes <= len; i += Simd::kLanes) {
      const typename Simd::V v = Simd::load_x(x, dtype, src + i);
      sum = Simd::add(sum, v);
      if (stride == 1) {
        Simd::storeu(dst + i, v);
      } else {
        alignas(64) float lanes[Simd::kLanes];
        Simd::store(lanes, v);
        for (int j = 0; j < Simd::kLanes; ++j) dst[(i + j) * stride] = lanes[j];
      }
    }
    float tail = 0.f;
    for (; i < geo.Gp; ++i) {
      const float v = i < len ? load_as_float(x, dtype, src + i) : 0.f;
      dst[i * stride] = v;
      tail += v;
    }
    a.xsum[m * geo.groups + g] = Simd::hsum(sum) + tail;
  }
}

void prepare_activations_impl(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                              const Activations& a, int64_t m_begin, int64_t m_end) {
  const Geometry geo(s);
  auto float_row = [&](int64_t m) { prepare_float_row(x, dtype, ldx, s, geo, a, m); };
  // xint rows need no float copy; only those with an Inf or a NaN run on it (Activations::xint).
  // (The copy took ~8 us of every K = 11008, M = 1 call, on one thread, before the GEMV starts.)
  if (const int planes = xint_planes(s, a.M, dtype); planes > 0) {
    if (planes == Int16Grid::kPlanes)
      quantize_rows<SimdRowOps, Int16Grid>(x, dtype, ldx, s, a.xint, m_begin, m_end, a8_position);
    else
      quantize_rows<SimdRowOps, Int24Grid>(x, dtype, ldx, s, a.xint, m_begin, m_end, a8_position);
    for (int64_t m = m_begin; m < m_end; ++m)
      if (std::isnan(a.xint.scale[m * geo.groups])) float_row(m);
    return;
  }
  for (int64_t m = m_begin; m < m_end; ++m) float_row(m);
}

template <int kBits>
void linear_codes(const Activations& a, const uint8_t* packed, const PackedShape& s,
                  const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
                  int64_t block_end) {
  const Geometry geo(s);
  if (use_gemm(s, a.M, dtype)) {
    gemm<kBits>(a, packed, geo, bias, y, dtype, ldy, block_begin, block_end, s.N);
    return;
  }
  for (int64_t b = block_begin; b < block_end; ++b) {
    if constexpr (kBits == 4) gemv(a, packed, geo, bias, y, dtype, ldy, b, s.N);
    else gemv_float<kBits>(a, packed, geo, bias, y, dtype, ldy, b, s.N);
  }
}

void linear_impl(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
                 void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  if (s.bits == 8) linear_codes<8>(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
  else linear_codes<4>(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);
}

// The ISA's entry points (kernels_internal.h), defined by the including file after its anonymous
// namespace closes, inside its ISA namespace.
#define INT4KIT_SIMD_ENTRY_POINTS                                                                   \
  ActivationSizes activation_sizes(const PackedShape& s, int64_t M, DType dtype) {                  \
    return activation_sizes_impl(s, M, dtype);                                                      \
  }                                                                                                 \
  void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,           \
                           const Activations& a, int64_t m_begin, int64_t m_end) {                  \
    prepare_activations_impl(x, dtype, ldx, s, a, m_begin, m_end);                                  \
  }                                                                                                 \
  void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias, \
              void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {          \
    linear_impl(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);                         \
  }                                                                                                 \
  void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,        \
                              const ActivationsA8& a, int64_t m_begin, int64_t m_end) {             \
    prepare_activations_a8_impl(x, dtype, ldx, s, a, m_begin, m_end);                               \
  }                                                                                                 \
  void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,               \
                 const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,         \
                 int64_t block_end) {                                                               \
    linear_a8_impl(a, packed, s, bias, y, dtype, ldy, block_begin, block_end);                      \
  }                                                                                                 \
  void dequantize_transposed(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,     \
                             DType dtype, int64_t block_begin, int64_t block_end) {                 \
    dequantize_transposed_impl(packed, s, wt, ldw, dtype, block_begin, block_end);                  \
  }
