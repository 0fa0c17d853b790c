// CPU implementations of the int4kit ops: argument checks, then the torch-free kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

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

// The activation buffers of linear(), carved from one per-thread workspace that only grows: a
// fresh multi-megabyte allocation per call would be mmap'ed and page-faulted every time. Plain
// aligned memory, so nothing of torch's is left to destroy at thread or process exit.
Activations activation_workspace(const ActivationSizes& sizes, int64_t M) {
  struct Workspace {
    uint8_t* data = nullptr;
    int64_t bytes = 0;
    ~Workspace() { std::free(data); }
  };
  thread_local Workspace ws;
  const int64_t floats = round_up(sizes.floats, 16), sums = round_up(sizes.sums, 16);
  const int64_t bytes = round_up(4 * (floats + sums) + 2 * sizes.bf16, 64);
  if (ws.bytes < bytes) {
    std::free(ws.data);
    ws.data = static_cast<uint8_t*>(std::aligned_alloc(64, size_t(bytes)));
    TORCH_CHECK(ws.data != nullptr, "int4kit: out of memory for ", bytes, " bytes of activations");
    ws.bytes = bytes;
  }
  return {reinterpret_cast<float*>(ws.data), reinterpret_cast<float*>(ws.data + 4 * floats),
          reinterpret_cast<uint16_t*>(ws.data + 4 * (floats + sums)), M};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& weight,
                                                            int64_t group_size, bool symmetric) {
  check_compute_dtype(weight, "weight");
  check_dim(weight, 2, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t G = effective_group_size(group_size, K);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "int4kit: weight contains NaN or Inf");
  at::Tensor codes = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, num_groups(K, G)}, w.options());
  at::Tensor zeros = at::empty_like(scales);
  quantize_rtn(w.data_ptr<float>(), N, K, G, symmetric, to_kernel_dtype(weight.scalar_type()),
               codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>());
  return {pack_cpu(codes), scales.to(weight.scalar_type()), zeros.to(weight.scalar_type())};
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
  const PackedShape shape{N, K, G};
  const at::Tensor q = qweight.contiguous();
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> z =
      zeros ? c10::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : c10::nullopt;
  at::Tensor packed = at::empty({shape.total_bytes()}, q.options());
  prepack(q.data_ptr<uint8_t>(), s.data_ptr<float>(), z ? z->data_ptr<float>() : nullptr, shape,
          packed.data_ptr<uint8_t>());
  return packed;
}

void check_packed(const at::Tensor& packed, const PackedShape& shape) {
  check_dtype(packed, at::kByte, "packed");
  check_dim(packed, 1, "packed");
  TORCH_CHECK(packed.numel() == shape.total_bytes(), "int4kit: packed has ", packed.numel(),
              " bytes but the CPU layout of N = ", shape.N, ", K = ", shape.K, ", group size ",
              shape.G, " takes ", shape.total_bytes(), "; was it made by int4kit.prepack with "
              "these sizes?");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unprepack_cpu(const at::Tensor& packed, int64_t N,
                                                             int64_t K, int64_t group_size,
                                                             at::ScalarType scale_dtype) {
  TORCH_CHECK(N >= 0, "int4kit: N must be >= 0, got ", N);
  const PackedShape shape{N, K, effective_group_size(group_size, K)};
  check_packed(packed, shape);
  TORCH_CHECK(is_compute_dtype(scale_dtype), "int4kit: scale_dtype must be float32, bfloat16 or "
              "float16, got ", scale_dtype);
  const at::Tensor p = packed.contiguous();
  at::Tensor qweight = at::empty({N, packed_row_bytes(K)}, p.options());
  at::Tensor scales = at::empty({N, shape.groups()}, p.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty_like(scales);
  unprepack(p.data_ptr<uint8_t>(), shape, qweight.data_ptr<uint8_t>(), scales.data_ptr<float>(),
            zeros.data_ptr<float>());
  return {qweight, scales.to(scale_dtype), zeros.to(scale_dtype)};
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t K,
                      int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_compute_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "int4kit: x must have K = ", K,
              " features in its last dimension, got shape ", x.sizes());
  TORCH_CHECK(N >= 0, "int4kit: N must be >= 0, got ", N);
  const PackedShape shape{N, K, effective_group_size(group_size, K)};
  check_packed(packed, shape);
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
  at::Tensor y = at::empty(out_sizes, x.options());
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return y;

  const Isa isa = selected_isa();
  const DType dtype = to_kernel_dtype(x.scalar_type());
  const at::Tensor p = packed.contiguous();
  const ActivationSizes sizes = activation_sizes(isa, shape, M, dtype);
  const Activations acts = activation_workspace(sizes, M);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / shape.padded_k()), [&](int64_t b, int64_t e) {
    prepare_activations(isa, x2.data_ptr(), dtype, K, shape, acts, b, e);
  });
  // a row block costs 16 * Kp * M multiply-adds; hand each thread at least ~1M of them
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / (kBlockN * shape.padded_k() * M));
  const float* bias_ptr = bias ? bias_f.data_ptr<float>() : nullptr;
  at::parallel_for(0, shape.row_blocks(), grain, [&](int64_t b, int64_t e) {
    linear(isa, acts, p.data_ptr<uint8_t>(), shape, bias_ptr, y.data_ptr(), dtype, N, b, e);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(int4kit, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("prepack", &prepack_cpu);
  m.impl("unprepack", &unprepack_cpu);
  m.impl("linear", &linear_cpu);
}

}  // namespace cpu
}  // namespace int4kit
