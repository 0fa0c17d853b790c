// The fused W4A16 linear on tensor cores: out[M, N] = x[M, K] @ W^T (+ bias), with W streamed from
// the CUDA prepacked layout (int4kit/cuda_layout.h) and dequantized in registers.
//
// Orientation: mma.sync.m16n8k16 with the weights as A (16 output channels x 16 k) and the
// activations as B (16 k x 8 tokens), accumulating a 16 x 8 tile of out^T in fp32. Small M wastes
// nothing on padding this way (a token tile is 8 wide, not 16), and one A fragment, the costly part
// (load + dequantize), is reused for TM token tiles.
//
// Work split. A block has WN x WK warps and owns 16 NT WN output channels and 8 TM tokens: warp
// (wn, wk) owns NT row tiles, and the WK groups split K between them (group wk takes chunks wk,
// wk + WK, ...: in-block split-K keeps many loads in flight even when N is small) and add their
// partial tiles through shared memory at the end. Blocks are numbered token block fastest, so the
// blocks that share a weight tile run together and read it from L2 after the first.
//
// Pipeline. Every lane streams its codes and records through a STAGES-deep cp.async ring in shared
// memory: per chunk, NT 16-byte code loads (its A fragments for 4 k16 steps) and NT records
// (scale and zero point of its two rows), read back only by the lane that copied them. x comes one
// of two ways (Smem below): with WN = 1 each lane also copies the 32 bytes of x per token tile its
// B fragments need, and cp.async.wait_group is the only synchronisation; with WN > 1 the WN warps
// of a K group copy each chunk's x tile together and must meet at a named barrier before reading
// it, every iteration (group_sync; it also keeps a refill from overwriting a stage another warp
// still reads).
//
// Dequantization per A register (two codes): (word >> 4r) & 0x000F000F | magic gives magic + q in
// both halves; subtracting magic + round(z) leaves q - round(z) exactly, and one FMA with the scale
// and the fractional rest of the zero point, -(z - round(z)) * s, gives (q - z) * s. For integer
// zero points (RTN, GPTQ, symmetric) that rest is 0 and the only rounding is the final product's.
// For M <= 16 with one group per 64-column chunk, a second variant (kCodesInMma) skips the per-row
// scaling: the mma takes q - 8 and each chunk's fp32 partial sums get the group's scale and zero
// point (see the kernel body).
//
// Device code and the tile-shape table only: linear.cu launches it; tests/cpp/cuda_emulator.h
// runs it on a CPU. The PTX it needs is in ptx.cuh.
#pragma once

#include <cstdint>
#include <cstring>
#include <iterator>
#include <utility>

