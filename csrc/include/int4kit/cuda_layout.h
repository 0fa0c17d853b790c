// The CUDA prepacked layout: what Int4Linear keeps in GPU memory (never saved). Torch-free and
// CUDA-free, so the host, the device kernels and the C++ tests share one definition of where every
// code sits. docs/FORMAT.md describes it in prose; keep the two in step.
//
// The fused kernels run mma.sync.m16n8k16 with the *weights as the A operand* (16 output channels
// x 16 k) and the activations as B (16 k x 8 tokens), so the accumulator is a 16-channel x 8-token
// tile of out^T. The layout makes every lane's 128-bit load a ready set of A fragments:
//
//   Rows are taken in tiles of 16 (N padded up to a multiple of 16), k in chunks of 64 (K padded up
//   to a multiple of 64; padded codes are 0 and padded activations are read as 0). For tile t and
//   chunk c, lane l (l = 4g + q) holds 4 words, one per k16 step s = 0..3, and each word carries the
//   8 codes of the A fragment of that step: rows g and g+8, k = 64c + 16q + 4s + {0, 1, 2, 3}.
//
//   The mma contraction order is free, so fragment column 2q+h stands for k = 16q + 4s + h and
//   column 2q+8+h for k = 16q + 4s + 2 + h (h = 0, 1). A lane's B fragments over the whole chunk
//   are then the 16 *contiguous* activations x[token][64c + 16q .. +15]: two 16-byte loads, no
//   shuffles. (The PTX fragment tables are the usual ones; this only renames the k axis.)
//
//   Inside a word, A register r (0: row g, k+0/1; 1: row g+8, k+0/1; 2: row g, k+2/3;
//   3: row g+8, k+2/3) takes nibbles r and r+4, so `(word >> 4r) & 0x000F000F` puts both codes of
//   the register in the low bits of the two 16-bit halves: OR-ing in the exponent of 1024 (fp16) or
//   128 (bf16) makes them magic+code, one subtraction makes them exact codes, one FMA applies
//   scale and zero point to the pair.
//
//   codes   [tiles][chunks][32 lanes][4 words]                 uint32, 512 bytes per tile-chunk
//   records [tiles][groups][8 lane groups g][4]                in the scale dtype:
//           (scale row g, scale row g+8, zero row g, zero row g+8) of the 16-row tile
//   footer  16 * (1 + dtype index) bytes (F32 16, BF16 32, F16 48), so the glue can tell the
//           scale dtype from the size alone, without reading device memory
// Symmetric weights store zero point 8. Records keep the canonical scales and zeros bit for bit,
// so unprepack returns exactly what prepack got.
#pragma once

#include <cstdint>

#include "int4kit/format.h"

#if defined(__CUDACC__)
#define INT4KIT_HOST_DEVICE __host__ __device__
#else
#define INT4KIT_HOST_DEVICE
#endif

namespace int4kit {
namespace cuda_layout {

constexpr int kTileRows = 16;     // output channels per tile: the M side of m16n8k16
constexpr int kChunkK = 64;       // k per lane-load: 32 lanes x 16 bytes of codes
constexpr int kSteps = 4;         // k16 mma steps per chunk (one word each)
constexpr int kLanes = 32;
constexpr int kLaneGroups = 8;    // g = lane / 4
constexpr int kRecordValues = 4;  // scale lo, scale hi, zero lo, zero hi

// Row (0..15) and k (0..63) inside its tile-chunk of nibble `nibble` of word `step` of `lane`.
struct TileElement {
  int row, k;
};
INT4KIT_HOST_DEVICE inline TileElement fragment_element(int lane, int step, int nibble) {
  const int reg = nibble & 3, half = nibble >> 2;
  return {(lane >> 2) + 8 * (reg & 1), 16 * (lane & 3) + 4 * step + 2 * (reg >> 1) + half};
}

// The inverse: which lane, word and nibble hold row `row` (0..15), column `k` (0..63) of a tile-chunk.
struct FragmentPosition {
  int lane, step, nibble;
};
INT4KIT_HOST_DEVICE inline FragmentPosition fragment_position(int row, int k) {
  const int reg = (row >> 3) + 2 * ((k >> 1) & 1), half = k & 1;
  return {4 * (row & 7) + (k >> 4), (k >> 2) & 3, reg + 4 * half};
}

// Where accumulator value v (0..3) of `lane` lands in the 16-row x 8-token tile of out^T (the
// m16n8k16 C fragment: rows g and g+8, tokens 2q and 2q+1).
struct AccumulatorElement {
  int row, token;
};
INT4KIT_HOST_DEVICE inline AccumulatorElement accumulator_element(int lane, int v) {
  return {(lane >> 2) + 8 * (v >> 1), 2 * (lane & 3) + (v & 1)};
}

// A lane l = 4g + q holds, of each of its two rows (g + 8 half, half = 0 or 1), the 16 contiguous
// columns 16q .. 16q + 15 of the chunk; column 16q + j of them is this nibble of word `step`.
struct LaneCode {
  int step, nibble;
};
INT4KIT_HOST_DEVICE constexpr LaneCode lane_code(int half, int j) {
  return {j >> 2, 2 * ((j >> 1) & 1) + half + 4 * (j & 1)};
}

// The first of the 16 columns a lane holds in chunk `chunk`. Column indices are 32-bit: the fused
// kernel takes K < kMaxK (its launcher checks).
INT4KIT_HOST_DEVICE inline int lane_first_column(int chunk, int lane) {
  return chunk * kChunkK + 16 * (lane & 3);
}

// n / d for 0 <= n < 2^31 as a multiply-high, add and shift (Granlund-Montgomery with a rounded-up
// magic number): a runtime divisor costs 2-3 instructions instead of a ~20-instruction division.
struct FastDivisor {
  uint32_t magic = 0;
  int shift = 0;

