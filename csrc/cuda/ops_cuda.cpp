// CUDA implementations of the int4kit ops: argument checks, then the torch-free kernels of
// csrc/cuda/*.cu on the current stream, with every launch checked.
#include <ATen/ATen.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuSPARSE
// and cuBLAS headers, which a bare CUDA toolkit does not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>

#include "checks.h"
#include "int4kit/cuda_kernels.h"
#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace cuda {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "int4kit: CUDA ", what, " launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor pack_cuda(const at::Tensor& codes) {
  check_dtype(codes, at::kByte, "codes");
  check_dim(codes, 2, "codes");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  at::Tensor out = at::empty({N, packed_row_bytes(K)}, c.options());
  at::Tensor bad = at::zeros({1}, c.options().dtype(at::kInt));
  check_launch(pack(c.data_ptr<uint8_t>(), N, K, out.data_ptr<uint8_t>(), bad.data_ptr<int>(),
                    current_stream()),
               "pack");
  TORCH_CHECK(bad.item<int>() == 0, "int4kit: codes must be in 0..15, got a larger value");
  return out;
}

at::Tensor unpack_cuda(const at::Tensor& qweight, int64_t K) {
  check_dtype(qweight, at::kByte, "qweight");
  check_dim(qweight, 2, "qweight");
  TORCH_CHECK(K > 0 && qweight.size(1) == packed_row_bytes(K), "int4kit: K = ", K,
              " does not fit qweight of shape ", qweight.sizes(), " (expected ceil(K/2) columns)");
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor q = qweight.contiguous();
  at::Tensor out = at::empty({q.size(0), K}, q.options());
  check_launch(unpack(q.data_ptr<uint8_t>(), q.size(0), K, out.data_ptr<uint8_t>(), current_stream()),
               "unpack");
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& zeros, int64_t group_size, int64_t K,
                           at::ScalarType dtype) {
  const int64_t G = effective_group_size(group_size, K);
  const int64_t N = check_canonical(qweight, scales, zeros, K, G);
  TORCH_CHECK(is_compute_dtype(dtype), "int4kit: dtype must be float32, bfloat16 or float16, got ",
              dtype);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous();
  const at::Tensor z = zeros ? zeros->contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, K}, s.options().dtype(dtype));
  check_launch(dequantize(q.data_ptr<uint8_t>(), s.data_ptr(), z.defined() ? z.data_ptr() : nullptr,
                          to_kernel_dtype(s.scalar_type()), N, K, G, out.data_ptr(),
                          to_kernel_dtype(dtype), current_stream()),
               "dequantize");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& weight,
                                                             int64_t group_size, bool symmetric) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const QuantizeBuffers b = quantize_buffers(weight, group_size);
  check_launch(quantize(b.w.data_ptr<float>(), b.N, b.K, b.G, symmetric,
                        to_kernel_dtype(weight.scalar_type()), b.codes.data_ptr<uint8_t>(),
                        b.scales.data_ptr<float>(), b.zeros.data_ptr<float>(), current_stream()),
               "quantize");
  return {pack_cuda(b.codes), b.scales.to(weight.scalar_type()), b.zeros.to(weight.scalar_type())};
}

// ---- the CUDA prepacked layout ------------------------------------------------------------------

at::Tensor prepack_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& zeros, int64_t group_size, int64_t K) {
  const int64_t G = effective_group_size(group_size, K);
  const int64_t N = check_canonical(qweight, scales, zeros, K, G);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const cuda_layout::Shape shape{N, K, G, to_kernel_dtype(scales.scalar_type())};
  const at::Tensor q = qweight.contiguous(), s = scales.contiguous();
  const at::Tensor z = zeros ? zeros->contiguous() : at::Tensor();
  at::Tensor packed = at::empty({shape.total_bytes()}, q.options());
  check_launch(prepack(q.data_ptr<uint8_t>(), s.data_ptr(), z.defined() ? z.data_ptr() : nullptr,
                       shape, packed.data_ptr<uint8_t>(), current_stream()),
               "prepack");
  return packed;
}

