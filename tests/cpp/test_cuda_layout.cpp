// The CUDA prepacked layout checked on the CPU, where no GPU is needed: the fragment maps of
// int4kit/cuda_layout.h are bijections, the magic-number constants read as the kernel assumes, and
// a step-by-step emulation of what the fused kernel computes (its nibble extraction, its
// x-fragment loads, mma.sync.m16n8k16 as the PTX ISA defines its fragments, its accumulator map;
// dequantizing before the mma, or for small M the codes centred into the mma bit by bit as in
// fp16 or bf16 and the fp32 partial sums scaled after it) reproduces x @ W^T. The PTX fragment
// tables (ptx_mma_reference.h) are written out independently of the layout header, so a wrong
// layout cannot agree with them by accident.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "cuda_layout_reference.h"
#include "ptx_mma_reference.h"
#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace {

using namespace cuda_layout;

TEST(CudaLayout, FragmentMapsAreInverseBijections) {
  std::set<std::pair<int, int>> seen;
  for (int lane = 0; lane < kLanes; ++lane)
    for (int step = 0; step < kSteps; ++step)
      for (int nibble = 0; nibble < 8; ++nibble) {
        const TileElement e = fragment_element(lane, step, nibble);
        ASSERT_TRUE(e.row >= 0 && e.row < kTileRows && e.k >= 0 && e.k < kChunkK);
        seen.insert({e.row, e.k});
        const FragmentPosition p = fragment_position(e.row, e.k);
        EXPECT_EQ(std::make_tuple(p.lane, p.step, p.nibble), std::make_tuple(lane, step, nibble));
      }
  EXPECT_EQ(seen.size(), size_t(kTileRows * kChunkK));
}

// The dense path's view of a lane: row g + 8 half, column 16q + j of the chunk (lane_code) is
// where fragment_element says it is.
TEST(CudaLayout, LaneCodeNamesTheLanesContiguousColumns) {
  for (int lane = 0; lane < kLanes; ++lane)
    for (int half = 0; half < 2; ++half)
      for (int j = 0; j < 16; ++j) {
        const LaneCode c = lane_code(half, j);
        const TileElement e = fragment_element(lane, c.step, c.nibble);
        EXPECT_EQ(e.row, lane / 4 + 8 * half);
        EXPECT_EQ(e.k, 16 * (lane % 4) + j);
      }
}

// What the kernels' magic-number conversion relies on (cuda_layout.h, MagicCodes), read back with
// the CPU's own fp16/bf16 decoders.
TEST(CudaLayout, MagicCodesReadAsMagicPlusCode) {
  for (const auto& [c, decode] : {std::pair{kMagicF16, &f16_to_float}, std::pair{kMagicBF16, &bf16_to_float}}) {
    EXPECT_EQ(decode(c.magic_bits), c.magic);
    EXPECT_EQ(both_halves(c.magic_bits), uint32_t(c.magic_bits) << 16 | c.magic_bits);
    for (int q = 0; q < 16; ++q) {
      EXPECT_EQ(decode(uint16_t(c.magic_bits | q)), c.magic + q) << q;
      if (c.high_gain == 16.f) {
        EXPECT_EQ(decode(uint16_t(c.magic_bits | q << 4)), c.magic + 16 * q) << q;
      }
    }
    // every centre the kernels subtract, and a code's full range above it, stay exact
    for (int j = 0; j < int(c.magic); ++j) ASSERT_EQ(decode(c.plus(j)), c.magic + j) << j;
    EXPECT_LT(c.high_gain * 15, c.magic);
  }
  // the fields: high_gain 1 brings nibbles reg and reg + 4 down; 16 shifts by 8 for registers 2, 3
  for (int reg = 0; reg < 4; ++reg) {
    EXPECT_EQ(code_field(reg, 1.f).shift, 4 * reg);
    EXPECT_EQ(code_field(reg, 1.f).mask, 0x000F000Fu);
    EXPECT_EQ(code_field(reg, 16.f).shift + (reg & 1) * 4, 4 * reg);
  }
}

