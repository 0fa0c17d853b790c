// GoogleTest suite of int4kit's torch-free CPU kernels (csrc/include/int4kit/kernels.h). Every
// expectation comes from a reference written here in plain loops, or worked out by hand, never
// from the kernels' own output. The fused linear runs on every ISA in cpu::kAllIsas that this CPU
// supports, so a new instruction-set path is covered as soon as it is listed there.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "int4kit/kernels.h"

namespace int4kit {
namespace {

using cpu::Isa;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<uint8_t> random_codes(int64_t count, std::mt19937& rng, int max_code = 15) {
  std::uniform_int_distribution<int> dist(0, max_code);
  std::vector<uint8_t> codes(static_cast<size_t>(count));
  for (auto& c : codes) c = uint8_t(dist(rng));
  return codes;
}

std::vector<float> random_floats(int64_t count, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(count));
  for (auto& x : v) x = dist(rng);
  return v;
}

int64_t groups_of(int64_t K, int64_t G) { return (K + G - 1) / G; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    default: return "f16";
  }
}

// The canonical packing as format.h words it: byte j of a row holds k = 2j in its low nibble and
// k = 2j + 1 in its high nibble.
std::vector<uint8_t> reference_pack(const std::vector<uint8_t>& codes, int64_t N, int64_t K) {
  const int64_t row_bytes = (K + 1) / 2;
  std::vector<uint8_t> out(size_t(N * row_bytes), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      out[n * row_bytes + k / 2] |= uint8_t(codes[n * K + k] << (k % 2 ? 4 : 0));
  return out;
}

// ---- pack / unpack ------------------------------------------------------------------------------
TEST(Pack, RoundTripIsBitExact) {
  std::mt19937 rng(1);
  const std::pair<int64_t, int64_t> shapes[] = {{4, 64}, {5, 7}, {3, 1}, {1, 2}, {13, 33}, {0, 8}};
  for (const auto& [N, K] : shapes) {
    SCOPED_TRACE("N=" + std::to_string(N) + " K=" + std::to_string(K));
    const std::vector<uint8_t> codes = random_codes(N * K, rng);
    std::vector<uint8_t> qweight(size_t(N * ((K + 1) / 2)), 0xAA);  // 0xAA: unwritten bytes show
    ASSERT_EQ(cpu::pack(codes.data(), N, K, qweight.data()), Status::Ok);
    EXPECT_EQ(qweight, reference_pack(codes, N, K));
    std::vector<uint8_t> back(size_t(N * K), 0xFF);
    cpu::unpack(qweight.data(), N, K, back.data());
    EXPECT_EQ(back, codes);
  }
}

TEST(Pack, RejectsCodeAbove15) {
  // a low nibble, a high nibble, and the unpaired last code of an odd K
  for (int pos : {0, 3, 6}) {
    for (uint8_t bad : {uint8_t(16), uint8_t(255)}) {
      std::vector<uint8_t> codes(7, 3);
      codes[pos] = bad;
      std::vector<uint8_t> qweight(4);
      EXPECT_EQ(cpu::pack(codes.data(), 1, 7, qweight.data()), Status::CodeOutOfRange)
          << "code " << int(bad) << " at " << pos;
    }
  }
}

// ---- quantize_rtn -------------------------------------------------------------------------------
struct Quantized {
  std::vector<uint8_t> codes;
  std::vector<float> scales, zeros;
};

Quantized quantize(const std::vector<float>& w, int64_t N, int64_t K, int64_t G, bool symmetric,
                   DType scale_dtype) {
  const size_t groups = size_t(N * groups_of(K, G));
  Quantized q{std::vector<uint8_t>(size_t(N * K), 0xFF), std::vector<float>(groups, kNaN),
              std::vector<float>(groups, kNaN)};
  cpu::quantize_rtn(w.data(), N, K, G, symmetric, scale_dtype, q.codes.data(), q.scales.data(),
                    q.zeros.data());
  return q;
}

// Row of K = 10 with G = 8: a full group and a partial one of 2. All scales are powers of two, so
// every quotient below is exact and the rounding is the documented half-to-even.
TEST(QuantizeRtn, AsymmetricHandComputed) {
  const std::vector<float> w = {
      // min -2, max 5.5: s = 7.5 / 15 = 0.5, z = round(2 / 0.5) = 4. 0.25 / 0.5 = 0.5 -> 0,
      // 0.75 / 0.5 = 1.5 -> 2, -1.25 / 0.5 = -2.5 -> -2.
      -2.f, 0.f, 1.f, 5.5f, 0.25f, 0.75f, -1.25f, 3.f,
      -1.f, 14.f,  // min -1, max 14: s = 1, z = 1
      // all positive, so the range is [0, 15]: s = 1, z = 0, and 7.5 -> 8
      7.5f, 15.f, 3.f, 0.f, 1.f, 2.f, 4.f, 5.f,
      -15.f, -7.5f};  // all negative, range [-15, 0]: s = 1, z = 15, and -7.5 -> -8
  const Quantized q = quantize(w, 2, 10, 8, /*symmetric=*/false, DType::F32);
  EXPECT_EQ(q.scales, (std::vector<float>{0.5f, 1.f, 1.f, 1.f}));
  EXPECT_EQ(q.zeros, (std::vector<float>{4.f, 1.f, 0.f, 15.f}));
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{0, 4, 6, 15, 4, 6, 2, 10, 0, 15,  //
                                           8, 15, 3, 0, 1, 2, 4, 5, 0, 7}));
}

TEST(QuantizeRtn, SymmetricHandComputed) {
  const std::vector<float> w = {
      // max |w| = 3.75: s = 3.75 / 7.5 = 0.5, z = 8; 3.75 / 0.5 = 7.5 -> 8 -> 16, clamped to 15
      -3.75f, 3.75f, 0.25f, 0.75f, 1.f, -1.25f, 0.f, 2.f,
      7.5f, -3.f};  // max |w| = 7.5: s = 1; 7.5 -> 8 -> 16 -> 15
  const Quantized q = quantize(w, 1, 10, 8, /*symmetric=*/true, DType::F32);
  EXPECT_EQ(q.scales, (std::vector<float>{0.5f, 1.f}));
  EXPECT_EQ(q.zeros, (std::vector<float>{8.f, 8.f}));
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{0, 15, 8, 10, 10, 6, 8, 12, 15, 5}));
}

