// Argument checks shared by the CPU and CUDA glue: every message names the argument and what was
// expected, so a misuse surfaces in Python as a clear RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "int4kit/format.h"

namespace int4kit {

inline DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    default: return DType::F16;
  }
}

inline at::ScalarType to_scalar_type(DType t) {
  return t == DType::F32 ? at::kFloat : t == DType::BF16 ? at::kBFloat16 : at::kHalf;
}

inline bool is_compute_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_compute_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_compute_dtype(t.scalar_type()), "int4kit: ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "int4kit: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "int4kit: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "int4kit: ", name, " is on ", t.device(),
              " but the weight is on ", ref.device());
}

// group_size -1 (per channel) or an even size in [2, K]; returns the effective size (K per channel).
inline int64_t effective_group_size(int64_t group_size, int64_t K) {
  TORCH_CHECK(K > 0, "int4kit: K (in_features) must be positive, got ", K);
  if (group_size == -1) return K;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0, "int4kit: group_size must be -1 (per channel) "
              "or a positive even number, got ", group_size);
  TORCH_CHECK(group_size <= K, "int4kit: group_size ", group_size, " is larger than K = ", K,
              "; use -1 for one group per channel");
  return group_size;
}

// The prepacked layout (format.h's PackedShape or cuda_layout::Shape) of a `packed` buffer for
// [N, K] at group_size: of the three scale dtypes, the one whose layout has the buffer's size (each
// layout's footer makes the sizes differ). `layout` names it in the error ("CPU", "CUDA"),
// `made_on` says where int4kit.prepack must have made it. `extra` are the Shape's further fields
// (the CPU layout's bits).
template <typename Shape, typename... Extra>
Shape layout_of_size(const at::Tensor& packed, int64_t N, int64_t K, int64_t group_size,
                     const char* layout, const char* made_on, Extra... extra) {
  const int64_t G = effective_group_size(group_size, K);
  for (const DType t : {DType::F32, DType::BF16, DType::F16}) {
    const Shape shape{N, K, G, t, extra...};
    if (shape.total_bytes() == packed.numel()) return shape;
  }
  TORCH_CHECK(false, "int4kit: packed has ", packed.numel(), " bytes, which is no ", layout,
              " prepacked layout of N = ", N, ", K = ", K, ", group_size = ", group_size,
              " (expected ", Shape{N, K, G, DType::F32, extra...}.total_bytes(), " with float32 scales or ",
              Shape{N, K, G, DType::BF16, extra...}.total_bytes(), " / ",
              Shape{N, K, G, DType::F16, extra...}.total_bytes(), " with bfloat16 / float16); was "
              "it made by int4kit.prepack", sizeof...(Extra) ? "_int8 " : " ", made_on,
              " with the same N, K and group_size?");
  return {};
}

// unprepack's scale_dtype must be the one the records hold: they keep the canonical scales, so
// another dtype is a mistake, not a cast.
inline void check_unprepack_scale_dtype(DType held, at::ScalarType scale_dtype) {
  TORCH_CHECK(to_scalar_type(held) == scale_dtype, "int4kit: scale_dtype is ", scale_dtype,
              " but packed holds ", to_scalar_type(held), " scales");
}

// Checks the canonical trio against [N, K] / G and returns N; int8's qweight has K columns.
inline int64_t check_canonical(const at::Tensor& qweight, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& zeros, int64_t K, int64_t G,
                               int bits = 4) {
  check_dtype(qweight, at::kByte, "qweight");
  check_dim(qweight, 2, "qweight");
  const int64_t N = qweight.size(0);
  if (bits == 8) {
    TORCH_CHECK(qweight.size(1) == K, "int4kit: int8 qweight must have K = ", K,
                " columns, got shape ", qweight.sizes());
  } else {
    TORCH_CHECK(qweight.size(1) == packed_row_bytes(K), "int4kit: qweight must have ceil(K/2) = ",
                packed_row_bytes(K), " columns for K = ", K, ", got shape ", qweight.sizes());
  }
  check_compute_dtype(scales, "scales");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == num_groups(K, G),
              "int4kit: scales must have shape [", N, ", ", num_groups(K, G), "] (N, ceil(K/G)), got ",
              scales.sizes());
  check_device(scales, qweight, "scales");
  if (zeros) {
    TORCH_CHECK(zeros->sizes() == scales.sizes(), "int4kit: zeros must have the shape of scales ",
                scales.sizes(), ", got ", zeros->sizes());
    TORCH_CHECK(zeros->scalar_type() == scales.scalar_type(), "int4kit: zeros must have the dtype "
                "of scales (", scales.scalar_type(), "), got ", zeros->scalar_type());
    check_device(*zeros, qweight, "zeros");
  }
  return N;
}

// What both quantize ops start from: the checked weight as contiguous fp32 (NaN and Inf
// rejected), and the fp32 outputs of the RTN kernels, on the weight's device: codes uint8 [N, K],
// scales and zeros [N, ceil(K/G)].
struct QuantizeBuffers {
  at::Tensor w, codes, scales, zeros;
  int64_t N, K, G;
};
inline QuantizeBuffers quantize_buffers(const at::Tensor& weight, int64_t group_size) {
  check_compute_dtype(weight, "weight");
  check_dim(weight, 2, "weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t G = effective_group_size(group_size, K);
  at::Tensor w = weight.to(at::kFloat).contiguous();
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "int4kit: weight contains NaN or Inf");
  at::Tensor codes = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, num_groups(K, G)}, w.options());
  at::Tensor zeros = at::empty_like(scales);
  return {w, codes, scales, zeros, N, K, G};
}

}  // namespace int4kit