// The shared x tile of the fused kernel: the group's lanes copy every piece exactly once (lane l
// of WN x 32 takes piece l % 8 of rows l / 8 + 4 WN i, at slots a constant stride apart), token
// tile tm sits 64 slots on, and each quarter-warp's B-fragment reads hit 8 different 16-byte bank
// groups.
TEST(CudaLayout, SharedXTileIsCopiedOnceAndReadWithoutBankConflicts) {
  for (int WN : {2, 4, 8})
    for (int TM : {1, 2, 4, 8}) {
      const int pieces = 8 * TM * 8, lanes = WN * kLanes;
      if (pieces % lanes != 0) continue;
      const int stride = lanes / 8;
      std::vector<int> copies(size_t(pieces), 0);
      for (int l = 0; l < lanes; ++l)
        for (int i = 0; i < pieces / lanes; ++i) {
          const int slot = x_tile_slot(l / 8 + i * stride, l % 8);
          ASSERT_GE(slot, 0);
          ASSERT_LT(slot, pieces);
          ++copies[size_t(slot)];
          EXPECT_EQ(slot, x_tile_slot(l / 8, l % 8) + i * stride * 8);
        }
      for (int c : copies) ASSERT_EQ(c, 1) << "WN " << WN << " TM " << TM;
      for (int tm = 0; tm < TM; ++tm)
        for (int h = 0; h < 2; ++h)
          for (int quarter = 0; quarter < 4; ++quarter) {
            std::set<int> bank_groups;
            for (int lane = 8 * quarter; lane < 8 * quarter + 8; ++lane) {
              const int g = lane / 4, q = lane % 4;
              EXPECT_EQ(x_tile_slot(8 * tm + g, 2 * q + h), tm * 64 + x_tile_slot(g, 2 * q + h));
              bank_groups.insert(x_tile_slot(8 * tm + g, 2 * q + h) % 8);
            }
            EXPECT_EQ(bank_groups.size(), 8u) << "tm " << tm << " h " << h << " quarter " << quarter;
          }
    }
}

TEST(CudaLayout, SizesAndDtypeFooter) {
  const Shape f32{100, 200, 64, DType::F32}, bf16{100, 200, 64, DType::BF16},
      f16{100, 200, 64, DType::F16};
  EXPECT_EQ(f32.tiles(), 7);
  EXPECT_EQ(f32.chunks(), 4);
  EXPECT_EQ(f32.codes_bytes(), 7 * 4 * 512);
  EXPECT_EQ(f32.records_bytes(), 7 * 4 * 8 * 4 * 4);
  EXPECT_EQ(bf16.records_bytes(), 7 * 4 * 8 * 4 * 2);
  // The three scale dtypes give three different sizes, so the size names the dtype.
  EXPECT_NE(f32.total_bytes(), bf16.total_bytes());
  EXPECT_NE(bf16.total_bytes(), f16.total_bytes());
  EXPECT_NE(f32.total_bytes(), f16.total_bytes());
}

TEST(CudaLayout, LaneGroupStaysInsideOneGroup) {
  for (int G : {16, 32, 64, 128, 192}) {
    const int K = 1000, groups = int(num_groups(K, G));
    for (int chunk = 0; chunk < int(ceil_div(K, kChunkK)); ++chunk)
      for (int lane = 0; lane < kLanes; ++lane) {
        const int g = lane_group(lane_first_column(chunk, lane), FastDivisor(G), groups);
        for (int i = 0; i < 16; ++i) {
          const int64_t k = chunk * kChunkK + 16 * (lane & 3) + i;
          if (k < K) {
            EXPECT_EQ(g, k / G) << "G " << G << " k " << k;
          }
        }
      }
  }
}

TEST(CudaLayout, FastDivisorMatchesDivision) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any(0, (1u << 31) - 1);
  for (uint32_t d : {1u, 2u, 3u, 7u, 16u, 32u, 48u, 64u, 100u, 128u, 192u, 4096u, 11008u, 65535u,
                     (1u << 30) - 1, 1u << 30}) {
    const FastDivisor fd(d);
    for (uint32_t n = 0; n < 5000; ++n) ASSERT_EQ(fd.divide(n), n / d) << n << " / " << d;
    for (uint32_t n : {(1u << 31) - 1, (1u << 31) - 2, ((1u << 31) - 1) / d * d - 1})
      ASSERT_EQ(fd.divide(n), n / d) << n << " / " << d;
    for (int i = 0; i < 20000; ++i) {
      const uint32_t n = any(rng);
      ASSERT_EQ(fd.divide(n), n / d) << n << " / " << d;
    }
  }
}