TEST(QuantizeRtn, ZeroScaleBecomesOne) {
  // group 0 is all zeros; group 1's scale 1e-10 / 7.5 underflows to 0 in fp16
  const std::vector<float> w = {0.f, -0.f, 0.f, 0.f, 1e-10f, -1e-10f, 0.f, 5e-11f};
  for (bool symmetric : {true, false}) {
    SCOPED_TRACE(symmetric ? "symmetric" : "asymmetric");
    const Quantized q = quantize(w, 1, 8, 4, symmetric, DType::F16);
    for (int g = 0; g < 2; ++g) {
      EXPECT_EQ(q.scales[g], 1.f) << "group " << g;
      for (int i = 0; i < 4; ++i) EXPECT_EQ(float(q.codes[4 * g + i]), q.zeros[g]) << "group " << g;
    }
  }
}

// The documented formula, evaluated here group by group, for random weights; with bf16 and fp16
// scales it also checks the scale is rounded to that dtype before the codes are computed.
TEST(QuantizeRtn, RandomWeightsFollowTheFormula) {
  const int64_t N = 6, K = 100, G = 32, groups = groups_of(K, G);
  std::mt19937 rng(2);
  const std::vector<float> w = random_floats(N * K, -2.f, 1.5f, rng);
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    for (bool symmetric : {true, false}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + (symmetric ? " symmetric" : " asymmetric"));
      const Quantized q = quantize(w, N, K, G, symmetric, dtype);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t k0 = g * G, k1 = std::min(K, k0 + G);
          float lo = 0.f, hi = 0.f;
          for (int64_t k = k0; k < k1; ++k) {
            lo = std::min(lo, w[n * K + k]);
            hi = std::max(hi, w[n * K + k]);
          }
          float s = symmetric ? std::max(hi, -lo) / 7.5f : (hi - lo) / 15.f;
          if (dtype == DType::BF16) s = bf16_to_float(float_to_bf16(s));
          if (dtype == DType::F16) s = f16_to_float(float_to_f16(s));
          const float z = symmetric ? 8.f : std::clamp(std::nearbyint(-lo / s), 0.f, 15.f);
          ASSERT_EQ(q.scales[n * groups + g], s) << "n=" << n << " g=" << g;
          ASSERT_EQ(q.zeros[n * groups + g], z) << "n=" << n << " g=" << g;
          for (int64_t k = k0; k < k1; ++k) {
            const float code = std::clamp(std::nearbyint(w[n * K + k] / s) + z, 0.f, 15.f);
            ASSERT_EQ(q.codes[n * K + k], uint8_t(code)) << "n=" << n << " k=" << k;
          }
        }
      }
    }
  }
}

// ---- dequantize ---------------------------------------------------------------------------------
TEST(Dequantize, MatchesFormula) {
  const int64_t N = 5, K = 37, G = 6, groups = groups_of(K, G);  // last group has one column
  std::mt19937 rng(3);
  const std::vector<uint8_t> codes = random_codes(N * K, rng);
  const std::vector<uint8_t> qweight = reference_pack(codes, N, K);
  const std::vector<float> scales = random_floats(N * groups, 0.01f, 2.f, rng);
  const std::vector<float> zeros = random_floats(N * groups, 0.f, 15.f, rng);  // fractional (HQQ)
  for (bool symmetric : {true, false}) {
    SCOPED_TRACE(symmetric ? "symmetric" : "asymmetric");
    std::vector<float> out(size_t(N * K), kNaN);
    cpu::dequantize(qweight.data(), scales.data(), symmetric ? nullptr : zeros.data(), N, K, G,
                    out.data());
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = n * groups + k / G;
        const double z = symmetric ? 8.0 : zeros[i];
        const double expected = (codes[n * K + k] - z) * scales[i];
        // the kernel may compute q * s - z * s in fp32: a few ulps of 15 * s
        EXPECT_NEAR(out[n * K + k], expected, 1e-5 * scales[i]) << "n=" << n << " k=" << k;
      }
    }
  }
}

// ---- CPU prepacked layout -----------------------------------------------------------------------
struct Layout {
  int64_t N, K, G;
};

void PrintTo(const Layout& c, std::ostream* os) { *os << "N" << c.N << "_K" << c.K << "_G" << c.G; }
std::string layout_name(const Layout& c) {
  std::ostringstream os;
  PrintTo(c, &os);
  return os.str();
}

// A random int4 weight in canonical form and its prepacked copy.
struct Weight {
  PackedShape shape;
  std::vector<uint8_t> codes;        // [N, K]
  std::vector<float> scales, zeros;  // [N, groups]; zeros empty when symmetric
  std::vector<uint8_t> packed;

  float zero(int64_t i) const {
    return zeros.empty() ? float(shape.bits == 8 ? kSymmetricZero8 : kSymmetricZero) : zeros[i];
  }
};

// Scales and (fractional) zero points are values of scale_dtype, as canonical ones are.
// bits 8: an int8 weight (codes 0..255) in the int8 records (prepack_int8).
Weight make_weight(const Layout& c, bool symmetric, std::mt19937& rng,
                   DType scale_dtype = DType::F32, int bits = 4) {
  const int64_t groups = groups_of(c.K, c.G);
  const int max_code = bits == 8 ? 255 : 15;
  Weight w;
  w.shape = PackedShape{c.N, c.K, c.G, scale_dtype, bits};
  w.codes = random_codes(c.N * c.K, rng, max_code);
  auto in_scale_dtype = [&](std::vector<float> v) {
    for (float& f : v) {
      uint32_t bits = 0;
      store_from_float(&bits, scale_dtype, 0, f);
      f = load_as_float(&bits, scale_dtype, 0);
    }
    return v;
  };
  w.scales = in_scale_dtype(random_floats(c.N * groups, 0.01f, 0.1f, rng));
  if (!symmetric) w.zeros = in_scale_dtype(random_floats(c.N * groups, 0.f, float(max_code), rng));
  w.packed.assign(size_t(w.shape.total_bytes()), 0xAA);
  if (bits == 8) {
    cpu::prepack_int8(w.codes.data(), w.scales.data(), symmetric ? nullptr : w.zeros.data(),
                      w.shape, w.packed.data());
    return w;
  }
  const std::vector<uint8_t> qweight = reference_pack(w.codes, c.N, c.K);
  cpu::prepack(qweight.data(), w.scales.data(), symmetric ? nullptr : w.zeros.data(), w.shape,
               w.packed.data());
  return w;
}