  FastDivisor() = default;
  explicit FastDivisor(uint32_t d) {
    while ((uint64_t(1) << shift) < d) ++shift;  // shift = ceil(log2 d)
    magic = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  INT4KIT_HOST_DEVICE uint32_t divide(uint32_t n) const {
    const uint32_t hi = uint32_t((uint64_t(n) * magic) >> 32);
    return (hi + n) >> shift;  // hi + n < 2^32 because n < 2^31
  }
};

// The group of a lane's 16 columns starting at `first_column`. Valid when G is a multiple of 16 (a
// lane never straddles two groups) or when there is one group (per channel, any K); the clamp
// covers the padded columns past K.
INT4KIT_HOST_DEVICE inline int lane_group(int first_column, const FastDivisor& G, int groups) {
  const int g = int(G.divide(uint32_t(first_column)));
  return g < groups ? g : groups - 1;
}

// Codes to 16-bit floats without a conversion instruction (linear.cu). A 16-bit float holding
// `magic` (1024 in fp16, 128 in bf16) has an ulp of 1 up to 2 magic, so OR-ing a code q into bits
// 0-3 of its pattern reads as magic + q, and adding an integer j < magic to the pattern adds j to
// the value. fp16 has 10 mantissa bits, so a code in bits 4-7 reads as magic + 16 q too
// (high_gain 16): the small-M kernel takes the codes of row g + 8 that way, without a shift.
struct MagicCodes {
  uint16_t magic_bits;
  float magic, high_gain;
  // the pattern of magic + j (0 <= j < magic), e.g. the centre magic + 8 the kernel subtracts
  INT4KIT_HOST_DEVICE constexpr uint16_t plus(int j) const { return uint16_t(magic_bits + j); }
};
constexpr MagicCodes kMagicF16{0x6400, 1024.f, 16.f};
constexpr MagicCodes kMagicBF16{0x4300, 128.f, 1.f};
// The pattern of a 16-bit value in both halves of a 32-bit register.
INT4KIT_HOST_DEVICE constexpr uint32_t both_halves(uint16_t bits) { return uint32_t(bits) * 0x00010001u; }

// Where A register `reg` of a step word has its two codes: (word >> shift) & mask, with mask
// 0x000F000F (bits 0-3 of each half: reads as magic + q) or, when high_gain is 16, 0x00F000F0 for
// row g + 8 (bits 4-7: magic + 16 q). With high_gain 1 that is nibbles reg and reg + 4 brought
// down; with 16, one shift by 8 serves registers 2 and 3.
struct CodeField {
  int shift;
  uint32_t mask;
};
INT4KIT_HOST_DEVICE constexpr CodeField code_field(int reg, float high_gain) {
  if (high_gain == 1.f) return {4 * reg, 0x000F000Fu};
  return {8 * (reg >> 1), (reg & 1) ? 0x00F000F0u : 0x000F000Fu};
}

// The x tile that the warps of one K group share in the fused kernel (linear.cu, more than one
// warp per K group): [8 TM tokens][8 pieces of 16 bytes] = one 64-column chunk of x per token
// row, piece p of row r at slot p ^ (r & 1). A quarter-warp reads rows g, g + 1 (g even) at
// pieces 2q + h, q = 0..3, and the XOR moves the odd row's reads to the other four 16-byte bank
// groups; rows 8 apart (token tiles) and rows of one parity keep the same offsets.
INT4KIT_HOST_DEVICE constexpr int x_tile_slot(int row, int piece) { return row * 8 + (piece ^ (row & 1)); }

// K of the fused kernel: its columns, and its record offsets (K / 16 groups at most, 128 bytes
// each per tile), stay in 32 bits. Larger K takes dequantize + matmul.
constexpr int64_t kMaxK = int64_t(1) << 27;

INT4KIT_HOST_DEVICE constexpr int64_t scale_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

struct Shape {
  int64_t N = 0, K = 0, G = 0;  // G: the effective group size (K per channel)
  DType scale_dtype = DType::F32;

  int64_t tiles() const { return ceil_div(N, kTileRows); }
  int64_t chunks() const { return ceil_div(K, kChunkK); }
  int64_t groups() const { return num_groups(K, G); }
  int64_t codes_bytes() const { return tiles() * chunks() * kLanes * 16; }
  int64_t records_bytes() const {
    return tiles() * groups() * kLaneGroups * kRecordValues * scale_bytes(scale_dtype);
  }
  int64_t footer_bytes() const { return 16 * (1 + int64_t(scale_dtype)); }
  int64_t total_bytes() const { return codes_bytes() + records_bytes() + footer_bytes(); }
};

// The fused kernels read groups at lane granularity (see lane_group); other group sizes go through
// dequantize + a dense matmul.
inline bool fused_group_ok(int64_t K, int64_t G) { return G == K || G % 16 == 0; }

// Every chunk's 64 columns in one group: the small-M kernel then applies scales after the mma.
inline bool group_per_chunk(int64_t K, int64_t G) { return G == K || G % kChunkK == 0; }

}  // namespace cuda_layout
}  // namespace int4kit