#include "cuda/device_utils.cuh"
#include "cuda/ptx.cuh"
#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace cuda {
namespace fused_linear {

using namespace cuda_layout;

template <typename T>
struct Half;
template <>
struct Half<__half> {
  using T = __half;
  using T2 = __half2;
  static constexpr DType kDType = DType::F16;
  static __device__ T2 low2(T2 v) { return __low2half2(v); }
  static __device__ T2 high2(T2 v) { return __high2half2(v); }
  static constexpr MagicCodes kCodes = kMagicF16;
  static constexpr uint32_t kOnesBits = 0x3C003C00u;  // 1.0 in both halves
  static __device__ T2 pair(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ float to_float(T v) { return __half2float(v); }
};
template <>
struct Half<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr DType kDType = DType::BF16;
  static __device__ T2 low2(T2 v) { return __low2bfloat162(v); }
  static __device__ T2 high2(T2 v) { return __high2bfloat162(v); }
  static constexpr MagicCodes kCodes = kMagicBF16;
  static constexpr uint32_t kOnesBits = 0x3F803F80u;  // 1.0 in both halves
  static __device__ T2 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ float to_float(T v) { return __bfloat162float(v); }
};

__device__ inline int64_t ceil_div_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T2>
__device__ inline T2 as_pair(uint32_t bits) {
  T2 v;
  memcpy(&v, &bits, 4);
  return v;
}
template <typename T2>
__device__ inline uint32_t as_bits(T2 v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return bits;
}

// A register `reg` of one k16 step's code word as magic + q in both halves (cuda_layout.h: register
// r holds nibbles r and r + 4).
template <typename T>
__device__ inline uint32_t magic_codes(uint32_t word, int reg) {
  return and_or<0x000F000Fu, both_halves(Half<T>::kCodes.magic_bits)>(word >> (4 * reg));
}

// The four A registers of one step as the small-M kernel feeds them to the mma: q - 8 exactly, for
// row g + 8 (registers 1 and 3) times kCodes.high_gain (code_field in cuda_layout.h). bf16: a
// shift, a LOP3 and a subtraction per register (no shift for register 0); fp16 reads row g + 8's
// codes in place from bits 4-7 as 1024 + 16 q, so one shift serves the whole word.
template <typename T>
__device__ inline void centred_fragments(uint32_t word, uint32_t (&a)[4]) {
  using H = Half<T>;
  using T2 = typename H::T2;
  constexpr MagicCodes c = H::kCodes;
  const T2 low = as_pair<T2>(both_halves(c.plus(kSymmetricZero)));
  const T2 high = as_pair<T2>(both_halves(c.plus(int(c.high_gain) * kSymmetricZero)));
  [&]<int... kReg>(std::integer_sequence<int, kReg...>) {
    ((a[kReg] = as_bits(__hsub2(
          as_pair<T2>(and_or<code_field(kReg, c.high_gain).mask, both_halves(c.magic_bits)>(
              word >> code_field(kReg, c.high_gain).shift)),
          kReg & 1 ? high : low))),
     ...);
  }(std::make_integer_sequence<int, 4>{});
}

// The per-(row pair, group) constants of the dequantization, as pairs of T: register pair
// (magic + q) becomes (magic + q - shift) * scale + bias = (q - z) * s, with shift = magic +
// round(z) (round(z) kept within +-64 so the shift stays exact in bf16 too) and bias the
// fractional rest -(z - round(z)) * s, 0 for integer zero points. lo: row g, hi: row g + 8.
template <typename T>
struct Dequantizer {
  using H = Half<T>;
  using T2 = typename H::T2;
  T2 shift_lo, shift_hi, scale_lo, scale_hi, bias_lo, bias_hi;

  __device__ static Dequantizer from_record(uint4 raw, DType scale_dtype) {
    Dequantizer d;
    if (scale_dtype == H::kDType) {  // records already in T: pairwise arithmetic, no conversions
      const T2 s = as_pair<T2>(raw.x), z = as_pair<T2>(raw.y);  // (lo, hi) pairs
      const T2 limit = H::pair(64.f, 64.f);
      const T2 zi = __hmax2(__hmin2(h2rint(z), limit), __hneg2(limit));
      const T2 shift = __hadd2(zi, H::pair(H::kCodes.magic, H::kCodes.magic));
      const T2 bias = __hmul2(__hsub2(z, zi), __hneg2(s));
      d.shift_lo = H::low2(shift), d.shift_hi = H::high2(shift);
      d.scale_lo = H::low2(s), d.scale_hi = H::high2(s);
      d.bias_lo = H::low2(bias), d.bias_hi = H::high2(bias);
      return d;
    }
    const LaneRecord r = decode_record(raw, scale_dtype);
    const float zi_lo = fminf(fmaxf(rintf(r.zero_lo), -64.f), 64.f);
    const float zi_hi = fminf(fmaxf(rintf(r.zero_hi), -64.f), 64.f);
    const float bias_lo = -(r.zero_lo - zi_lo) * r.scale_lo, bias_hi = -(r.zero_hi - zi_hi) * r.scale_hi;
    d.shift_lo = H::pair(H::kCodes.magic + zi_lo, H::kCodes.magic + zi_lo);
    d.shift_hi = H::pair(H::kCodes.magic + zi_hi, H::kCodes.magic + zi_hi);
    d.scale_lo = H::pair(r.scale_lo, r.scale_lo), d.scale_hi = H::pair(r.scale_hi, r.scale_hi);
    d.bias_lo = H::pair(bias_lo, bias_lo), d.bias_hi = H::pair(bias_hi, bias_hi);
    return d;
  }