// Both symmetries with every scale dtype of the records.
std::vector<std::pair<bool, DType>> symmetry_and_scale_dtypes() {
  std::vector<std::pair<bool, DType>> cases;
  for (bool symmetric : {false, true})
    for (DType t : {DType::F32, DType::BF16, DType::F16}) cases.emplace_back(symmetric, t);
  return cases;
}

class Prepack : public ::testing::TestWithParam<Layout> {};

TEST_P(Prepack, UnprepackRoundTripIsBitExact) {
  const Layout c = GetParam();
  const int64_t groups = groups_of(c.K, c.G);
  std::mt19937 rng(4);
  for (const auto& [symmetric, scale_dtype] : symmetry_and_scale_dtypes()) {
    SCOPED_TRACE(std::string(symmetric ? "symmetric " : "asymmetric ") + dtype_name(scale_dtype));
    const Weight w = make_weight(c, symmetric, rng, scale_dtype);
    std::vector<uint8_t> qweight(size_t(c.N * ((c.K + 1) / 2)), 0xAA);
    std::vector<float> scales(size_t(c.N * groups), kNaN), zeros(scales.size(), kNaN);
    cpu::unprepack(w.packed.data(), w.shape, qweight.data(), scales.data(), zeros.data());
    EXPECT_EQ(qweight, reference_pack(w.codes, c.N, c.K));
    EXPECT_EQ(scales, w.scales);
    EXPECT_EQ(zeros, symmetric ? std::vector<float>(scales.size(), 8.f) : w.zeros);
  }
}

// Reads the prepacked buffer byte by byte as format.h describes it: per row block of 16 rows, per
// group, Gp/8 words x 16 lanes of codes (word w holds columns 8w .. 8w + 7 of the group, column i
// at bit nibble_shift(i)), then 16 scales and 16 zero points in the scale dtype; padding rows and
// columns hold code 0; a footer of 0, 8 or 24 zero bytes (fp32, bf16, fp16 scales).
TEST_P(Prepack, MatchesDocumentedLayout) {
  const Layout c = GetParam();
  const int64_t groups = groups_of(c.K, c.G), Gp = (c.G + 7) / 8 * 8, blocks = (c.N + 15) / 16;
  const int64_t code_bytes = Gp / 8 * 16 * 4;
  std::mt19937 rng(5);
  for (const auto& [scale_dtype, scale_bytes, footer] :
       {std::tuple{DType::F32, 4, 0}, std::tuple{DType::BF16, 2, 8}, std::tuple{DType::F16, 2, 24}}) {
    SCOPED_TRACE(dtype_name(scale_dtype));
    const int64_t record_bytes = code_bytes + 2 * 16 * scale_bytes;
    const Weight w = make_weight(c, /*symmetric=*/false, rng, scale_dtype);
    ASSERT_EQ(int64_t(w.packed.size()), blocks * groups * record_bytes + footer);
    for (int64_t i = blocks * groups * record_bytes; i < int64_t(w.packed.size()); ++i)
      ASSERT_EQ(w.packed[i], 0) << "footer byte " << i;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* rec = w.packed.data() + (b * groups + g) * record_bytes;
        for (int64_t l = 0; l < 16; ++l) {
          const int64_t n = 16 * b + l;
          for (int64_t col = 0; col < Gp; ++col) {
            uint32_t word;
            std::memcpy(&word, rec + ((col / 8) * 16 + l) * 4, 4);
            const int64_t k = g * c.G + col;
            const bool real = n < c.N && col < c.G && k < c.K;
            ASSERT_EQ((word >> nibble_shift(int(col % 8))) & 0xF, real ? w.codes[n * c.K + k] : 0u)
                << "block " << b << " group " << g << " lane " << l << " column " << col;
          }
          if (n >= c.N) continue;
          EXPECT_EQ(load_as_float(rec + code_bytes, scale_dtype, l), w.scales[n * groups + g]);
          EXPECT_EQ(load_as_float(rec + code_bytes, scale_dtype, 16 + l), w.zeros[n * groups + g]);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Prepack,
    ::testing::Values(Layout{16, 64, 32}, Layout{15, 100, 32}, Layout{17, 130, 64},
                      Layout{33, 257, 128}, Layout{20, 9, 2}, Layout{7, 64, 6}, Layout{5, 99, 6},
                      Layout{3, 37, 37}, Layout{18, 256, 256}, Layout{1, 1, 1}),
    [](const ::testing::TestParamInfo<Layout>& info) { return layout_name(info.param); });

// ---- fused linear -------------------------------------------------------------------------------
TEST(Dispatch, IsaNamesParseBack) {
  for (Isa isa : cpu::kAllIsas) {
    Isa parsed;
    ASSERT_TRUE(cpu::parse_isa(cpu::isa_name(isa), &parsed)) << cpu::isa_name(isa);
    EXPECT_EQ(parsed, isa);
  }
  Isa unused;
  EXPECT_FALSE(cpu::parse_isa("sse9", &unused));
  EXPECT_TRUE(cpu::isa_supported(cpu::best_isa()));
  EXPECT_TRUE(cpu::isa_supported(Isa::Scalar));
}

int64_t dtype_bytes(DType t) { return t == DType::F32 ? 4 : 2; }

// A [rows, ld] matrix of fp32, bf16 or fp16, stored as raw bytes.
struct Matrix {
  DType dtype;
  int64_t ld;
  std::vector<uint8_t> bytes;

  Matrix(DType t, int64_t rows, int64_t ld_, float fill)
      : dtype(t), ld(ld_), bytes(size_t(rows * ld_ * dtype_bytes(t))) {
    for (int64_t i = 0; i < rows * ld; ++i) set(i / ld, i % ld, fill);
  }
  float get(int64_t r, int64_t c) const { return load_as_float(bytes.data(), dtype, r * ld + c); }
  void set(int64_t r, int64_t c, float v) { store_from_float(bytes.data(), dtype, r * ld + c, v); }
};

// y = x . ((q - z) * s)^T in double: "dequantize, then matmul" (the bias is added by the caller).
// With `magnitudes`, also sum |x w| per output: the scale of a float dot product's rounding error.
std::vector<double> reference_linear(const Weight& w, const Matrix& x, int64_t M,
                                     std::vector<double>* magnitudes = nullptr) {
  const int64_t N = w.shape.N, K = w.shape.K, G = w.shape.G, groups = groups_of(K, G);
  std::vector<double> y(size_t(M * N));
  if (magnitudes != nullptr) magnitudes->assign(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0, magnitude = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = n * groups + k / G;
        const double product = double(x.get(m, k)) * ((double(w.codes[n * K + k]) - w.zero(i)) * w.scales[i]);
        acc += product;
        magnitude += std::fabs(product);
      }
      y[m * N + n] = acc;
      if (magnitudes != nullptr) (*magnitudes)[m * N + n] = magnitude;
    }
  }
  return y;
}