// The layout's shape for [N, K] / group_size, its scale dtype read from the buffer's size (see the
// footer in cuda_layout.h): no device memory is read, so this is safe inside a CUDA graph.
cuda_layout::Shape packed_shape(const at::Tensor& packed, int64_t N, int64_t K, int64_t group_size) {
  check_dtype(packed, at::kByte, "packed");
  check_dim(packed, 1, "packed");
  TORCH_CHECK(packed.is_contiguous() && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
              "int4kit: packed must be a contiguous, 16-byte aligned buffer as int4kit.prepack returns");
  TORCH_CHECK(N > 0, "int4kit: N (out_features) must be positive, got ", N);
  return layout_of_size<cuda_layout::Shape>(packed, N, K, group_size, "CUDA", "on a CUDA device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unprepack_cuda(const at::Tensor& packed, int64_t N,
                                                               int64_t K, int64_t group_size,
                                                               at::ScalarType scale_dtype) {
  const cuda_layout::Shape shape = packed_shape(packed, N, K, group_size);
  check_unprepack_scale_dtype(shape.scale_dtype, scale_dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor qweight = at::empty({N, packed_row_bytes(K)}, packed.options());
  at::Tensor scales = at::empty({N, shape.groups()}, packed.options().dtype(scale_dtype));
  at::Tensor zeros = at::empty_like(scales);
  check_launch(unprepack(packed.data_ptr<uint8_t>(), shape, qweight.data_ptr<uint8_t>(),
                         scales.data_ptr(), zeros.data_ptr(), current_stream()),
               "unprepack");
  return {qweight, scales, zeros};
}

// ---- linear ---------------------------------------------------------------------------------------

// The largest M the fused kernel takes; above it (and for float32 x or a group size the fused
// kernel cannot read) linear dequantizes into a temporary and calls cuBLAS. INT4KIT_CUDA_FUSED_MAX_M
// overrides it, read on every call so a benchmark can compare both paths in one process.
int64_t fused_max_m() {
  const char* env = std::getenv("INT4KIT_CUDA_FUSED_MAX_M");
  if (env == nullptr || *env == '\0') return 256;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK(*end == '\0' && value >= 0, "int4kit: INT4KIT_CUDA_FUSED_MAX_M=", env,
              " is not a non-negative integer");
  return value;
}

// The fused kernel's tile shape: picked by M, unless INT4KIT_CUDA_TILE names one (read on every
// call, so bench/bench_linear_cuda.py --tile-sweep can time each shape in one process).
int fused_tile(int64_t K, int64_t G) {
  const char* env = std::getenv("INT4KIT_CUDA_TILE");
  if (env == nullptr || *env == '\0') return -1;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  if (*end == '\0' && value >= 0 && value < linear_tile_count() && linear_tile_fits(int(value), K, G))
    return int(value);
  std::string shapes;
  for (int t = 0; t < linear_tile_count(); ++t)
    shapes += "\n  " + std::to_string(t) + ": " + linear_tile_name(t) +
              (linear_tile_fits(t, K, G) ? "" : " (needs one group per 64-column chunk)");
  TORCH_CHECK(false, "int4kit: INT4KIT_CUDA_TILE=", env, " names no tile shape of the fused kernel ",
              "that fits K = ", K, ", group size ", G, "; the shapes are:", shapes);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t K,
                       int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_compute_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "int4kit: x must have K = ", K,
              " features in its last dimension, got shape ", x.sizes());
  check_device(x, packed, "x");
  const cuda_layout::Shape shape = packed_shape(packed, N, K, group_size);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "int4kit: bias must have shape [", N,
                "], got ", bias->sizes());
    check_device(*bias, packed, "bias");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  const at::ScalarType dtype = x.scalar_type();
  const c10::optional<at::Tensor> b =
      bias ? c10::optional<at::Tensor>(bias->to(dtype).contiguous()) : c10::nullopt;

  if (dtype == at::kFloat || M > fused_max_m() || !cuda_layout::fused_group_ok(K, shape.G) ||
      K >= cuda_layout::kMaxK) {
    at::Tensor weight = at::empty({N, K}, x.options());
    check_launch(dequantize_prepacked(packed.data_ptr<uint8_t>(), shape, weight.data_ptr(),
                                      to_kernel_dtype(dtype), current_stream()),
                 "dequantize_prepacked");
    return at::linear(x2, weight, b).reshape(out_sizes);
  }
  // The kernel reads x in whole 64-column chunks of 16-byte pieces: rows padded with zeros to a
  // multiple of 64 elements (a copy only when K is not one already).
  at::Tensor xc = x2.contiguous();
  if (K % cuda_layout::kChunkK != 0 || reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({M, round_up(K, cuda_layout::kChunkK)}, xc.options());
    padded.narrow(1, 0, K).copy_(xc);
    xc = padded;
  }
  at::Tensor out = at::empty({M, N}, x.options());
  // split-K partials, when N alone cannot fill the GPU (from the caching allocator: graph-safe)
  const int tile = fused_tile(K, shape.G);
  const int64_t workspace_floats = linear_workspace_floats(M, shape, tile);
  at::Tensor workspace = workspace_floats ? at::empty({workspace_floats}, x.options().dtype(at::kFloat))
                                          : at::Tensor();
  check_launch(linear(xc.data_ptr(), M, xc.size(1), packed.data_ptr<uint8_t>(), shape,
                      b ? b->data_ptr() : nullptr, out.data_ptr(), to_kernel_dtype(dtype), tile,
                      workspace_floats ? workspace.data_ptr<float>() : nullptr, current_stream()),
               "linear");
  return out.reshape(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(int4kit, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("prepack", &prepack_cuda);
  m.impl("unprepack", &unprepack_cuda);
  m.impl("linear", &linear_cuda);
}

}  // namespace cuda
}  // namespace int4kit