// The whole warp's mma: every lane's C fragment (ptx_mma_reference.h).
using Fragments = MmaFragments;
void emulate_mma(const Fragments& f, float (&c)[kLanes][4]) {
  for (int lane = 0; lane < kLanes; ++lane) reference_mma_lane(f, lane, c[lane]);
}

// How the emulated kernel treats the codes: dequantized before the mma, or (the small-M kernel with
// one group per chunk) centred into the mma as bf16 or fp16 does it.
enum class Codes { kDequantized, kCentredBF16, kCentredF16 };
void PrintTo(Codes c, std::ostream* os) {
  *os << (c == Codes::kDequantized ? "dequantized" : c == Codes::kCentredBF16 ? "centred bf16" : "centred fp16");
}

// The small-M kernel's A element e (0..7) of a lane's step word: its register's code field OR-ed
// into the magic, minus the centre, in the 16-bit float the kernel uses (centred_fragments in
// linear.cu); gain (q - 8) exactly, gain = high_gain for row g + 8 (odd registers), else 1.
float centred_element(uint32_t word, int e, const MagicCodes& c, float (*decode)(uint16_t)) {
  const int reg = e / 2;
  const CodeField f = code_field(reg, c.high_gain);
  const uint32_t bits = ((word >> f.shift) & f.mask) | both_halves(c.magic_bits);
  const uint16_t half = uint16_t(e % 2 ? bits >> 16 : bits & 0xFFFFu);
  const int centre = (reg & 1 ? int(c.high_gain) : 1) * kSymmetricZero;
  return decode(half) - decode(c.plus(centre));
}

// (M, N, K, G) x how the codes go into the mma
class CudaLayoutEmulation
    : public ::testing::TestWithParam<std::tuple<std::tuple<int, int, int, int>, Codes>> {};