// Runs the kernels as csrc/cpu/ops_cpu.cpp does: prepare_activations over row ranges (here two),
// then linear over row blocks, split into [0, split) and [split, row_blocks) calls.
// The activation buffer is NaN-filled by default, like the uninitialised tensors of the glue:
// nothing may depend on what it held (a finite fill shows reads of what was never written where
// the outputs should be NaN).
// An int8 weight (shape.bits 8) runs the same way.
Matrix run_linear(Isa isa, const Weight& w, const Matrix& x, int64_t M, const float* bias,
                  int64_t ldy, int64_t split, float buffer_fill = kNaN) {
  const PackedShape& s = w.shape;
  const cpu::ActivationSizes sizes = cpu::activation_sizes(isa, s, M, x.dtype);
  std::vector<float> buffer(size_t(cpu::activation_bytes(sizes, M) / 4), buffer_fill);
  const cpu::Activations acts = cpu::activations_at(reinterpret_cast<uint8_t*>(buffer.data()), sizes, M);
  cpu::prepare_activations(isa, x.bytes.data(), x.dtype, x.ld, s, acts, 0, M / 2);
  cpu::prepare_activations(isa, x.bytes.data(), x.dtype, x.ld, s, acts, M / 2, M);
  Matrix y(x.dtype, M, ldy, kNaN);  // NaN: outputs the kernel fails to write show up
  cpu::linear(isa, acts, w.packed.data(), s, bias, y.bytes.data(), y.dtype, ldy, 0, split);
  cpu::linear(isa, acts, w.packed.data(), s, bias, y.bytes.data(), y.dtype, ldy, split,
              s.row_blocks());
  return y;
}

}  // namespace

namespace cpu {
// gtest prints test parameters with this: "avx2" rather than the enum's raw bytes
void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace cpu

namespace {

class FusedLinear : public ::testing::TestWithParam<std::tuple<Isa, Layout>> {};

// The fused linear of `bits`-bit weights against "dequantize, then matmul" in double.
void check_against_dequantized_matmul(Isa isa, const Layout& c, int bits) {
  std::mt19937 rng(6);
  const int64_t ldx = c.K + 3, ldy = c.N + 5;  // strided rows: gaps are neither read nor written
  const int64_t blocks = (c.N + 15) / 16;
  for (const auto& [symmetric, scale_dtype] : symmetry_and_scale_dtypes()) {
    const Weight w = make_weight(c, symmetric, rng, scale_dtype, bits);
    const std::vector<float> bias_values = random_floats(c.N, -1.f, 1.f, rng);
    // both sides of every ISA's GEMV / GEMM crossover (linear_simd.h's gemm_min_rows): AVX2 bf16
    // 63 / 64, AVX-512 fp32 and fp16 1023 / 1024, AVX-512 BF16 31 / 32 (and its bf16 weights from
    // 64), int8 records 7 / 8
    for (int64_t M : {1, 2, 3, 4, 5, 7, 8, 13, 31, 32, 33, 63, 64, 200, 1030}) {
      if (M == 1030 && isa == Isa::Scalar) continue;  // one path at every M: spare its time
      for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
        Matrix x(dtype, M, ldx, kNaN);
        const std::vector<float> xv = random_floats(M * c.K, -1.f, 1.f, rng);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t k = 0; k < c.K; ++k) x.set(m, k, xv[m * c.K + k]);
        const std::vector<double> ref = reference_linear(w, x, M);
        for (bool with_bias : {false, true}) {
          SCOPED_TRACE(std::string(symmetric ? "symmetric" : "asymmetric") + " scales " +
                       dtype_name(scale_dtype) + " M=" + std::to_string(M) + " " +
                       dtype_name(dtype) + (with_bias ? " bias" : ""));
          const float* bias = with_bias ? bias_values.data() : nullptr;
          const Matrix y = run_linear(isa, w, x, M, bias, ldy, blocks);
          const Matrix y_split = run_linear(isa, w, x, M, bias, ldy, blocks / 2);
          EXPECT_TRUE(y.bytes == y_split.bytes) << "splitting the row blocks changed the result";

          double err2 = 0.0, ref2 = 0.0;
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t n = 0; n < c.N; ++n) {
              const double expected = ref[m * c.N + n] + (with_bias ? bias[n] : 0.0);
              const double d = double(y.get(m, n)) - expected;
              err2 += d * d;
              ref2 += expected * expected;
            }
            for (int64_t n = c.N; n < ldy; ++n)
              ASSERT_TRUE(std::isnan(y.get(m, n))) << "wrote past N: row " << m << " column " << n;
          }
          const double rel = std::sqrt(err2 / ref2);
          EXPECT_LE(rel, dtype == DType::F32 ? 1e-5 : 1e-2);  // NaN (a missed output) fails too
        }
      }
    }
  }
}

TEST_P(FusedLinear, MatchesDequantizedMatmul) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  check_against_dequantized_matmul(isa, c, 4);
}

// Int8 weights: the same records with a byte per code (format.h), the float GEMV and tile GEMM.
TEST_P(FusedLinear, Int8WeightsMatchDequantizedMatmul) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  check_against_dequantized_matmul(isa, c, 8);
}

