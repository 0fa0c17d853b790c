// The CUDA kernels themselves (the code nvcc compiles) run on the CPU by cuda_emulator.h:
//  * the canonical-format kernels (csrc/cuda/format_kernels.cuh) against the CPU's, bit for bit;
//  * the layout kernels (csrc/cuda/layout_kernels.cuh): prepack, unprepack and the dense path's
//    dequantization;
//  * the fused linear kernel (csrc/cuda/linear_kernel.cuh): every tile shape of kTileShapes, bf16
//    and fp16 activations, records in the activation dtype or in fp32, symmetric and asymmetric
//    (fractional) zero points, N, K and M tails, split-K across blocks with the reduction kernel;
//    against a float64 x @ W^T + bias.
// A wrong fragment, slot, swizzle, barrier or pipeline count fails here without a GPU.
#include "cuda_emulator.h"  // first: it stands in for ptx.cuh

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/format_kernels.cuh"
#include "cuda/layout_kernels.cuh"
#include "cuda/linear_kernel.cuh"
#include "cuda_layout_reference.h"
#include "int4kit/kernels.h"

namespace int4kit {
namespace cuda {
namespace {

using namespace cuda_layout;
using namespace fused_linear;

struct Problem {
  int tile, M, N, K, G;  // G: the effective group size (K per channel)
  bool bf16;             // activations bf16, else fp16
  DType records;         // scale dtype
  bool symmetric;
  int sms;               // the GPU's SM count, for split_chunks' choice of split-K
};

std::string name(const Problem& p) {
  return "tile" + std::to_string(p.tile) + "_M" + std::to_string(p.M) + "_N" + std::to_string(p.N) +
         "_K" + std::to_string(p.K) + "_G" + std::to_string(p.G) + (p.bf16 ? "_bf16" : "_fp16") +
         (p.records == DType::F32 ? "_recf32" : p.records == DType::BF16 ? "_recbf16" : "_recf16") +
         (p.symmetric ? "_sym" : "_asym") + "_sms" + std::to_string(p.sms);
}

void PrintTo(const Problem& p, std::ostream* os) { *os << name(p); }

// v as dtype t holds it (format.h's round-to-nearest-even conversions).
float round_to(DType t, float v) {
  uint32_t bits = 0;
  store_from_float(&bits, t, 0, v);
  return load_as_float(&bits, t, 0);
}

template <typename T, TileShape kShape, bool kRecordsInT>
void run_kernel(const Problem& p, const LinearArgs& args, int splits) {
  using L = Smem<kShape.nt, kShape.tm, kShape.wn, kShape.wk, kShape.stages>;
  const auto kernel = [](LinearArgs a) {
    linear_kernel<T, kShape.nt, kShape.tm, kShape.wn, kShape.wk, kShape.stages, kShape.codes_in_mma,
                  kRecordsInT>(a);
  };
  emulator::launch({unsigned(grid_blocks(p.M, args.tiles, kShape)), unsigned(splits), 1},
                   32 * kShape.wn * kShape.wk, L::kBytes, kernel, args);
}

template <typename T, size_t... I>
void run_tile(const Problem& p, const LinearArgs& args, int splits, bool records_in_t,
              std::index_sequence<I...>) {
  ((p.tile == int(I) ? (records_in_t ? run_kernel<T, kTileShapes[I], true>(p, args, splits)
                                     : run_kernel<T, kTileShapes[I], false>(p, args, splits)),
    0 : 0),
   ...);
}

// x @ W^T + bias through the kernel; its relative (Frobenius) error, and the K ranges it used.
template <typename T>
double run(const Problem& p, int& splits_used) {
  std::mt19937 rng(uint32_t(p.tile * 7919 + p.M * 104729 + p.N * 31 + p.K * 7 + p.G));
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  const Shape shape{p.N, p.K, p.G, p.records};
  const int64_t groups = shape.groups(), tiles = shape.tiles(), chunks = shape.chunks();
  const int64_t ldx = ceil_div(p.K, kChunkK) * kChunkK;
  std::vector<int> q(size_t(p.N) * p.K);
  std::vector<float> s(size_t(p.N) * groups), z(size_t(p.N) * groups), bias(size_t(p.N));
  for (auto& v : q) v = int(rng() % 16);
  for (auto& v : s) v = round_to(p.records, 0.01f + 0.05f * std::abs(uni(rng)));
  for (auto& v : z) v = p.symmetric ? float(kSymmetricZero) : round_to(p.records, 7.5f + 7.f * uni(rng));
  for (auto& v : bias) v = float(T(0.1f * uni(rng)));
  std::vector<T> x(size_t(p.M) * ldx, T(0.f));
  for (int m = 0; m < p.M; ++m)
    for (int k = 0; k < p.K; ++k) x[size_t(m) * ldx + k] = T(uni(rng));

  // The prepacked layout (cuda_layout.h): code words by fragment_element, records per lane group.
  const std::vector<uint32_t> codes = reference_code_words(q, shape);
  const int record_bytes = kRecordValues * int(scale_bytes(p.records));
  std::vector<uint8_t> records(size_t(shape.records_bytes()), 0);
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t g = 0; g < groups; ++g)
      for (int lg = 0; lg < kLaneGroups; ++lg)
        for (int v = 0; v < kRecordValues; ++v) {
          const int64_t n = t * kTileRows + lg + 8 * (v & 1);
          const float value = n >= p.N ? 0.f : (v < 2 ? s : z)[size_t(n * groups + g)];
          store_from_float(records.data() + ((t * groups + g) * kLaneGroups + lg) * record_bytes,
                           p.records, v, value);
        }

