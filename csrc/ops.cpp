// Every int4kit op schema, once (TORCH_LIBRARY), and the small Python module the package imports.
// Device implementations register themselves in cpu/ops_cpu.cpp and cuda/ops_cuda.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "int4kit/cuda_layout.h"
#include "int4kit/format.h"
#include "cpu/glue.h"

#ifndef INT4KIT_CUDA_BUILT
#define INT4KIT_CUDA_BUILT 0
#endif

TORCH_LIBRARY(int4kit, m) {
  // codes uint8 [N, K] in 0..15 -> canonical qweight uint8 [N, ceil(K/2)]
  m.def("pack(Tensor codes) -> Tensor");
  m.def("unpack(Tensor qweight, int K) -> Tensor");
  // Round-to-nearest into the canonical format; group_size -1 means per channel. Returns
  // (qweight, scales, zeros); zeros holds 8 everywhere when symmetric.
  m.def("quantize(Tensor weight, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? zeros, int group_size, int K, "
        "ScalarType dtype) -> Tensor");
  // Canonical format -> the device's prepacked layout (CPU: docs/FORMAT.md), and back.
  m.def("prepack(Tensor qweight, Tensor scales, Tensor? zeros, int group_size, int K) -> Tensor");
  m.def("unprepack(Tensor packed, int N, int K, int group_size, ScalarType scale_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  // y[..., N] = x[..., K] . dequant(W)^T + bias, from the prepacked layout.
  m.def("linear(Tensor x, Tensor packed, int N, int K, int group_size, Tensor? bias) -> Tensor");
  // The same with x quantized per row to int8 on the fly (W4A8): integer dot products.
  m.def("linear_w4a8(Tensor x, Tensor packed, int N, int K, int group_size, Tensor? bias) -> Tensor");
  // Int8 weights: canonical qweight uint8 [N, K] (one code per byte, symmetric zero point 128),
  // the same scales and zeros; the device's prepacked layout, and the fused linear on it.
  m.def("prepack_int8(Tensor qweight, Tensor scales, Tensor? zeros, int group_size) -> Tensor");
  m.def("unprepack_int8(Tensor packed, int N, int K, int group_size, ScalarType scale_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_int8(Tensor x, Tensor packed, int N, int K, int group_size, Tensor? bias) -> Tensor");
  // GPTQ's column loop over one sub-block (CPU; python/int4kit/quant/gptq.py): quantizes the rows
  // of w [cols, n] (columns of W^T) in order against scales/zeros [groups, n] rows group_of_col,
  // writing codes and scaled errors, and passes each error on to the later rows of w.
  m.def("gptq_columns(Tensor(a!) w, Tensor hinv, Tensor scales, Tensor zeros, Tensor group_of_col, "
        "Tensor(b!) codes, Tensor(c!) errors, bool fractional, int max_code) -> ()");
}

namespace {
int4kit::DType scale_dtype_named(const std::string& name) {
  if (name == "float32") return int4kit::DType::F32;
  if (name == "bfloat16") return int4kit::DType::BF16;
  if (name == "float16") return int4kit::DType::F16;
  throw std::invalid_argument("scale_dtype must be float32, bfloat16 or float16, got " + name);
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "int4kit native extension: ops live in torch.ops.int4kit";
  m.def("cpu_isa", [] { return std::string(int4kit::cpu::isa_name(int4kit::cpu::selected_isa())); },
        "The CPU path the next linear call takes (INT4KIT_CPU_ISA or the best one detected).");
  m.def("cpu_isa_supported", [](const std::string& name) {
    int4kit::cpu::Isa isa;
    return int4kit::cpu::parse_isa(name.c_str(), &isa) && int4kit::cpu::isa_supported(isa);
  });
  m.def("cpu_isas", [] {
    std::vector<std::string> names;
    for (const int4kit::cpu::Isa isa : int4kit::cpu::kAllIsas)
      names.emplace_back(int4kit::cpu::isa_name(isa));
    return names;
  }, "Every CPU path int4kit has, supported by this CPU or not.");
  // scale_dtype: "float32", "bfloat16" or "float16" (the canonical scales' dtype)
  m.def("cpu_prepacked_bytes", [](int64_t N, int64_t K, int64_t group_size,
                                  const std::string& scale_dtype) {
    return int4kit::PackedShape{N, K, group_size == -1 ? K : group_size,
                                scale_dtype_named(scale_dtype)}.total_bytes();
  }, "Bytes of the CPU prepacked layout; scale_dtype is float32, bfloat16 or float16.");
  m.def("cpu_prepacked_bytes_int8", [](int64_t N, int64_t K, int64_t group_size,
                                       const std::string& scale_dtype) {
    return int4kit::PackedShape{N, K, group_size == -1 ? K : group_size,
                                scale_dtype_named(scale_dtype), 8}.total_bytes();
  }, "Bytes of the CPU prepacked int8 layout; scale_dtype is float32, bfloat16 or float16.");
  m.def("cuda_prepacked_bytes", [](int64_t N, int64_t K, int64_t group_size,
                                   const std::string& scale_dtype) {
    return int4kit::cuda_layout::Shape{N, K, group_size == -1 ? K : group_size,
                                       scale_dtype_named(scale_dtype)}.total_bytes();
  }, "Bytes of the CUDA prepacked layout; scale_dtype is float32, bfloat16 or float16.");
  m.def("cuda_built", [] { return bool(INT4KIT_CUDA_BUILT); },
        "Whether this build carries the CUDA kernels (setup.py defines INT4KIT_CUDA_BUILT).");
}