// out = x @ W^T through the layout, for W = (q - z) * s per group, against plain loops.
TEST_P(CudaLayoutEmulation, KernelDataFlowReproducesTheProduct) {
  const auto [M, N, K, G] = std::get<0>(GetParam());
  std::mt19937 rng(uint32_t(M * 7919 + N * 104729 + K * 31 + G));
  std::uniform_int_distribution<int> code(0, 15);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const int64_t groups = num_groups(K, G);
  std::vector<int> q(size_t(N) * K);
  std::vector<float> s(size_t(N) * groups), z(size_t(N) * groups), x(size_t(M) * K);
  for (auto& v : q) v = code(rng);
  for (auto& v : s) v = 0.01f + 0.1f * std::abs(uni(rng));
  for (auto& v : z) v = 7.5f + 7.f * uni(rng);
  for (auto& v : x) v = uni(rng);
  const Shape shape{N, K, G, DType::F32};
  const FastDivisor group_divisor{uint32_t(G)};

  // Prepack the codes the way the CUDA prepack kernel does: word (tile, chunk, lane, step).
  const std::vector<uint32_t> words = reference_code_words(q, shape);

  // The B fragments of one step: the lane's 16 contiguous x values from k = 64c + 16q; step s
  // uses 4s .. 4s+3.
  auto b_fragments = [&](Fragments& f, int64_t c, int step, int64_t token0) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const int64_t token = std::min<int64_t>(token0 + lane / 4, M - 1);
      for (int i = 0; i < 4; ++i) {
        const int64_t k = c * kChunkK + 16 * (lane % 4) + 4 * step + i;
        f.b[lane][i] = k < K ? x[token * K + k] : 0.f;
      }
    }
  };
  // A register r of a lane: codes at bits 4r (low half) and 16 + 4r (high half), as the kernel's
  // (word >> 4r) & 0x000F000F; odd registers are row g + 8.
  auto code_at = [](uint32_t word, int element) {
    return float((word >> (4 * (element / 2) + 16 * (element % 2))) & 0xF);
  };
  auto row_of = [&](int64_t t, int lane, int element) {
    return std::min<int64_t>(t * kTileRows + lane / 4 + 8 * ((element / 2) & 1), N - 1);
  };

  const Codes codes = std::get<1>(GetParam());
  const bool codes_in_mma = codes != Codes::kDequantized;
  const MagicCodes& magic = codes == Codes::kCentredF16 ? kMagicF16 : kMagicBF16;
  float (*const decode)(uint16_t) = codes == Codes::kCentredF16 ? &f16_to_float : &bf16_to_float;
  std::vector<double> out(size_t(M) * N, 0.0);
  for (int64_t t = 0; t < shape.tiles(); ++t)
    for (int64_t token0 = 0; token0 < M; token0 += 8) {
      float acc[kLanes][4] = {};
      for (int64_t c = 0; c < shape.chunks(); ++c) {
        // the small-M kernel: gain (q - 8) into the mma, the group's scale and zero point applied
        // to the chunk's fp32 partial sums, sum_k x from an mma against ones
        float part[kLanes][4] = {}, xsum[kLanes][4] = {};
        for (int step = 0; step < kSteps; ++step) {
          Fragments f{};
          b_fragments(f, c, step, token0);
          for (int lane = 0; lane < kLanes; ++lane) {
            const uint32_t word = words[((t * shape.chunks() + c) * kLanes + lane) * kSteps + step];
            const int64_t group = lane_group(lane_first_column(int(c), lane), group_divisor, int(groups));
            for (int e = 0; e < 8; ++e) {
              const int64_t n = row_of(t, lane, e);
              f.a[lane][e] = codes_in_mma ? centred_element(word, e, magic, decode)
                                          : (code_at(word, e) - z[n * groups + group]) * s[n * groups + group];
            }
          }
          emulate_mma(f, codes_in_mma ? part : acc);
          if (codes_in_mma) {
            for (auto& lane_a : f.a)
              for (float& v : lane_a) v = 1.f;
            emulate_mma(f, xsum);
          }
        }
        if (!codes_in_mma) continue;
        const int64_t group = c * kChunkK / G < groups ? c * kChunkK / G : groups - 1;
        for (int lane = 0; lane < kLanes; ++lane)
          for (int v = 0; v < 4; ++v) {
            const int row = accumulator_element(lane, v).row;
            const int64_t n = std::min<int64_t>(t * kTileRows + row, N - 1);
            const float gain = row >= 8 ? magic.high_gain : 1.f;
            const float sc = s[n * groups + group] / gain, shift = gain * (z[n * groups + group] - kSymmetricZero);
            acc[lane][v] += sc * (part[lane][v] - shift * xsum[lane][v]);
          }
      }
      for (int lane = 0; lane < kLanes; ++lane)
        for (int v = 0; v < 4; ++v) {
          const AccumulatorElement e = accumulator_element(lane, v);
          const int64_t n = t * kTileRows + e.row, token = token0 + e.token;
          if (n < N && token < M) out[token * N + n] = acc[lane][v];
        }
    }

  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0.0;
      for (int64_t k = 0; k < K; ++k)
        ref += double(x[m * K + k]) * (double(q[n * K + k]) - z[n * groups + k / G]) *
               s[n * groups + k / G];
      ASSERT_NEAR(out[m * N + n], ref, 1e-4 * (1.0 + std::abs(ref))) << "m " << m << " n " << n;
    }
}

// Every shape through the dequantize-first kernel; those with one group per chunk (G % 64 == 0 or
// per channel) also through the small-M one, in bf16 and in fp16.
std::vector<std::tuple<std::tuple<int, int, int, int>, Codes>> emulation_cases() {
  const std::tuple<int, int, int, int> shapes[] = {
      {1, 16, 64, 64},   {3, 40, 136, 32},  // N, K tails
      {9, 33, 256, 128},                    // two token tiles
      {8, 16, 200, 200},                    // per channel, K % 16 != 0
      {5, 24, 192, 16},  {2, 17, 320, 64},
      {4, 20, 450, 192}};                   // K tail, G a multiple of 64 but not a power of 2
  std::vector<std::tuple<std::tuple<int, int, int, int>, Codes>> cases;
  for (const auto& shape : shapes) {
    cases.emplace_back(shape, Codes::kDequantized);
    if (group_per_chunk(std::get<2>(shape), std::get<3>(shape))) {
      cases.emplace_back(shape, Codes::kCentredBF16);
      cases.emplace_back(shape, Codes::kCentredF16);
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLayoutEmulation, ::testing::ValuesIn(emulation_cases()));

}  // namespace
}  // namespace int4kit