TEST(Int8Prepack, UnprepackRoundTripIsBitExactAndMatchesTheLayout) {
  std::mt19937 rng(8);
  for (const Layout& c : {Layout{16, 64, 32}, Layout{17, 130, 64}, Layout{5, 99, 6}, Layout{1, 1, 1}}) {
    for (const auto& [symmetric, scale_dtype] : symmetry_and_scale_dtypes()) {
      const Weight w = make_weight(c, symmetric, rng, scale_dtype, 8);
      const int64_t groups = groups_of(c.K, c.G);
      for (int64_t n = 0; n < c.N; ++n)  // byte 16 i + l of record (n / 16, g) holds (n, g G + i)
        for (int64_t k = 0; k < c.K; ++k) {
          const uint8_t* rec = group_record(w.packed.data(), w.shape, n / kBlockN, k / c.G);
          ASSERT_EQ(rec[(k % c.G) * kBlockN + n % kBlockN], w.codes[n * c.K + k]) << n << " " << k;
        }
      std::vector<uint8_t> codes(size_t(c.N * c.K));
      std::vector<float> scales(size_t(c.N * groups)), zeros(size_t(c.N * groups));
      cpu::unprepack_int8(w.packed.data(), w.shape, codes.data(), scales.data(), zeros.data());
      EXPECT_EQ(codes, w.codes);
      EXPECT_EQ(scales, w.scales);
      for (int64_t i = 0; i < c.N * groups; ++i) EXPECT_EQ(zeros[i], w.zero(i));
    }
  }
}

// Unit in the last place of v in dtype (bf16: 8 significant bits, fp16: 11, and its subnormals,
// fp32: 24).
double ulp_of(double v, DType dtype) {
  const int bits = dtype == DType::BF16 ? 8 : dtype == DType::F16 ? 11 : 24;
  const int exponent = std::max(std::ilogb(std::max(std::fabs(v), 1e-30)), dtype == DType::F16 ? -14 : -126);
  return std::ldexp(1.0, exponent - (bits - 1));
}

// Every output within an ulp of its dtype of the exact result, plus a float dot product's
// rounding, plus what kernels.h allows the GEMVs' fixed-point x: each value of x within 1 / kMax
// (~2^-15 for bf16 on int16, ~2^-23 for fp16 and fp32 on int24) of its group's largest |x|; bf16
// and fp16 values are exact within 2^6 / 2^11 of it, as are all of them in this test but those
// sharing a group with the 3000 below. x quantized to int8 would miss by ~8 ulps, fp32 x on int16
// by ~2^-15 of the 3000 (the fp32 rows fail then). fp32 and fp16 rows past the ISA's
// kInt24MaxRows run on the float GEMV (or AMX tiles), and rows past its GEMV / GEMM crossover on
// the GEMM, within the same bound. Bf16 x from kBf16DequantizedMinRows rows on the Avx512Bf16 and
// Amx paths meets bf16 weights instead, each within 2^-9 of itself (kernels.h): 2^-9 sum |x w|
// more, and no more (M = 70).
TEST_P(FusedLinear, FixedPointXIsExactToTheOutputsRounding) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(10);
  const Weight w = make_weight(c, false, rng);
  for (int64_t M : {1, 2, 3, 5, 7, 9, 33, 70}) {
    for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
      const double half_step = dtype == DType::BF16 ? 1.0 / (127 * 257) : 1.0 / (127 * 65793);  // of max|x|
      SCOPED_TRACE(std::string("M=") + std::to_string(M) + " " + dtype_name(dtype));
      Matrix x(dtype, M, c.K, 0.f);
      const std::vector<float> xv = random_floats(M * c.K, -1.f, 1.f, rng);
      for (int64_t i = 0; i < M * c.K; ++i) x.set(i / c.K, i % c.K, xv[i]);
      x.set(M - 1, 0, 30.f);  // one large value: the rest of its row sits far below the row's max
      if (M > 1) x.set(0, c.K / 2, 3000.f);
      std::vector<double> magnitudes, grid_slack;
      const std::vector<double> ref = reference_linear(w, x, M, &magnitudes);
      Matrix group_max(DType::F32, M, c.K, 0.f);  // max|x| / kMax of each value's group
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k0 = 0; k0 < c.K; k0 += c.G) {
          float amax = 0.f;
          for (int64_t k = k0; k < std::min(c.K, k0 + c.G); ++k) amax = std::max(amax, std::fabs(x.get(m, k)));
          for (int64_t k = k0; k < std::min(c.K, k0 + c.G); ++k)
            group_max.set(m, k, float(amax * half_step));
        }
      reference_linear(w, group_max, M, &grid_slack);
      const bool bf16_weights = dtype == DType::BF16 && M >= cpu::kBf16DequantizedMinRows &&
                                (isa == Isa::Avx512Bf16 || isa == Isa::Amx);
      const double weight_rounding = bf16_weights ? std::ldexp(1.0, -9) : 0.0;
      const Matrix y = run_linear(isa, w, x, M, nullptr, c.N, w.shape.row_blocks());
      for (int64_t i = 0; i < M * c.N; ++i) {
        const double bound = ulp_of(ref[i], dtype) + (1e-5 + weight_rounding) * magnitudes[i] + grid_slack[i];
        ASSERT_LE(std::fabs(double(y.get(i / c.N, i % c.N)) - ref[i]), bound)
            << "row " << i / c.N << " column " << i % c.N << " reference " << ref[i];
      }
    }
  }
}

// A row of x with a NaN gives NaN outputs, one with an Inf non-finite ones (NaN where the GEMV
// folds the zero point through the sums of x: Inf - Inf), on every path; the other rows are
// unaffected (the vector GEMVs run such rows on floats, the others on their int16 grid).
TEST_P(FusedLinear, NonFiniteRowsStayNonFiniteAndLeaveTheOthers) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(11);
  const Weight w = make_weight(c, false, rng);
  for (int64_t M : {1, 3, 9}) {
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      SCOPED_TRACE(std::string("M=") + std::to_string(M) + " " + dtype_name(dtype));
      Matrix x(dtype, M, c.K, 0.f);
      const std::vector<float> xv = random_floats(M * c.K, -1.f, 1.f, rng);
      for (int64_t i = 0; i < M * c.K; ++i) x.set(i / c.K, i % c.K, xv[i]);
      const std::vector<double> ref = reference_linear(w, x, M);
      x.set(0, c.K - 1, kInf);
      if (M > 2) x.set(2, 0, -kNaN);
      for (float fill : {kNaN, 0.5f}) {  // 0.5: the non-finite rows must not read stale floats
        const Matrix y = run_linear(isa, w, x, M, nullptr, c.N, w.shape.row_blocks(), fill);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < c.N; ++n) {
            if (m == 0) {
              ASSERT_FALSE(std::isfinite(y.get(m, n))) << "row " << m << " column " << n;
            } else if (m == 2) {
              ASSERT_TRUE(std::isnan(y.get(m, n))) << "row " << m << " column " << n;
            } else {
              const double expected = ref[m * c.N + n];
              ASSERT_NEAR(y.get(m, n), expected, ulp_of(expected, dtype == DType::F32 ? DType::F16 : dtype) +
                                                     1e-3 * std::fabs(expected) + 1e-4)
                  << "row " << m << " column " << n;
            }
          }
      }
    }
  }
}