  // The four A registers of one k16 step from its code word (layout: cuda_layout.h).
  __device__ void fragments(uint32_t word, uint32_t (&a)[4]) const {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const T2 magic_q = as_pair<T2>(magic_codes<T>(word, reg));
      const bool hi = reg & 1;  // registers 1 and 3 hold row g + 8
      a[reg] = as_bits(__hfma2(__hsub2(magic_q, hi ? shift_hi : shift_lo), hi ? scale_hi : scale_lo,
                               hi ? bias_hi : bias_lo));
    }
  }
};

struct LinearArgs {
  const void* x;        // [M, K], rows ldx apart; 16-byte aligned, ldx a multiple of 64 (whole
                        // chunks: no bounds checks), zeros in [K, ldx)
  const uint4* codes;   // prepacked codes
  const uint8_t* records;
  const void* bias;     // [N] or nullptr
  void* out;            // [M, N]
  int64_t M, ldx, N, K, groups, tiles, chunks;
  DType scale_dtype;
  FastDivisor group_divisor;  // of the group size
  bool group_per_chunk;       // every 64-column chunk lies in one group (cuda_layout.h)
  int64_t chunks_per_split;   // split-K across blocks: blockIdx.y takes chunks [y cps, (y+1) cps)
  float* partials;            // [splits, M, N] fp32 when gridDim.y > 1, else unused
};

// Shared memory of one block of WN x WK warps, in uint4s. Warp (wn, wk) owns row tiles wn NT ..
// wn NT + NT - 1 of the block and takes chunks wk, wk + WK, ... of its K range.
//   lane ring  [warp][stage][slot][lane]: slots 0..NT-1 the lane's code words of each row tile,
//              NT..2NT-1 its records and, when a warp is alone on its chunks (WN 1), 2NT + 2tm + h
//              its x piece h of token tile tm. A lane reads back only what it copied itself (no
//              barrier), and every 16-byte access of a warp is conflict-free.
//   x ring     when WN > 1 warps share each chunk's x: [wk][stage][x tile], the chunk's 64
//              columns laid out as cuda_layout.h's x_tile_slot, copied by the group's lanes
//              together and read after a barrier of the group. A lane copies pieces 4 WN rows
//              apart, all of one parity, so its slots are a constant stride apart.
template <int NT, int TM, int WN, int WK, int STAGES>
struct Smem {
  static constexpr bool kSharedX = WN > 1;
  static constexpr int kXTile = 8 * TM * 8;  // uint4s of x per chunk
  static constexpr int kWarpStage = (2 * NT + (kSharedX ? 0 : 2 * TM)) * kLanes;
  static constexpr int kXRing = WN * WK * STAGES * kWarpStage;  // where the x ring starts
  static constexpr int kBytes = (kXRing + (kSharedX ? WK * STAGES * kXTile : 0)) * 16;
  static constexpr int kXPiecesPerLane = kXTile / (WN * kLanes);
  static constexpr int kXRowStride = WN * kLanes / 8;  // tile rows between a lane's shared pieces
  static_assert(kXTile % (WN * kLanes) == 0, "the group's lanes copy the x tile in equal shares");
};

