// CPU implementations of the int4kit ops: argument checks, then the torch-free kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "cpu/glue.h"
#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

Isa selected_isa() {
  const char* env = std::getenv("INT4KIT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best_isa();
  Isa isa;
  TORCH_CHECK(parse_isa(env, &isa), "int4kit: INT4KIT_CPU_ISA=", env,
              " is not one of auto, scalar, avx2, avx512, amx");
  TORCH_CHECK(isa_supported(isa), "int4kit: INT4KIT_CPU_ISA=", env,
              " is not supported by this CPU");
  return isa;
}

namespace {

// INT4KIT_GEMM_MIN_ROWS: unset, empty or "auto" for the measured crossovers (0), else a positive
// row count from which int4 linear calls take the GEMM (kernels.h set_gemm_min_rows).
int64_t gemm_min_rows_from_env() {
  const char* env = std::getenv("INT4KIT_GEMM_MIN_ROWS");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return 0;
  char* end = nullptr;
  const long long rows = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && rows > 0, "int4kit: INT4KIT_GEMM_MIN_ROWS=", env,
              " is not auto or a positive number of rows");
  return rows;
}

// Per-thread scratch memory that only grows: a fresh multi-megabyte allocation per call would be
// mmap'ed and page-faulted every time (32 MB: ~7.5 ms of faults against ~0.9 ms to write it).
// Plain aligned memory, so nothing of torch's is left to destroy at thread or process exit.
struct Workspace {
  uint8_t* data = nullptr;
  int64_t bytes = 0;
  ~Workspace() { std::free(data); }
  uint8_t* at_least(int64_t wanted, const char* what) {
    wanted = round_up(std::max<int64_t>(wanted, 64), 64);
    if (bytes < wanted) {
      std::free(data);
      data = static_cast<uint8_t*>(std::aligned_alloc(64, size_t(wanted)));
      bytes = data ? wanted : 0;
      TORCH_CHECK(data != nullptr, "int4kit: out of memory for ", wanted, " bytes of ", what);
    }
    return data;
  }
};
// the activation buffers of the linear ops
uint8_t* thread_workspace(int64_t bytes) {
  thread_local Workspace ws;
  return ws.at_least(bytes, "activations");
}

Activations activation_workspace(const ActivationSizes& sizes, int64_t M) {
  return activations_at(thread_workspace(activation_bytes(sizes, M)), sizes, M);
}

ActivationsA8 activation_a8_workspace(const ActivationA8Sizes& sizes, int64_t M) {
  return activations_a8_at(thread_workspace(activation_a8_bytes(sizes, M)), sizes, M);
}

at::Tensor pack_cpu(const at::Tensor& codes) {
  check_dtype(codes, at::kByte, "codes");
  check_dim(codes, 2, "codes");
  const at::Tensor c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  at::Tensor out = at::empty({N, packed_row_bytes(K)}, c.options());
  const Status st = pack(c.data_ptr<uint8_t>(), N, K, out.data_ptr<uint8_t>());
  TORCH_CHECK(st == Status::Ok, "int4kit: codes must be in 0..15, got a larger value");
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& qweight, int64_t K) {
  check_dtype(qweight, at::kByte, "qweight");
  check_dim(qweight, 2, "qweight");
  TORCH_CHECK(K > 0 && qweight.size(1) == packed_row_bytes(K), "int4kit: K = ", K,
              " does not fit qweight of shape ", qweight.sizes(), " (expected ceil(K/2) columns)");
  const at::Tensor q = qweight.contiguous();
  at::Tensor out = at::empty({q.size(0), K}, q.options());
  unpack(q.data_ptr<uint8_t>(), q.size(0), K, out.data_ptr<uint8_t>());
  return out;
}

// Rows go through in chunks of about 64 MiB of fp32: quantizing a weight needs its own bytes, the
// outputs and one chunk. (A whole fp32 copy, its finiteness mask and a byte per code came to ~4x
// a bf16 weight: 16 GiB more for a 65536 x 32768 one, tests/test_huge.py.) Rows are quantized
// independently, so the result is the same as in one piece.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& weight,
                                                            int64_t group_size, bool symmetric) {
  check_compute_dtype(weight, "weight");
  check_dim(weight, 2, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t G = effective_group_size(group_size, K);
  const int64_t groups = num_groups(K, G);
  at::Tensor qweight = at::empty({N, packed_row_bytes(K)}, weight.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, groups}, weight.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty_like(scales);
  const int64_t rows = std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, 4 * K));
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    const at::Tensor w = weight.narrow(0, r0, n).to(at::kFloat).contiguous();
    TORCH_CHECK(at::isfinite(w).all().item<bool>(), "int4kit: weight contains NaN or Inf");
    at::Tensor codes = at::empty({n, K}, qweight.options());
    quantize_rtn(w.data_ptr<float>(), n, K, G, symmetric, to_kernel_dtype(weight.scalar_type()),
                 codes.data_ptr<uint8_t>(), scales.data_ptr<float>() + r0 * groups,
                 zeros.data_ptr<float>() + r0 * groups);
    qweight.narrow(0, r0, n).copy_(pack_cpu(codes));
  }
  return {qweight, scales.to(weight.scalar_type()), zeros.to(weight.scalar_type())};
}

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& zeros, int64_t group_size, int64_t K,
                          at::ScalarType dtype) {
  const int64_t G = effective_group_size(group_size, K);
  const int64_t N = check_canonical(qweight, scales, zeros, K, G);
  TORCH_CHECK(is_compute_dtype(dtype), "int4kit: dtype must be float32, bfloat16 or float16, got ",
              dtype);
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> z =
      zeros ? c10::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : c10::nullopt;
  at::Tensor out = at::empty({N, K}, s.options());
  dequantize(q.data_ptr<uint8_t>(), s.data_ptr<float>(), z ? z->data_ptr<float>() : nullptr, N, K,
             G, out.data_ptr<float>());
  return out.to(dtype);
}