  std::vector<T> bias_t(bias.begin(), bias.end());
  std::vector<T> out(size_t(p.M) * p.N, T(std::numeric_limits<float>::quiet_NaN()));
  // the launcher's split-K choice for this GPU size, as linear.cu makes it
  const int64_t chunks_per_split = split_chunks(p.M, shape, kTileShapes[p.tile], p.sms);
  const int splits = int(ceil_div(chunks, chunks_per_split));
  splits_used = splits;
  std::vector<float> partials(splits > 1 ? size_t(splits) * p.M * p.N : 0,
                              std::numeric_limits<float>::quiet_NaN());
  LinearArgs args{x.data(), reinterpret_cast<const uint4*>(codes.data()), records.data(),
                  bias_t.data(), out.data(), p.M, ldx, p.N, p.K, groups, tiles, chunks, p.records,
                  FastDivisor(uint32_t(p.G)), group_per_chunk(p.K, p.G), chunks_per_split,
                  partials.data()};
  run_tile<T>(p, args, splits, p.records == Half<T>::kDType, std::make_index_sequence<kTileShapeCount>{});
  if (splits > 1)
    emulator::launch({2, 1, 1}, 64, 0, reduce_splits_kernel<T>, static_cast<const float*>(partials.data()),
                     splits, int64_t(p.M), int64_t(p.N), static_cast<const T*>(bias_t.data()),
                     out.data());