// kRecordsInT: the records hold T's own dtype (a bf16 or fp16 model), so their size and decoding
// are known at compile time; otherwise both are read off args.scale_dtype in the loop.
template <typename T, int NT, int TM, int WN, int WK, int STAGES, bool kCodesInMma, bool kRecordsInT>
__global__ void __launch_bounds__(32 * WN * WK) linear_kernel(LinearArgs args) {
  using H = Half<T>;
  using L = Smem<NT, TM, WN, WK, STAGES>;
  extern __shared__ uint4 smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp % WN, wk = warp / WN;
  // One grid dimension (y and z stop at 65535): token blocks fastest, so the blocks sharing a
  // weight tile run side by side and all but the first read it from L2.
  const int64_t token_blocks = ceil_div_device(args.M, 8 * TM);
  const int64_t block_tile0 = int64_t(blockIdx.x) / token_blocks * (WN * NT);
  const int64_t tile0 = block_tile0 + wn * NT;  // this warp's first row tile
  const int64_t token0 = int64_t(blockIdx.x) % token_blocks * 8 * TM;
  const T* x = static_cast<const T*>(args.x);
  // 32-bit column, group and record arithmetic: the glue keeps K below kMaxK
  const int groups = int(args.groups);
  const DType record_dtype = kRecordsInT ? H::kDType : args.scale_dtype;
  const int record_bytes = kRecordValues * int(scale_bytes(record_dtype));
  uint4* const ring = smem + warp * STAGES * L::kWarpStage + lane;  // this lane's column, stage 0
  const uint4* const x_ring = smem + L::kXRing + wk * STAGES * L::kXTile;  // the group's, stage 0

  // This block's K range (split-K across blocks, blockIdx.y) and, inside it, the warps of group
  // wk take chunks first + wk, first + wk + WK, ...
  const int first_chunk = int(blockIdx.y * args.chunks_per_split);
  const int span = int(min(args.chunks - first_chunk, args.chunks_per_split));
  const int iterations = span > wk ? (span - wk + WK - 1) / WK : 0;

  // The refill state, so that a refill is a few adds: this lane's next code words and record rows
  // of each row tile (a tile past the last re-reads the last; its outputs are never stored), the
  // next iteration to load, its ring stage and the lane's first column there.
  const uint4* codes[NT];
  const uint8_t* records[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t tile = tile0 + nt < args.tiles ? tile0 + nt : args.tiles - 1;
    codes[nt] = args.codes + (tile * args.chunks + first_chunk + wk) * kLanes + lane;
    records[nt] = args.records + (tile * args.groups * kLaneGroups + lane / 4) * record_bytes;
  }
  int next = 0, next_stage = 0, next_column = lane_first_column(first_chunk + wk, lane);
  // The x pieces this lane copies: with a shared x tile, piece p = wn * 32 + lane + i * 32 WN of
  // the tile, row p / 8, 16-byte piece p % 8 of the chunk; alone, piece h of row 8 tm + g at
  // 16 q + 8 h (i = 2 tm + h), the one its B fragments need. Row r is token token0 + r (past M
  // the last, never stored); past K a piece is the row's zero padding (LinearArgs).
  const int g = lane / 4, q = lane % 4;
  const int x_row = L::kSharedX ? (wn * kLanes + lane) / 8 : g;
  const int x_column = L::kSharedX ? 8 * (lane % 8) : 16 * q;
  // one pointer per shared piece, or per token tile (the pieces of a tile are 8 elements apart)
  constexpr int kXPointers = L::kSharedX ? L::kXPiecesPerLane : TM;
  const T* x_next[kXPointers];
#pragma unroll
  for (int i = 0; i < kXPointers; ++i) {
    const int row = x_row + (L::kSharedX ? i * L::kXRowStride : 8 * i);
    x_next[i] = x + min(token0 + row, args.M - 1) * args.ldx + (first_chunk + wk) * kChunkK + x_column;
  }
  const unsigned ring_shared = shared_address(ring);
  const unsigned x_ring_shared = shared_address(x_ring);
  // where this lane's first shared piece goes in stage 0
  const unsigned x_write0 =
      L::kSharedX ? opaque(x_ring_shared + unsigned(x_tile_slot(x_row, lane % 8)) * 16) : 0;
  unsigned write = ring_shared, x_write = x_write0;  // stage next_stage
  auto slot_address = [&](int i) { return write + unsigned(i * kLanes * 16); };
  auto issue_next = [&]() {
    if (next < iterations) {
      const int record_offset = lane_group(next_column, args.group_divisor, groups) * kLaneGroups * record_bytes;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        cp_async16(slot_address(nt), codes[nt]);
        const uint8_t* src = records[nt] + record_offset;
        if (record_bytes == 16) cp_async16(slot_address(NT + nt), src);
        else cp_async8(slot_address(NT + nt), src);
      }
#pragma unroll
      for (int i = 0; i < L::kXPiecesPerLane; ++i) {
        if constexpr (L::kSharedX) cp_async16(x_write + unsigned(i * L::kXRowStride * 8 * 16), x_next[i]);
        else cp_async16(slot_address(2 * NT + i), x_next[i / 2] + 8 * (i % 2));
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    ++next;
    next_column += WK * kChunkK;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) codes[nt] += WK * kLanes;
#pragma unroll
    for (int i = 0; i < kXPointers; ++i) x_next[i] += WK * kChunkK;
    const bool wrap = next_stage == STAGES - 1;
    next_stage = wrap ? 0 : next_stage + 1;
    write = wrap ? ring_shared : write + unsigned(L::kWarpStage * 16);
    if constexpr (L::kSharedX) x_write = wrap ? x_write0 : x_write + unsigned(L::kXTile * 16);
  };
  // With a shared x tile the warps of group wk meet once per iteration: their copies are then
  // visible to all of them, and all are done with the stage the next refill overwrites. (Barrier
  // 0 is __syncthreads'.)
  auto group_sync = [&]() {
    if constexpr (L::kSharedX) named_barrier(1 + wk, WN * kLanes);
  };
  // Where this lane's B fragments of token tile tm sit: in the shared tile, row 8 tm + g at
  // pieces 2q and 2q + 1; alone, its own slots.
  const int b_slot[2] = {x_tile_slot(g, 2 * q), x_tile_slot(g, 2 * q + 1)};
  auto load_x = [&](const uint4* read, const uint4* x_read, int tm, int h) {
    return L::kSharedX ? x_read[tm * 64 + b_slot[h]] : read[(2 * NT + 2 * tm + h) * kLanes];
  };

  float acc[NT][TM][4] = {};
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue_next();
  int stage = 0;
  const uint4* read = ring;      // stage `stage` of the lane ring
  const uint4* x_read = x_ring;  // and of the group's x ring
  for (int it = 0; it < iterations; ++it) {
    cp_async_wait<STAGES - 2>();  // this lane's copies for `it` have landed
    group_sync();
    uint4 xs[TM][2];
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      xs[tm][0] = load_x(read, x_read, tm, 0);
      xs[tm][1] = load_x(read, x_read, tm, 1);
    }
    // B fragments of step `step`: x elements 4 step + {0,1} and 4 step + {2,3} of the lane's 16
    auto b_fragments = [&](int tm, int step, uint32_t& b0, uint32_t& b1) {
      const uint4& v = xs[tm][step / 2];
      b0 = (step & 1) ? v.z : v.x;
      b1 = (step & 1) ? v.w : v.y;
    };
    if constexpr (kCodesInMma) {
      // The whole chunk lies in one group: the mma takes the codes centred, q - 8 (one exact
      // subtraction of magic + 8, the same for every row), and the group's zero point and scale
      // are applied to the fp32 partial sums,
      //   sum_k (q - z) s x = s (sum_k (q - 8) x - (z - 8) sum_k x),
      // with sum_k x per token from an mma against ones (same accumulator layout). Centring keeps
      // the partial sums free of cancellation (magic + q would cost 10 bits of fp16's mantissa).
      constexpr uint32_t kOnes[4] = {H::kOnesBits, H::kOnesBits, H::kOnesBits, H::kOnesBits};
      float xsum[TM][4] = {};
#pragma unroll
      for (int tm = 0; tm < TM; ++tm)
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
          uint32_t b0, b1;
          b_fragments(tm, step, b0, b1);
          mma_16816(xsum[tm], kOnes, b0, b1, T{});
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 words = read[nt * kLanes];
        const LaneRecord r = decode_record(read[(NT + nt) * kLanes], record_dtype);
        const uint32_t step_words[kSteps] = {words.x, words.y, words.z, words.w};
        float part[TM][4] = {};
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
          uint32_t a[4];
          centred_fragments<T>(step_words[step], a);
#pragma unroll
          for (int tm = 0; tm < TM; ++tm) {
            uint32_t b0, b1;
            b_fragments(tm, step, b0, b1);
            mma_16816(part[tm], a, b0, b1, T{});
          }
        }
        // row g + 8 summed high_gain (q - 8) x: its zero-point term and scale follow (exact in fp32)
        const float shift_lo = r.zero_lo - kSymmetricZero;
        const float shift_hi = H::kCodes.high_gain * (r.zero_hi - kSymmetricZero);
        const float scale_hi = r.scale_hi * (1.f / H::kCodes.high_gain);
#pragma unroll
        for (int tm = 0; tm < TM; ++tm)
#pragma unroll
          for (int v = 0; v < 4; ++v) {  // values 0, 1: row g; 2, 3: row g + 8
            const bool hi = v >= 2;
            acc[nt][tm][v] += (hi ? scale_hi : r.scale_lo) *
                              fmaf(-(hi ? shift_hi : shift_lo), xsum[tm][v], part[tm][v]);
          }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 words = read[nt * kLanes];
        const auto dq = Dequantizer<T>::from_record(read[(NT + nt) * kLanes], record_dtype);
        const uint32_t step_words[kSteps] = {words.x, words.y, words.z, words.w};
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
          uint32_t a[4];
          dq.fragments(step_words[step], a);
#pragma unroll
          for (int tm = 0; tm < TM; ++tm) {
            uint32_t b0, b1;
            b_fragments(tm, step, b0, b1);
            mma_16816(acc[nt][tm], a, b0, b1, T{});
          }
        }
      }
    }
    issue_next();  // into the stage read one iteration ago
    const bool wrap = stage == STAGES - 1;
    stage = wrap ? 0 : stage + 1;
    read = wrap ? ring : read + L::kWarpStage;
    if constexpr (L::kSharedX) x_read = wrap ? x_ring : x_read + L::kXTile;
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the split-K reduction

  // Partial tiles of all warps: [warp][nt][tm][value][lane] floats; the WK warps that share wn
  // (warps wn, wn + WN, ...) add theirs up.
  constexpr int kTileValues = NT * TM * 4 * kLanes;
  static_assert(WN * WK * kTileValues * 4 <= L::kBytes, "the split-K reduction must fit the rings");
  float* partial = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int tm = 0; tm < TM; ++tm)