// W^T for a library GEMM: every element (q - z) * s rounded to dtype (the vector paths compute
// it as q * s - z * s in one FMA, as their GEMM does: a few fp32 roundings, then dtype's), the row
// stride's padding and the rows past K untouched, whichever split of the row blocks.
TEST_P(FusedLinear, DequantizeTransposedMatchesTheCanonicalFormula) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(12);
  const int64_t groups = groups_of(c.K, c.G), ldw = c.N + 7;
  for (const auto& [symmetric, scale_dtype] : symmetry_and_scale_dtypes()) {
    const Weight w = make_weight(c, symmetric, rng, scale_dtype);
    for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      SCOPED_TRACE(std::string(symmetric ? "symmetric " : "asymmetric ") + "scales " +
                   dtype_name(scale_dtype) + " " + dtype_name(dtype));
      Matrix wt(dtype, c.K + 1, ldw, kNaN);
      const int64_t split = w.shape.row_blocks() / 2;
      cpu::dequantize_transposed(isa, w.packed.data(), w.shape, wt.bytes.data(), ldw, dtype, 0, split);
      cpu::dequantize_transposed(isa, w.packed.data(), w.shape, wt.bytes.data(), ldw, dtype, split,
                                 w.shape.row_blocks());
      for (int64_t k = 0; k <= c.K; ++k)
        for (int64_t n = 0; n < ldw; ++n) {
          if (k == c.K || n >= c.N) {
            ASSERT_TRUE(std::isnan(wt.get(k, n))) << "wrote outside W^T: row " << k << " column " << n;
            continue;
          }
          const int64_t i = n * groups + k / c.G;
          const double q = w.codes[n * c.K + k], z = w.zero(i), scale = w.scales[i];
          const double exact = (q - z) * scale;
          const double fp32_error = 0x1p-22 * (q + z) * scale;
          const double bound = dtype == DType::F32 ? fp32_error : ulp_of(exact, dtype) + fp32_error;
          ASSERT_LE(std::fabs(double(wt.get(k, n)) - exact), bound) << "row " << k << " column " << n;
        }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllIsas, FusedLinear,
    ::testing::Combine(::testing::ValuesIn(cpu::kAllIsas),
                       ::testing::Values(Layout{3, 100, 32}, Layout{7, 256, 256},
                                         Layout{37, 384, 128}, Layout{64, 1000, 64},
                                         Layout{17, 130, 6}, Layout{20, 33, 33}, Layout{16, 9, 2},
                                         Layout{19, 1100, 1100})),  // a group longer than a K chunk
    [](const ::testing::TestParamInfo<std::tuple<Isa, Layout>>& info) {
      return std::string(cpu::isa_name(std::get<0>(info.param))) + "_" +
             layout_name(std::get<1>(info.param));
    });

// ---- W4A8 ------------------------------------------------------------------------------------------

// x quantized per row as documented in kernels.h (scale max|x| / 127, round half even, +-127),
// then the same double "dequantize, then matmul" as reference_linear.
std::vector<double> reference_linear_a8(const Weight& w, const Matrix& x, int64_t M) {
  Matrix xq(DType::F32, M, w.shape.K, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < w.shape.K; ++k) amax = std::max(amax, std::fabs(x.get(m, k)));
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    for (int64_t k = 0; k < w.shape.K; ++k)
      xq.set(m, k, std::clamp(std::nearbyint(x.get(m, k) / scale), -127.f, 127.f) * scale);
  }
  return reference_linear(w, xq, M);
}

// W4A8's int8 activations of M rows in buffers of their own, filled with what
// prepare_activations_a8 must overwrite (codes 0x55, sums -1, scales NaN), and the view the
// kernels take (it points into the buffers: not copyable).
struct A8Activations {
  std::vector<int8_t> codes;
  std::vector<int32_t> sums;
  std::vector<float> scales;
  cpu::ActivationsA8 acts;
  A8Activations(const PackedShape& shape, int64_t M)
      : codes(size_t(cpu::activation_a8_sizes(shape, M).codes), 0x55),
        sums(size_t(cpu::activation_a8_sizes(shape, M).sums), -1),
        scales(size_t(cpu::activation_a8_sizes(shape, M).scales), kNaN),
        acts{codes.data(), sums.data(), scales.data(), M} {}
  A8Activations(const A8Activations&) = delete;
  A8Activations& operator=(const A8Activations&) = delete;
};

class W4A8Linear : public ::testing::TestWithParam<std::tuple<Isa, Layout>> {};

TEST_P(W4A8Linear, MatchesInt8QuantizedReference) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(8);
  const int64_t ldy = c.N + 3;
  for (const auto& [symmetric, scale_dtype] : symmetry_and_scale_dtypes()) {
    const Weight w = make_weight(c, symmetric, rng, scale_dtype);
    for (int64_t M : {1, 3, 4, 5, 9, 11, 12, 26, 27, 33, 300}) {  // the GEMM from 12 (AVX-512), 24 (AVX2) rows
      SCOPED_TRACE(std::string(symmetric ? "symmetric" : "asymmetric") + " scales " +
                   dtype_name(scale_dtype) + " M=" + std::to_string(M));
      Matrix x(DType::F32, M, c.K, 0.f);
      const std::vector<float> xv = random_floats(M * c.K, -1.f, 1.f, rng);
      for (int64_t i = 0; i < M * c.K; ++i) x.set(i / c.K, i % c.K, xv[i]);
      A8Activations a8(w.shape, M);
      cpu::prepare_activations_a8(isa, x.bytes.data(), DType::F32, c.K, w.shape, a8.acts, 0, M);
      Matrix y(DType::F32, M, ldy, kNaN);
      cpu::linear_a8(isa, a8.acts, w.packed.data(), w.shape, nullptr, y.bytes.data(), DType::F32, ldy,
                     0, w.shape.row_blocks());
      const std::vector<double> ref = reference_linear_a8(w, x, M);
      double err2 = 0.0, ref2 = 0.0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < c.N; ++n) {
          const double d = double(y.get(m, n)) - ref[m * c.N + n];
          err2 += d * d;
          ref2 += ref[m * c.N + n] * ref[m * c.N + n];
        }
      EXPECT_LE(std::sqrt(err2 / ref2), 1e-5);  // integer dot products: exact up to the epilogue
    }
  }
}

