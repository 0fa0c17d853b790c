// CUDA implementations of the canonical-format ops (pack, unpack, dequantize). The fused linear and
// the CUDA prepacked layout come with the CUDA kernels issue; until then Int4Linear on a GPU
// dequantizes with this op and calls cuBLAS.
#include <ATen/ATen.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuSPARSE
// and cuBLAS headers, which a bare CUDA toolkit does not ship.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "checks.h"
#include "int4kit/cuda_kernels.h"

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

}  // namespace

TORCH_LIBRARY_IMPL(int4kit, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace cuda
}  // namespace int4kit