at::Tensor prepack_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group_size, int64_t K) {
  const int64_t G = effective_group_size(group_size, K);
  const int64_t N = check_canonical(qweight, scales, zeros, K, G);
  const PackedShape shape{N, K, G, to_kernel_dtype(scales.scalar_type())};
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> z =
      zeros ? c10::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : c10::nullopt;
  at::Tensor packed = at::empty({shape.total_bytes()}, q.options());
  prepack(q.data_ptr<uint8_t>(), s.data_ptr<float>(), z ? z->data_ptr<float>() : nullptr, shape,
          packed.data_ptr<uint8_t>());
  return packed;
}

// The layout of a CPU prepacked buffer of int4 (bits 4) or int8 codes: its scale dtype follows
// from its size (the footer in format.h).
PackedShape packed_shape(const at::Tensor& packed, int64_t N, int64_t K, int64_t group_size,
                         int bits = 4) {
  check_dtype(packed, at::kByte, "packed");
  check_dim(packed, 1, "packed");
  TORCH_CHECK(N >= 0, "int4kit: N must be >= 0, got ", N);
  if (bits == 8) return layout_of_size<PackedShape>(packed, N, K, group_size, "CPU int8", "on the CPU", 8);
  return layout_of_size<PackedShape>(packed, N, K, group_size, "CPU", "on the CPU");
}