// Exact ties (scale 1: x / scale = k + 1/2) round half to even in every path, vector and scalar
// alike (a code off by one moves y by ~1e-3 relative); a row with an Inf or a NaN gets scale NaN
// and leaves the other rows alone.
TEST_P(W4A8Linear, TiesRoundHalfEvenAndNonFiniteRowsAreMarked) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(9);
  const Weight w = make_weight(c, false, rng);
  const int64_t M = 4;
  Matrix x(DType::F32, M, c.K, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < c.K; ++k) x.set(m, k, float(int64_t(rng() % 254) - 127) + 0.5f);
  for (int64_t m = 0; m < M; ++m) x.set(m, (m * 7) % c.K, 127.f);  // max|x| = 127: scale 1
  A8Activations a8(w.shape, M);
  cpu::prepare_activations_a8(isa, x.bytes.data(), DType::F32, c.K, w.shape, a8.acts, 0, M);
  Matrix y(DType::F32, M, c.N, kNaN);
  cpu::linear_a8(isa, a8.acts, w.packed.data(), w.shape, nullptr, y.bytes.data(), DType::F32, c.N, 0,
                 w.shape.row_blocks());
  const std::vector<double> ref = reference_linear_a8(w, x, M);
  double err2 = 0.0, ref2 = 0.0;
  for (int64_t i = 0; i < M * c.N; ++i) {
    const double d = double(y.get(i / c.N, i % c.N)) - ref[i];
    err2 += d * d;
    ref2 += ref[i] * ref[i];
  }
  EXPECT_LE(std::sqrt(err2 / ref2), 1e-6);

  x.set(1, c.K - 1, -std::numeric_limits<float>::infinity());
  x.set(2, 0, std::copysign(kNaN, -1.f));  // sign bit set: still above every finite |x|
  cpu::prepare_activations_a8(isa, x.bytes.data(), DType::F32, c.K, w.shape, a8.acts, 0, M);
  EXPECT_EQ(a8.scales[0], 1.f);
  EXPECT_TRUE(std::isnan(a8.scales[1]));
  EXPECT_TRUE(std::isnan(a8.scales[2]));
  EXPECT_EQ(a8.scales[3], 1.f);
}

// The integer kernels at their extremes: every code 15 and every x at -max|x| makes each byte dot
// product as large as it gets (AVX2 sums vpmaddubsw pairs in int16 over 8 quads of columns, in
// the GEMV and the W4A8 GEMM alike: 8 * 2 * 15 * 128 stays under 2^15; an overflow would wrap).
// W4A8 against its int8 reference, one row (the GEMVs) and 40 (the GEMMs); bf16 x (the int16 grid
// in two planes) against the exact product.
TEST_P(W4A8Linear, IntegerDotProductsHoldTheirExtremes) {
  const auto [isa, c] = GetParam();
  if (!cpu::isa_supported(isa)) GTEST_SKIP() << cpu::isa_name(isa) << " is not supported here";
  std::mt19937 rng(13);
  Weight w = make_weight(c, false, rng);
  std::fill(w.codes.begin(), w.codes.end(), uint8_t(15));
  const std::vector<uint8_t> qweight = reference_pack(w.codes, c.N, c.K);
  cpu::prepack(qweight.data(), w.scales.data(), w.zeros.data(), w.shape, w.packed.data());
  for (float value : {-1.f, -1.984375f}) {  // int16 codes -16384 and -32512 (high byte -127)
    for (int64_t M : {1, 40}) {
      SCOPED_TRACE("bf16 x " + std::to_string(value) + " M=" + std::to_string(M));
      Matrix x(DType::BF16, M, c.K, value);
      A8Activations a8(w.shape, M);
      cpu::prepare_activations_a8(isa, x.bytes.data(), DType::BF16, c.K, w.shape, a8.acts, 0, M);
      Matrix y8(DType::F32, M, c.N, kNaN);
      cpu::linear_a8(isa, a8.acts, w.packed.data(), w.shape, nullptr, y8.bytes.data(), DType::F32, c.N,
                     0, w.shape.row_blocks());
      const std::vector<double> ref8 = reference_linear_a8(w, x, M);
      const std::vector<double> ref = reference_linear(w, x, M);
      const Matrix y16 = run_linear(isa, w, x, M, nullptr, c.N, w.shape.row_blocks());
      for (int64_t i = 0; i < M * c.N; ++i) {
        const int64_t m = i / c.N, n = i % c.N;
        ASSERT_NEAR(y8.get(m, n), ref8[i], 1e-5 * std::fabs(ref8[i]) + 1e-4) << "W4A8, output " << i;
        ASSERT_NEAR(y16.get(m, n), ref[i], ulp_of(ref[i], DType::BF16) + 1e-4) << "bf16 x, output " << i;
      }
    }
  }
  // fp32 x on the int24 grid (the GEMV at M = 1, int8 AMX tiles from 4 rows): -1 and just under -2
  // are codes -2^22 and -8355711 + ..., top digit -127 in every row, against codes 15 everywhere
  for (float value : {-1.f, -1.99999988f}) {
    for (int64_t M : {1, 4}) {
      SCOPED_TRACE("fp32 x " + std::to_string(value) + " M=" + std::to_string(M));
      Matrix x(DType::F32, M, c.K, value);
      const std::vector<double> ref = reference_linear(w, x, M);
      const Matrix y = run_linear(isa, w, x, M, nullptr, c.N, w.shape.row_blocks());
      for (int64_t i = 0; i < M * c.N; ++i)
        ASSERT_NEAR(y.get(i / c.N, i % c.N), ref[i], 1e-6 * std::fabs(ref[i]) + 1e-4) << "output " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllIsas, W4A8Linear,
    ::testing::Combine(::testing::ValuesIn(cpu::kAllIsas),
                       ::testing::Values(Layout{3, 100, 32}, Layout{37, 384, 128},
                                         Layout{64, 1000, 64}, Layout{17, 130, 6},
                                         Layout{19, 1100, 1100})),  // a group longer than a K chunk
    [](const ::testing::TestParamInfo<std::tuple<Isa, Layout>>& info) {
      return std::string(cpu::isa_name(std::get<0>(info.param))) + "_" +
             layout_name(std::get<1>(info.param));
    });

// ---- fp16 / bf16 conversions --------------------------------------------------------------------
TEST(Convert, Bf16KnownValues) {
  EXPECT_EQ(float_to_bf16(1.f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.5f), 0xC020);
  EXPECT_EQ(float_to_bf16(0.f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.f), 0x8000);
  EXPECT_EQ(float_to_bf16(kInf), 0x7F80);
  EXPECT_EQ(float_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to inf
  EXPECT_EQ(float_to_bf16(std::ldexp(1.f, -133)), 0x0001);             // smallest subnormal
  EXPECT_EQ(bf16_to_float(0x0001), std::ldexp(1.f, -133));
  EXPECT_EQ(bf16_to_float(0xC020), -2.5f);
  // ties: 1 + 2^-8 lies halfway between 0x3F80 and 0x3F81 and goes to the even one
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F808000u)), 0x3F80);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F818000u)), 0x3F82);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3F808001u)), 0x3F81);
  // NaN stays NaN, even one whose payload sits only in the bits truncation drops
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(kNaN))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0x7F800001u)))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(bits_to_float(0xFF800001u)))));
}