#pragma unroll
      for (int v = 0; v < 4; ++v) partial[warp * kTileValues + ((nt * TM + tm) * 4 + v) * kLanes + lane] = acc[nt][tm][v];
  __syncthreads();
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  for (int i = threadIdx.x; i < WN * kTileValues; i += blockDim.x) {  // i = wn kTileValues + value
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) sum += partial[w * WN * kTileValues + i];
    const int l = i % kLanes, v = (i / kLanes) % 4, tm = (i / (4 * kLanes)) % TM, nt = i / (4 * kLanes * TM);
    const AccumulatorElement e = accumulator_element(l, v);
    const int64_t n = (block_tile0 + nt) * kTileRows + e.row, token = token0 + 8 * tm + e.token;
    if (n >= args.N || token >= args.M) continue;
    if (gridDim.y == 1)
      out[token * args.N + n] = from_float<T>(bias ? sum + H::to_float(bias[n]) : sum);
    else  // one of several K ranges: reduce_splits_kernel adds them up
      args.partials[(int64_t(blockIdx.y) * args.M + token) * args.N + n] = sum;
  }
}

// out = sum over splits of the partial products (+ bias), in a fixed order: deterministic.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ partials, int splits, int64_t M,
                                     int64_t N, const T* __restrict__ bias, T* __restrict__ out) {
  using H = Half<T>;
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    float sum = bias ? H::to_float(bias[i % N]) : 0.f;
    for (int s = 0; s < splits; ++s) sum += partials[s * total + i];
    out[i] = from_float<T>(sum);
  }
}