// ---- int8 weights: canonical qweight uint8 [N, K] (format.h) --------------------------------------
at::Tensor prepack_int8_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& zeros, int64_t group_size) {
  check_dim(qweight, 2, "qweight");
  const int64_t K = qweight.size(1);
  const int64_t G = effective_group_size(group_size, K);
  const int64_t N = check_canonical(qweight, scales, zeros, K, G, /*bits=*/8);
  const PackedShape shape{N, K, G, to_kernel_dtype(scales.scalar_type()), 8};
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> z =
      zeros ? c10::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : c10::nullopt;
  at::Tensor packed = at::empty({shape.total_bytes()}, q.options());
  prepack_int8(q.data_ptr<uint8_t>(), s.data_ptr<float>(), z ? z->data_ptr<float>() : nullptr,
               shape, packed.data_ptr<uint8_t>());
  return packed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unprepack_int8_cpu(const at::Tensor& packed,
                                                                  int64_t N, int64_t K,
                                                                  int64_t group_size,
                                                                  at::ScalarType scale_dtype) {
  const PackedShape shape = packed_shape(packed, N, K, group_size, 8);
  TORCH_CHECK(is_compute_dtype(scale_dtype), "int4kit: scale_dtype must be float32, bfloat16 or "
              "float16, got ", scale_dtype);
  check_unprepack_scale_dtype(shape.scale_dtype, scale_dtype);
  const at::Tensor p = packed.contiguous();
  at::Tensor codes = at::empty({N, K}, p.options());
  at::Tensor scales = at::empty({N, shape.groups()}, p.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty_like(scales);
  unprepack_int8(p.data_ptr<uint8_t>(), shape, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                 zeros.data_ptr<float>());
  return {codes, scales.to(scale_dtype), zeros.to(scale_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unprepack_cpu(const at::Tensor& packed, int64_t N,
                                                             int64_t K, int64_t group_size,
                                                             at::ScalarType scale_dtype) {
  const PackedShape shape = packed_shape(packed, N, K, group_size);
  TORCH_CHECK(is_compute_dtype(scale_dtype), "int4kit: scale_dtype must be float32, bfloat16 or "
              "float16, got ", scale_dtype);
  check_unprepack_scale_dtype(shape.scale_dtype, scale_dtype);
  const at::Tensor p = packed.contiguous();
  at::Tensor qweight = at::empty({N, packed_row_bytes(K)}, p.options());
  at::Tensor scales = at::empty({N, shape.groups()}, p.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty_like(scales);
  unprepack(p.data_ptr<uint8_t>(), shape, qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
            zeros.data_ptr<float>());
  return {qweight, scales.to(scale_dtype), zeros.to(scale_dtype)};
}

// Calls from several Python threads at once would each start a team of torch.get_num_threads()
// OpenMP threads and oversubscribe the cores. While another linear call is in flight, a call runs
// its work on the calling thread alone; the first call keeps the thread team.
class ThreadBudget {
 public:
  ThreadBudget() : alone_(in_flight_.fetch_add(1) == 0) {}
  ~ThreadBudget() { in_flight_.fetch_sub(1); }
  ThreadBudget(const ThreadBudget&) = delete;
  ThreadBudget& operator=(const ThreadBudget&) = delete;

  bool alone() const { return alone_; }
  // fn(begin, end) over [0, count): in parallel chunks of at least `grain` when this call is alone
  template <typename Fn>
  void run(int64_t count, int64_t grain, Fn&& fn) const {
    if (alone_) at::parallel_for(0, count, grain, fn);
    else if (count > 0) fn(int64_t(0), count);
  }

 private:
  static inline std::atomic<int> in_flight_{0};
  const bool alone_;
};

// A row block costs 16 * Kp * M multiply-adds and row_block_bytes() of weights; each thread gets
// at least ~1M multiply-adds or, where the weight stream dominates (small M), ~64 KiB of weights.
// (MACs alone kept a 2048 x 256 GEMV, 295 KB of weights, on one thread: 41 us at 7 GB/s.)
int64_t row_block_grain(const PackedShape& shape, int64_t M) {
  const int64_t by_work = (int64_t(1) << 20) / (kBlockN * shape.padded_k() * M);
  const int64_t by_bytes = (int64_t(64) << 10) / shape.row_block_bytes();
  return std::max<int64_t>(1, std::min(by_work, by_bytes));
}
int64_t row_grain(const PackedShape& shape) { return std::max<int64_t>(1, 16384 / shape.padded_k()); }

// W4A16 and W4A8 share everything but their activation buffers and kernels; W8A16 is W4A16 on
// int8 records.
struct W4A16 {
  static constexpr int kBits = 4;
  using Acts = Activations;
  static Acts workspace(Isa isa, const PackedShape& s, int64_t M, DType dtype) {
    return activation_workspace(activation_sizes(isa, s, M, dtype), M);
  }
  static constexpr auto prepare = &prepare_activations;
  static constexpr auto compute = &linear;
};
struct W8A16 : W4A16 {  // the same kernels, on int8 records (PackedShape::bits)
  static constexpr int kBits = 8;
};
struct W4A8 {
  static constexpr int kBits = 4;
  using Acts = ActivationsA8;
  static Acts workspace(Isa, const PackedShape& s, int64_t M, DType) {
    return activation_a8_workspace(activation_a8_sizes(s, M), M);
  }
  static constexpr auto prepare = &prepare_activations_a8;
  static constexpr auto compute = &linear_a8;
};

// From M = 1024 rows of bf16 or fp32 x the fused kernels, compute-bound, lose to torch's own GEMM
// (oneDNN's AMX bf16, MKL's fp32) by more than it costs to dequantize the weight for it
// (~0.25 ns a weight into bf16 at two threads). Two threads, F.linear = 1 (bf16 / fp32):
//   shape (N x K)    M      fused          dequantize + GEMM
//   1536 x 384    1900   0.43x / 0.76x    1.27x / 0.92x     (all-MiniLM-L6-v2's FFN)
//   384 x 1536    1900   0.41x / 0.73x    1.01x / 1.00x
//   4096 x 4096   1024   0.51x / 0.64x    0.70x / 0.90x
//   4096 x 11008  1024   0.68x / 0.72x    0.82x / 0.92x
//   11008 x 4096  1024   0.76x / 0.97x    0.72x / 0.92x     (the one shape where it loses)
//   4096 x 4096    512   0.84x / 0.84x    0.63x / 0.82x
// fp16 x keeps the fused kernels (torch's fp16 GEMM here is slower than they are); so does the
// scalar path, the reference, and a call that shares the CPU with another (ThreadBudget): torch's
// GEMM would start its own thread team. So does bf16 x on a CPU without AVX-512 BF16, where
// torch has no fast bf16 GEMM either (Xeon with AVX-512 but no BF16, AVX2 path, two threads,
// 4096 x 4096 at M = 1024, bf16: F.linear 562 ms, dequantize + GEMM 586 ms (int4) and 574 ms
// (int8), the fused tile GEMM 221 ms; docs/benchmarks.md). The other paths are forced for tests,
// so the CPU is asked, not the path. And so does the avx512bf16 path (AMD Zen 4/5), where torch's
// GEMMs are no match for its kernels: its vdpbf16ps GEMM for bf16 x, the int24 GEMV for fp32 x
// (AMD EPYC Zen 5, two threads, ms at M = 1023 fused, 1024 dequantize + GEMM: bf16 4096 x 11008
// 113-123 / 145-164, 11008 x 4096 123-127 / 137, 4096 x 4096 43 / 52, MiniLM's FFN 1.7-1.8 /
// 1.6-1.8; fp32 4096 x 11008 250 / 562, 11008 x 4096 284 / 546, F.linear fp32 547 and 574).
constexpr int64_t kLibraryGemmMinRows = 1024;
bool use_library_gemm(Isa isa, int64_t M, DType dtype, const ThreadBudget& threads) {
  static const bool fast_bf16_gemm = __builtin_cpu_supports("avx512bf16");
  if (isa == Isa::Avx512Bf16 || (dtype == DType::BF16 && !fast_bf16_gemm)) return false;
  return M >= kLibraryGemmMinRows && dtype != DType::F16 && isa != Isa::Scalar && threads.alone();
}

// y = x2 . W^T (+ bias) by torch's own GEMM on the dequantized weight (use_library_gemm).
at::Tensor library_gemm(const at::Tensor& x2, const at::Tensor& weights, const PackedShape& shape,
                        Isa isa, DType dtype, const at::Tensor& bias_f, const ThreadBudget& threads) {
  // rows an odd number of cache lines apart (see dequantize_transposed): a 4096-wide fp32 W^T
  // dequantized at 3.5 ns a weight with rows 16 KiB apart
  const int64_t element = x2.element_size();
  int64_t row_bytes = round_up(shape.N * element, 64);
  if ((row_bytes / 64) % 2 == 0) row_bytes += 64;
  const int64_t ldw = row_bytes / element;
  thread_local Workspace dense;  // the largest layer's dequantized weight, reused across calls
  at::Tensor wt = at::from_blob(dense.at_least(shape.K * row_bytes, "dequantized weights"),
                                {shape.K, shape.N}, {ldw, 1}, x2.options());
  threads.run(shape.row_blocks(), row_block_grain(shape, 1),  // one pass over the weights, as a GEMV
              [&](int64_t b, int64_t e) {
                dequantize_transposed(isa, weights.data_ptr<uint8_t>(), shape, wt.data_ptr(), ldw, dtype, b, e);
              });
  return bias_f.defined() ? at::addmm(bias_f.to(x2.scalar_type()), x2, wt) : at::mm(x2, wt);
}

// y[..., N] = x[..., K] . W^T + bias: checks, then the activations are prepared in parallel over
// rows of x and the output computed in parallel over row blocks of W.
template <typename Kind>
at::Tensor run_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t K,
                      int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_compute_dtype(x, "x");
  const PackedShape shape = packed_shape(packed, N, K, group_size, Kind::kBits);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "int4kit: x must have K = ", K,
              " features in its last dimension, got shape ", x.sizes());
  check_device(x, packed, "x");
  at::Tensor bias_f;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "int4kit: bias must have shape [", N,
                "], got ", bias->sizes());
    check_compute_dtype(*bias, "bias");
    check_device(*bias, packed, "bias");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::empty(out_sizes, x.options());

  const Isa isa = selected_isa();
  set_gemm_min_rows(gemm_min_rows_from_env());
  const DType dtype = to_kernel_dtype(x.scalar_type());
  const ThreadBudget threads;
  if constexpr (!std::is_same_v<Kind, W4A8>) {
    if (use_library_gemm(isa, M, dtype, threads))
      return library_gemm(x2, packed.contiguous(), shape, isa, dtype, bias_f, threads).view(out_sizes);
  }
  at::Tensor y = at::empty(out_sizes, x.options());
  const typename Kind::Acts acts = Kind::workspace(isa, shape, M, dtype);
  threads.run(M, row_grain(shape), [&](int64_t b, int64_t e) {
    Kind::prepare(isa, x2.data_ptr(), dtype, K, shape, acts, b, e);
  });
  if constexpr (std::is_same_v<Kind, W4A8>)  // the quantizer marks non-finite rows (ActivationsA8)
    TORCH_CHECK(std::none_of(acts.scale, acts.scale + M, [](float s) { return std::isnan(s); }),
                "int4kit: x contains NaN or Inf, which int8 activation quantization cannot represent");
  const float* bias_ptr = bias ? bias_f.data_ptr<float>() : nullptr;
  const at::Tensor weights = packed.contiguous();
  threads.run(shape.row_blocks(), row_block_grain(shape, M), [&](int64_t b, int64_t e) {
    Kind::compute(isa, acts, weights.data_ptr<uint8_t>(), shape, bias_ptr, y.data_ptr(), dtype, N,
                  b, e);
  });
  return y;
}

// One sub-block of a GPTQ pass (kernels.h gptq_columns): w, codes, errors [cols, n], written in
// place, so they need unit stride along n (views into the pass's buffers are fine); hinv
// [cols, cols], scales and zeros [groups, n] and group_of_col int64 [cols] are read (any layout).
void gptq_columns_cpu(const at::Tensor& w, const at::Tensor& hinv, const at::Tensor& scales,
                      const at::Tensor& zeros, const at::Tensor& group_of_col,
                      const at::Tensor& codes, const at::Tensor& errors, bool fractional,
                      int64_t max_code) {
  const at::ScalarType t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, "int4kit: w must be float32 or float64, got ", t);
  check_dim(w, 2, "w");
  const int64_t cols = w.size(0), n = w.size(1);
  const std::pair<const at::Tensor*, const char*> matrices[] = {
      {&w, "w"}, {&hinv, "hinv"}, {&scales, "scales"}, {&zeros, "zeros"}, {&codes, "codes"},
      {&errors, "errors"}};
  for (const auto& [tensor, name] : matrices) {
    check_dim(*tensor, 2, name);
    check_device(*tensor, w, name);
    check_dtype(*tensor, tensor == &codes ? at::kByte : t, name);
  }
  TORCH_CHECK(hinv.size(0) == cols && hinv.size(1) == cols, "int4kit: hinv must be [", cols, ", ",
              cols, "], got ", hinv.sizes());
  TORCH_CHECK(codes.sizes() == w.sizes() && errors.sizes() == w.sizes(), "int4kit: codes and "
              "errors must have w's shape ", w.sizes(), ", got ", codes.sizes(), " and ",
              errors.sizes());
  TORCH_CHECK(scales.size(1) == n && zeros.sizes() == scales.sizes(), "int4kit: scales and zeros "
              "must be [groups, ", n, "], got ", scales.sizes(), " and ", zeros.sizes());
  for (const auto& [tensor, name] : {matrices[0], matrices[4], matrices[5]})  // w, codes, errors
    TORCH_CHECK(tensor->stride(1) == 1 || n <= 1, "int4kit: ", name, " must have unit stride in "
                "its last dimension, got strides ", tensor->strides());
  check_dtype(group_of_col, at::kLong, "group_of_col");
  TORCH_CHECK(group_of_col.dim() == 1 && group_of_col.size(0) == cols, "int4kit: group_of_col must "
              "be [", cols, "], got ", group_of_col.sizes());
  TORCH_CHECK(max_code >= 1 && max_code <= 255, "int4kit: max_code must be in 1..255, got ",
              max_code);
  const at::Tensor groups = group_of_col.contiguous();
  const int64_t* g = groups.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(g, g + cols, [&](int64_t v) { return v >= 0 && v < scales.size(0); }),
              "int4kit: group_of_col must index the ", scales.size(0), " rows of scales");
  if (cols == 0 || n == 0) return;
  // the read-only inputs in one layout (no copy when they have it): scales and zeros share ldsz
  const at::Tensor h = hinv.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  // entries of n are independent: split them between threads, 256 or more each
  AT_DISPATCH_FLOATING_TYPES(t, "gptq_columns", [&] {
    at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
      gptq_columns(w.data_ptr<scalar_t>() + b, w.stride(0), h.data_ptr<scalar_t>(), cols,
                   s.data_ptr<scalar_t>() + b, z.data_ptr<scalar_t>() + b, n, g,
                   codes.data_ptr<uint8_t>() + b, codes.stride(0),
                   errors.data_ptr<scalar_t>() + b, errors.stride(0), cols, e - b, fractional,
                   int(max_code));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(int4kit, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("prepack", &prepack_cpu);
  m.impl("unprepack", &unprepack_cpu);
  m.impl("linear", &run_linear<W4A16>);
  m.impl("linear_w4a8", &run_linear<W4A8>);
  m.impl("prepack_int8", &prepack_int8_cpu);
  m.impl("unprepack_int8", &unprepack_int8_cpu);
  m.impl("linear_int8", &run_linear<W8A16>);
  m.impl("gptq_columns", &gptq_columns_cpu);
}

}  // namespace cpu
}  // namespace int4kit