TEST(Convert, F16KnownValues) {
  EXPECT_EQ(float_to_f16(1.f), 0x3C00);
  EXPECT_EQ(float_to_f16(-2.5f), 0xC100);
  EXPECT_EQ(float_to_f16(65504.f), 0x7BFF);  // largest finite half
  EXPECT_EQ(float_to_f16(65519.f), 0x7BFF);  // just under the tie with 65536
  EXPECT_EQ(float_to_f16(65520.f), 0x7C00);  // the tie goes to even: inf
  EXPECT_EQ(float_to_f16(kInf), 0x7C00);
  EXPECT_EQ(float_to_f16(-kInf), 0xFC00);
  EXPECT_EQ(float_to_f16(-0.f), 0x8000);
  EXPECT_EQ(float_to_f16(std::ldexp(1.f, -14)), 0x0400);      // smallest normal
  EXPECT_EQ(float_to_f16(std::ldexp(1.f, -24)), 0x0001);      // smallest subnormal
  EXPECT_EQ(float_to_f16(-std::ldexp(1023.f, -24)), 0x83FF);  // largest subnormal
  EXPECT_EQ(float_to_f16(std::ldexp(1.f, -25)), 0x0000);      // tie between 0 and 2^-24: even
  EXPECT_EQ(float_to_f16(std::ldexp(3.f, -25)), 0x0002);      // tie between 1 and 2 units: even
  EXPECT_EQ(float_to_f16(std::ldexp(1.f, -26)), 0x0000);
  EXPECT_EQ(float_to_f16(1.f + std::ldexp(1.f, -11)), 0x3C00);  // tie: even
  EXPECT_EQ(float_to_f16(1.f + std::ldexp(3.f, -11)), 0x3C02);  // tie: even
  EXPECT_EQ(f16_to_float(0x7BFF), 65504.f);
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_float(0x8001), -std::ldexp(1.f, -24));
  EXPECT_EQ(f16_to_float(0x7C00), kInf);
  EXPECT_TRUE(std::isnan(f16_to_float(0x7E00)));
  EXPECT_TRUE(std::isnan(f16_to_float(0x7C01)));
  const uint16_t h = float_to_f16(kNaN);
  EXPECT_TRUE((h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0) << std::hex << h;
}

// Exhaustive over the 16-bit formats: every finite value converts back to its own bits, and the
// midpoint between two neighbours rounds to the one with the even bit pattern (just above or
// below it, to the nearer one). Midpoints are exact in fp32, which has more mantissa bits.
template <typename ToFloat, typename FromFloat>
void check_rounding(uint16_t largest_finite, ToFloat to_float, FromFloat from_float) {
  for (uint32_t h = 0; h <= largest_finite; ++h) {
    for (uint16_t sign : {uint16_t(0), uint16_t(0x8000)}) {
      const uint16_t bits = uint16_t(h | sign);
      ASSERT_EQ(from_float(to_float(bits)), bits) << std::hex << bits;
    }
    if (h == largest_finite) break;
    const float lo = to_float(uint16_t(h)), hi = to_float(uint16_t(h + 1));
    const float mid = lo + (hi - lo) / 2;  // lo + hi overflows near the top of bf16
    ASSERT_EQ(from_float(mid), (h % 2 == 0) ? h : h + 1) << std::hex << h;
    ASSERT_EQ(from_float(std::nextafter(mid, kInf)), h + 1) << std::hex << h;
    ASSERT_EQ(from_float(std::nextafter(mid, 0.f)), h) << std::hex << h;
    ASSERT_EQ(from_float(-mid), uint16_t(0x8000 | ((h % 2 == 0) ? h : h + 1))) << std::hex << h;
  }
}

TEST(Convert, F16RoundTripAndTiesExhaustive) {
  check_rounding(0x7BFF, f16_to_float, float_to_f16);
  for (uint32_t nan = 0x7C01; nan <= 0x7FFF; ++nan)
    ASSERT_TRUE(std::isnan(f16_to_float(uint16_t(nan)))) << std::hex << nan;
}

TEST(Convert, Bf16RoundTripAndTiesExhaustive) {
  check_rounding(0x7F7F, bf16_to_float, float_to_bf16);
  for (uint32_t nan = 0x7F81; nan <= 0x7FFF; ++nan) {
    const float f = bf16_to_float(uint16_t(nan));
    ASSERT_TRUE(std::isnan(f)) << std::hex << nan;
    ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f)))) << std::hex << nan;
  }
}

}  // namespace
}  // namespace int4kit