// The kernel's tile shapes, instantiated from this one table; tile_shape_index picks one by M,
// linear's `tile` argument can force any that fits (a benchmark sweep). Two ways to feed x:
//  * WN 1: a warp alone on its chunks copies its own x slots, no barrier, fewest instructions; 8
//    row-tile pairs' worth of x per chunk are read from L2 per 8 distinct tokens. Cheap while few
//    tokens are distinct (M <= 4: rows past M repeat the last and are fetched once).
//  * WN > 1: WN warps on different row tiles share the chunk's x tile, read from L2 once per
//    32 WN rows, at the price of a group barrier per chunk; the L2 reads of x would otherwise
//    outgrow the codes' (2x at M = 8, 3x at M = 16, 8x at M = 64).
// Scales after the mma (codes_in_mma) when every chunk lies in one group: the dequantization is
// what limits a GEMV. WK groups of warps take every WK-th chunk, so enough bytes are in flight.
// docs/CUDA.md lists the table with its indices.
struct TileShape {
  int nt, tm, wn, wk, stages;
  bool codes_in_mma;
};
constexpr TileShape kTileShapes[] = {
    {2, 1, 1, 8, 4, true},   // 0: M <= 4, one group per chunk
    {2, 1, 2, 4, 4, true},   // 1: M <= 8
    {2, 2, 2, 4, 4, true},   // 2: M <= 16
    {2, 2, 1, 4, 4, true},   // 3: M <= 16 with private x (candidate)
    {2, 1, 1, 8, 4, false},  // 4: M <= 4
    {2, 1, 2, 4, 4, false},  // 5: M <= 8
    {2, 2, 2, 4, 4, false},  // 6: M <= 16
    {2, 2, 1, 4, 4, false},  // 7: M <= 16 with private x (candidate)
    {2, 4, 4, 2, 3, false},  // 8: M <= 32
    {2, 8, 4, 2, 3, false},  // 9: larger M, over several token blocks
};
constexpr int kTileShapeCount = int(std::size(kTileShapes));
inline bool tile_fits(int tile, bool group_per_chunk) {
  return tile >= 0 && tile < kTileShapeCount && (group_per_chunk || !kTileShapes[tile].codes_in_mma);
}
inline int tile_shape_index(int64_t M, bool group_per_chunk, int tile) {
  if (tile >= 0) return tile;  // linear checked tile_fits
  const int small = M <= 4 ? 0 : M <= 8 ? 1 : 2;
  if (M <= 16) return group_per_chunk ? small : 4 + small;
  return M <= 32 ? 8 : 9;
}
inline int64_t grid_blocks(int64_t M, int64_t tiles, const TileShape& t) {
  return ceil_div(M, 8 * t.tm) * ceil_div(tiles, t.wn * t.nt);
}

// Chunks per K range of split-K across blocks (grid.y = ceil(chunks / this)). Only when the tile
// grid alone leaves more than half of the `sms` SMs without a block (small N, long K; a split
// costs a partials round trip and a second launch): enough splits for ~2 blocks per SM, each
// keeping at least 2 chunks per warp, at most 32.
inline int64_t split_chunks(int64_t M, const cuda_layout::Shape& shape, const TileShape& t, int64_t sms) {
  const int64_t blocks = grid_blocks(M, shape.tiles(), t);
  if (2 * blocks > sms) return shape.chunks();
  const int64_t most = shape.chunks() / (2 * t.wk) > 1 ? shape.chunks() / (2 * t.wk) : 1;
  const int64_t wanted = ceil_div(2 * sms, blocks), splits = wanted < most ? wanted : most;
  return ceil_div(shape.chunks(), splits < 32 ? splits : 32);
}

}  // namespace fused_linear
}  // namespace cuda
}  // namespace int4kit
