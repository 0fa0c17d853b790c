// Google Benchmark microbenchmarks of int4kit's torch-free CPU kernels, single-threaded: the
// canonical pack/unpack, the CPU prepack, and the fused linear (int4, W4A8 and int8 weights) on
// every ISA in cpu::kAllIsas that this CPU supports, at model shapes. bytes_per_second counts weight bytes (the int4 weight, or for
// the linear the whole prepacked stream with its scales and zero points); items_per_second counts
// codes, or multiply-adds for the linear. The linear's records hold scales and zero points in the
// activations' dtype, as a model in that dtype has them (bf16 x: 16-bit records, docs/FORMAT.md).
//
//   build/cmake/bench_kernels [--benchmark_filter=linear/avx2]
#include <benchmark/benchmark.h>

#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "int4kit/kernels.h"

namespace int4kit {
namespace {

using cpu::Isa;

constexpr int64_t kGroup = 128;

std::vector<uint8_t> random_codes(int64_t count) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> dist(0, 15);
  std::vector<uint8_t> codes(static_cast<size_t>(count));
  for (auto& c : codes) c = uint8_t(dist(rng));
  return codes;
}

// A random canonical weight [N, K] (asymmetric, group kGroup), built once per shape and shared.
struct CanonicalWeight {
  int64_t N, K;
  std::vector<uint8_t> qweight;
  std::vector<float> scales, zeros;
};

const CanonicalWeight& canonical_weight(int64_t N, int64_t K) {
  static std::map<std::pair<int64_t, int64_t>, CanonicalWeight> cache;
  auto it = cache.find({N, K});
  if (it != cache.end()) return it->second;
  CanonicalWeight w{N, K, std::vector<uint8_t>(size_t(N * packed_row_bytes(K))), {}, {}};
  cpu::pack(random_codes(N * K).data(), N, K, w.qweight.data());
  const int64_t groups = num_groups(K, kGroup);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> scale(0.01f, 0.1f), zero(0.f, 15.f);
  for (int64_t i = 0; i < N * groups; ++i) {
    w.scales.push_back(scale(rng));
    w.zeros.push_back(zero(rng));
  }
  return cache.emplace(std::pair{N, K}, std::move(w)).first->second;
}

const std::vector<uint8_t>& packed_weight(const PackedShape& shape) {
  static std::map<std::tuple<int64_t, int64_t, DType>, std::vector<uint8_t>> cache;
  const std::tuple key{shape.N, shape.K, shape.scale_dtype};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const CanonicalWeight& w = canonical_weight(shape.N, shape.K);
  std::vector<uint8_t> packed(size_t(shape.total_bytes()));
  cpu::prepack(w.qweight.data(), w.scales.data(), w.zeros.data(), shape, packed.data());
  return cache.emplace(key, std::move(packed)).first->second;
}

// The prepacked layout a model with activations in dtype has: records in that dtype.
PackedShape linear_shape(DType dtype, int64_t N, int64_t K) { return {N, K, kGroup, dtype}; }

void BM_pack(benchmark::State& state, int64_t N, int64_t K) {
  const std::vector<uint8_t> codes = random_codes(N * K);
  std::vector<uint8_t> qweight(size_t(N * packed_row_bytes(K)));
  for (auto _ : state) {
    benchmark::DoNotOptimize(cpu::pack(codes.data(), N, K, qweight.data()));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(qweight.size()));
  state.SetItemsProcessed(state.iterations() * N * K);
}

void BM_unpack(benchmark::State& state, int64_t N, int64_t K) {
  const CanonicalWeight& w = canonical_weight(N, K);
  std::vector<uint8_t> codes(size_t(N * K));
  for (auto _ : state) {
    cpu::unpack(w.qweight.data(), N, K, codes.data());
    benchmark::DoNotOptimize(codes.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(w.qweight.size()));
  state.SetItemsProcessed(state.iterations() * N * K);
}

void BM_prepack(benchmark::State& state, int64_t N, int64_t K) {
  const CanonicalWeight& w = canonical_weight(N, K);
  const PackedShape shape{N, K, kGroup};
  std::vector<uint8_t> packed(size_t(shape.total_bytes()));
  for (auto _ : state) {
    cpu::prepack(w.qweight.data(), w.scales.data(), w.zeros.data(), shape, packed.data());
    benchmark::DoNotOptimize(packed.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(w.qweight.size()));
  state.SetItemsProcessed(state.iterations() * N * K);
}

std::vector<float> random_x(DType dtype, int64_t M, int64_t K) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> x(size_t(M * K));  // fp32 storage, large enough for bf16 rows too
  for (int64_t i = 0; i < M * K; ++i) store_from_float(x.data(), dtype, i, dist(rng));
  return x;
}

// Int8 weights (Int8Linear's records, per channel as a mixed plan keeps them), built once per
// shape and shared.
const std::vector<uint8_t>& packed_int8_weight(const PackedShape& shape) {
  static std::map<std::tuple<int64_t, int64_t, DType>, std::vector<uint8_t>> cache;
  const std::tuple key{shape.N, shape.K, shape.scale_dtype};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> code(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.01f);
  std::vector<uint8_t> codes(size_t(shape.N * shape.K));
  for (auto& c : codes) c = uint8_t(code(rng));
  std::vector<float> scales(static_cast<size_t>(shape.N)), zeros(static_cast<size_t>(shape.N), 128.f);
  for (auto& v : scales) v = scale(rng);
  std::vector<uint8_t> packed(size_t(shape.total_bytes()));
  cpu::prepack_int8(codes.data(), scales.data(), zeros.data(), shape, packed.data());
  return cache.emplace(key, std::move(packed)).first->second;
}

// One op as the glue runs it, on one thread: prepare the activations, then every row block; bits
// 8 runs int8 weights.
void BM_linear(benchmark::State& state, Isa isa, DType dtype, int64_t M, int64_t N, int64_t K,
               int bits) {
  const PackedShape shape = bits == 8 ? PackedShape{N, K, K, dtype, 8} : linear_shape(dtype, N, K);
  const std::vector<uint8_t>& packed = bits == 8 ? packed_int8_weight(shape) : packed_weight(shape);
  const std::vector<float> x = random_x(dtype, M, K);
  const cpu::ActivationSizes sizes = cpu::activation_sizes(isa, shape, M, dtype);
  std::vector<float> buffer(size_t(cpu::activation_bytes(sizes, M) / 4));
  std::vector<float> y(size_t(M * N));
  const cpu::Activations acts = cpu::activations_at(reinterpret_cast<uint8_t*>(buffer.data()), sizes, M);
  for (auto _ : state) {
    cpu::prepare_activations(isa, x.data(), dtype, K, shape, acts, 0, M);
    cpu::linear(isa, acts, packed.data(), shape, nullptr, y.data(), dtype, N, 0,
                shape.row_blocks());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(packed.size()));
  state.SetItemsProcessed(state.iterations() * M * N * K);
}

// W4A8 the same way: quantize x per row to int8, then every row block.
void BM_linear_a8(benchmark::State& state, Isa isa, DType dtype, int64_t M, int64_t N, int64_t K) {
  const PackedShape shape = linear_shape(dtype, N, K);
  const std::vector<uint8_t>& packed = packed_weight(shape);
  const std::vector<float> x = random_x(dtype, M, K);
  const cpu::ActivationA8Sizes sizes = cpu::activation_a8_sizes(shape, M);
  std::vector<int8_t> xq(size_t(sizes.codes));
  std::vector<int32_t> xq_sum(size_t(sizes.sums));
  std::vector<float> scale(size_t(sizes.scales));
  std::vector<float> y(size_t(M * N));
  const cpu::ActivationsA8 acts{xq.data(), xq_sum.data(), scale.data(), M};
  for (auto _ : state) {
    cpu::prepare_activations_a8(isa, x.data(), dtype, K, shape, acts, 0, M);
    cpu::linear_a8(isa, acts, packed.data(), shape, nullptr, y.data(), dtype, N, 0,
                   shape.row_blocks());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(packed.size()));
  state.SetItemsProcessed(state.iterations() * M * N * K);
}

void register_benchmarks() {
  constexpr double kMinTime = 0.2;  // seconds; the whole binary stays within a couple of minutes
  const auto add = [](const std::string& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)
        ->Unit(benchmark::kMillisecond)
        ->MinTime(kMinTime);
  };
  add("pack/4096x4096", BM_pack, int64_t(4096), int64_t(4096));
  add("unpack/4096x4096", BM_unpack, int64_t(4096), int64_t(4096));
  add("prepack/4096x4096/g128", BM_prepack, int64_t(4096), int64_t(4096));

  // K x N; 11008 x 4096 has the long K whose x outgrows L2 at M = 128. 2048 x 1024 (1 MiB of
  // codes) stays in L2, so at M = 1 it shows a GEMV's instruction bound rather than memory's.
  const std::pair<int64_t, int64_t> shapes[] = {{2048, 1024}, {4096, 4096}, {4096, 11008}, {11008, 4096}};
  for (Isa isa : cpu::kAllIsas) {
    if (!cpu::isa_supported(isa)) continue;
    for (const auto& [K, N] : shapes) {
      for (int64_t M : {1, 16, 128}) {
        if (K == 2048 && M != 1) continue;
        const std::string tail = "/K" + std::to_string(K) + "xN" + std::to_string(N) + "/M" +
                                 std::to_string(M);
        for (DType dtype : {DType::F32, DType::BF16})
          add(std::string("linear/") + cpu::isa_name(isa) + (dtype == DType::F32 ? "/f32" : "/bf16") + tail,
              BM_linear, isa, dtype, M, N, K, 4);
        if (isa != Isa::Scalar) {
          add(std::string("linear_w4a8/") + cpu::isa_name(isa) + "/bf16" + tail, BM_linear_a8, isa,
              DType::BF16, M, N, K);
          add(std::string("linear_int8/") + cpu::isa_name(isa) + "/bf16" + tail, BM_linear, isa,
              DType::BF16, M, N, K, 8);
        }
      }
    }
  }
}

}  // namespace
}  // namespace int4kit

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int4kit::register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