  double err2 = 0, ref2 = 0;
  for (int m = 0; m < p.M; ++m)
    for (int n = 0; n < p.N; ++n) {
      double ref = bias[size_t(n)];
      for (int k = 0; k < p.K; ++k)
        ref += double(float(x[size_t(m) * ldx + k])) * (q[size_t(n) * p.K + k] - z[size_t(n) * groups + k / p.G]) *
               s[size_t(n) * groups + k / p.G];
      const double y = float(out[size_t(m) * p.N + n]);
      if (!std::isfinite(y)) {
        ADD_FAILURE() << "output (" << m << ", " << n << ") never written";
        return INFINITY;
      }
      err2 += (y - ref) * (y - ref);
      ref2 += ref * ref;
    }
  return std::sqrt(err2 / ref2);
}

// ---- canonical-format kernels ---------------------------------------------------------------------

// (N, K, G, symmetric, scale dtype)
using FormatCase = std::tuple<int, int, int, bool, DType>;
class FormatKernelsEmulated : public ::testing::TestWithParam<FormatCase> {};

// quantize, pack, unpack and dequantize on "CUDA" give what the CPU's give, bit for bit (the ops
// promise both devices the same codes). The weights include an all-zero group, a one-signed group
// and a group too small for a 16-bit scale (s = 1).
TEST_P(FormatKernelsEmulated, MatchTheCpuBitForBit) {
  using namespace format_kernels;
  const auto [N, K, G, symmetric, dtype] = GetParam();
  const int64_t groups = ceil_div(K, G), row_bytes = (K + 1) / 2;
  std::mt19937 rng(uint32_t(N * 131 + K * 17 + G));
  std::normal_distribution<float> normal(0.f, 0.02f);
  std::vector<float> w(size_t(N) * K);
  for (auto& v : w) v = normal(rng);
  for (int k = 0; k < std::min(G, K); ++k) {
    w[size_t(k)] = 0.f;                                      // row 0, group 0: all zero
    w[size_t(K + k)] = std::abs(w[size_t(K + k)]);           // row 1, group 0: one sign
    w[size_t(2 * K + k)] = 1e-30f * float(k % 3);            // row 2, group 0: below fp16/bf16 scales
  }
  std::vector<uint8_t> codes_cpu(w.size()), codes_gpu(w.size(), 0xEE);
  std::vector<float> s_cpu(size_t(N * groups)), z_cpu(s_cpu.size()), s_gpu(s_cpu.size(), -1.f), z_gpu(s_cpu.size(), -1.f);
  cpu::quantize_rtn(w.data(), N, K, G, symmetric, dtype, codes_cpu.data(), s_cpu.data(), z_cpu.data());
  emulator::launch({2, 1, 1}, 64, 0, quantize_kernel, static_cast<const float*>(w.data()), int64_t(N), int64_t(K),
                   int64_t(G), bool(symmetric), dtype, codes_gpu.data(), s_gpu.data(), z_gpu.data());
  EXPECT_EQ(codes_gpu, codes_cpu);
  EXPECT_EQ(0, std::memcmp(s_gpu.data(), s_cpu.data(), s_cpu.size() * 4)) << "scales";
  EXPECT_EQ(0, std::memcmp(z_gpu.data(), z_cpu.data(), z_cpu.size() * 4)) << "zeros";

  std::vector<uint8_t> q_cpu(size_t(N * row_bytes)), q_gpu(q_cpu.size(), 0xEE);
  ASSERT_EQ(cpu::pack(codes_cpu.data(), N, K, q_cpu.data()), Status::Ok);
  int bad = 0;
  emulator::launch({2, 1, 1}, 64, 0, pack_kernel, static_cast<const uint8_t*>(codes_cpu.data()), int64_t(N),
                   int64_t(K), q_gpu.data(), &bad);
  EXPECT_EQ(q_gpu, q_cpu);
  EXPECT_EQ(bad, 0);
  std::vector<uint8_t> bad_codes = codes_cpu;
  bad_codes[size_t(N * K / 2)] = 16;
  emulator::launch({2, 1, 1}, 64, 0, pack_kernel, static_cast<const uint8_t*>(bad_codes.data()), int64_t(N),
                   int64_t(K), q_gpu.data(), &bad);
  EXPECT_EQ(bad, 1) << "a code above 15 is reported";

  std::vector<uint8_t> unpacked(w.size(), 0xEE);
  emulator::launch({2, 1, 1}, 64, 0, unpack_kernel, static_cast<const uint8_t*>(q_cpu.data()), int64_t(N),
                   int64_t(K), unpacked.data());
  EXPECT_EQ(unpacked, codes_cpu);

  std::vector<float> deq_cpu(w.size()), deq_gpu(w.size(), -1.f);
  cpu::dequantize(q_cpu.data(), s_cpu.data(), symmetric ? nullptr : z_cpu.data(), N, K, G, deq_cpu.data());
  emulator::launch({2, 1, 1}, 64, 0, dequantize_kernel, static_cast<const uint8_t*>(q_cpu.data()),
                   static_cast<const void*>(s_cpu.data()),
                   static_cast<const void*>(symmetric ? nullptr : z_cpu.data()), DType::F32, int64_t(N),
                   int64_t(K), int64_t(G), static_cast<void*>(deq_gpu.data()), DType::F32);
  EXPECT_EQ(0, std::memcmp(deq_gpu.data(), deq_cpu.data(), deq_cpu.size() * 4)) << "dequantize";
}

INSTANTIATE_TEST_SUITE_P(Shapes, FormatKernelsEmulated,
                         ::testing::Values(FormatCase{5, 130, 64, false, DType::F32},
                                           FormatCase{4, 131, 32, true, DType::BF16},
                                           FormatCase{3, 100, 100, false, DType::F16},
                                           FormatCase{6, 96, 6, true, DType::F32},
                                           FormatCase{3, 257, 128, false, DType::BF16}));

// ---- layout kernels -------------------------------------------------------------------------------

// (N, K, G, scale dtype, symmetric)
using LayoutCase = std::tuple<int, int, int, DType, bool>;
class LayoutKernelsEmulated : public ::testing::TestWithParam<LayoutCase> {};

// prepack then unprepack gives the canonical codes, scales and zeros back bit for bit, prepack's
// words are where fragment_element puts the codes, and dequantize_prepacked writes (q - z) * s in
// fp32 rounded once to each output dtype. Grids smaller than the work, as grid-stride loops allow.
TEST_P(LayoutKernelsEmulated, PrepackRoundTripAndDequantize) {
  using namespace layout_kernels;
  const auto [N, K, G, dtype, symmetric] = GetParam();
  const Shape shape{N, K, G, dtype};
  const int64_t groups = shape.groups(), row_bytes = (K + 1) / 2, bytes = scale_bytes(dtype);
  std::mt19937 rng(uint32_t(N * 31 + K * 7 + G));
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  std::vector<uint8_t> qweight(size_t(N * row_bytes));
  for (auto& b : qweight) b = uint8_t(rng());
  if (K % 2) {  // the canonical format's padding nibble is 0
    for (int n = 0; n < N; ++n) qweight[size_t(n * row_bytes + row_bytes - 1)] &= 0x0F;
  }
  std::vector<uint8_t> scales(size_t(N * groups * bytes)), zeros(scales.size());
  for (int64_t i = 0; i < N * groups; ++i) {
    store_from_float(scales.data(), dtype, i, 0.001f + 0.05f * uni(rng));
    store_from_float(zeros.data(), dtype, i, 15.f * uni(rng));
  }
  std::vector<uint8_t> packed(size_t(shape.total_bytes()), 0x5A);
  const int64_t words = shape.codes_bytes() / 4, values = shape.records_bytes() / bytes;
  emulator::launch({3, 1, 1}, 64, 0, prepack_codes_kernel, static_cast<const uint8_t*>(qweight.data()),
                   int64_t(N), int64_t(K), shape.chunks(), words, reinterpret_cast<uint32_t*>(packed.data()));
  uint8_t* records = packed.data() + shape.codes_bytes();
  auto prepack_records = [&](auto bits, auto eight) {
    using Bits = decltype(bits);
    emulator::launch({2, 1, 1}, 64, 0, prepack_records_kernel<Bits>,
                     reinterpret_cast<const Bits*>(scales.data()),
                     symmetric ? static_cast<const Bits*>(nullptr) : reinterpret_cast<const Bits*>(zeros.data()),
                     Bits(eight), int64_t(N), groups, values, reinterpret_cast<Bits*>(records));
  };
  if (dtype == DType::F32) prepack_records(uint32_t{}, kEightF32);
  else prepack_records(uint16_t{}, dtype == DType::BF16 ? kEightBF16 : kEightF16);

  // codes where the layout says
  for (int64_t w = 0; w < words; ++w) {
    const int64_t tile_chunk = w / (kLanes * kSteps);
    const int64_t tile = tile_chunk / shape.chunks(), chunk = tile_chunk % shape.chunks();
    const int lane = int(w / kSteps % kLanes), step = int(w % kSteps);
    uint32_t word;
    std::memcpy(&word, packed.data() + 4 * w, 4);
    for (int nibble = 0; nibble < 8; ++nibble) {
      const TileElement e = fragment_element(lane, step, nibble);
      const int64_t n = tile * kTileRows + e.row, k = chunk * kChunkK + e.k;
      const int expected = n < N && k < K ? (qweight[size_t(n * row_bytes + k / 2)] >> (4 * (k % 2))) & 0xF : 0;
      ASSERT_EQ(int((word >> (4 * nibble)) & 0xF), expected) << "word " << w << " nibble " << nibble;
    }
  }

  // unprepack: the canonical arrays back, bit for bit
  std::vector<uint8_t> q_back(qweight.size(), 0xEE), s_back(scales.size(), 0xEE), z_back(zeros.size(), 0xEE);
  emulator::launch({2, 1, 1}, 64, 0, unprepack_codes_kernel, reinterpret_cast<const uint32_t*>(packed.data()),
                   int64_t(N), int64_t(K), shape.chunks(), q_back.data());
  auto unprepack_records = [&](auto bits) {
    using Bits = decltype(bits);
    emulator::launch({2, 1, 1}, 64, 0, unprepack_records_kernel<Bits>, reinterpret_cast<const Bits*>(records),
                     int64_t(N), groups, reinterpret_cast<Bits*>(s_back.data()), reinterpret_cast<Bits*>(z_back.data()));
  };
  if (dtype == DType::F32) unprepack_records(uint32_t{});
  else unprepack_records(uint16_t{});
  EXPECT_EQ(q_back, qweight);
  EXPECT_EQ(s_back, scales);
  if (!symmetric) {
    EXPECT_EQ(z_back, zeros);
  }
  auto value = [&](const std::vector<uint8_t>& v, int64_t i) { return load_as_float(v.data(), dtype, i); };
  for (int64_t i = 0; symmetric && i < N * groups; ++i) ASSERT_EQ(value(z_back, i), 8.f) << i;

  // dequantize_prepacked into each output dtype
  auto check = [&](auto out_type, DType out_dtype) {
    using Out = decltype(out_type);
    std::vector<Out> out(size_t(N) * K, Out(std::numeric_limits<float>::quiet_NaN()));
    emulator::launch({3, 1, 1}, 64, 0, dequantize_prepacked_kernel<Out>,
                     reinterpret_cast<const uint4*>(packed.data()), static_cast<const uint8_t*>(records),
                     dtype, int64_t(N), K, int(groups), FastDivisor(uint32_t(G)),
                     G % 16 == 0 || groups == 1, shape.chunks(), shape.codes_bytes() / 16, out.data());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int q = (qweight[size_t(n * row_bytes + k / 2)] >> (4 * (k % 2))) & 0xF;
        const float z = symmetric ? 8.f : value(zeros, n * groups + k / G);
        const float expected = (float(q) - z) * value(scales, n * groups + k / G);
        ASSERT_EQ(float(out[size_t(n * K + k)]), float(Out(expected)))
            << "out dtype " << int(out_dtype) << " n " << n << " k " << k;
      }
  };
  check(float{}, DType::F32);
  check(__nv_bfloat16{}, DType::BF16);
  check(__half{}, DType::F16);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LayoutKernelsEmulated,
    ::testing::Values(LayoutCase{40, 200, 64, DType::F32, false}, LayoutCase{33, 131, 131, DType::BF16, false},
                      LayoutCase{17, 256, 6, DType::F16, false}, LayoutCase{16, 96, 32, DType::BF16, true},
                      LayoutCase{24, 136, 16, DType::F32, true}));

// ---- fused linear kernel -------------------------------------------------------------------------

class FusedKernelEmulated : public ::testing::TestWithParam<Problem> {};

TEST_P(FusedKernelEmulated, MatchesFloat64Reference) {
  const Problem& p = GetParam();
  int splits = 0;
  const double err = p.bf16 ? run<__nv_bfloat16>(p, splits) : run<__half>(p, splits);
  EXPECT_EQ(splits > 1, p.N == 40) << "the split-K cases (N = 40) split, the others do not";
  // bf16 rounding of the output alone is up to 2^-9 relative; the CUDA tests allow 1e-2
  EXPECT_LE(err, 1e-2) << name(p);
}

// Each tile shape at M values of its own range and past it (token tails), twice: bf16 x with bf16
// records, asymmetric, K a whole number of chunks; fp16 x with fp32 records, symmetric, a K tail.
// N = 272 is 17 row tiles (partial blocks for every shape). Then N = 40 with a long K on a
// 132-SM GPU, where split_chunks splits K across blocks (even and uneven ranges).
std::vector<Problem> problems() {
  std::vector<Problem> out;
  for (int tile = 0; tile < kTileShapeCount; ++tile) {
    const TileShape& t = kTileShapes[tile];
    const int tokens = 8 * t.tm;
    for (int M : {tokens == 8 ? 1 : tokens - 5, tokens + 3}) {
      out.push_back({tile, M, 272, 320, 64, true, DType::BF16, false, 132});
      out.push_back({tile, M, 272, 200, t.codes_in_mma ? 128 : 32, false, DType::F32, true, 132});
    }
  }
  out.push_back({0, 1, 40, 4096, 64, true, DType::BF16, false, 132});      // 4 ranges of 16 chunks
  out.push_back({9, 40, 40, 4096, 64, false, DType::F16, false, 132});     // shared x, 16 ranges
  out.push_back({5, 5, 40, 1288, 1288, true, DType::F16, false, 132});     // per channel, 11 + 10
  return out;
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedKernelEmulated, ::testing::ValuesIn(problems()),
                         [](const ::testing::TestParamInfo<Problem>& info) { return name(info.param); });

}  // namespace
}  // namespace cuda
}  // namespace int4kit
