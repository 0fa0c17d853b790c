// Per-ISA entry points behind the dispatcher in dispatch.cpp. Each ISA lives in its own translation
// unit, compiled with that ISA's -m flags only, so nothing here may be inlined across ISAs.
#pragma once

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

#define INT4KIT_DECLARE_ISA(ns)                                                               \
  namespace ns {                                                                              \
  ActivationSizes activation_sizes(const PackedShape& s, int64_t M, DType dtype);             \
  void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,     \
                           const Activations& a, int64_t m_begin, int64_t m_end);             \
  void linear(const Activations& a, const uint8_t* packed, const PackedShape& s,              \
              const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,      \
              int64_t block_end);                                                             \
  void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,  \
                              const ActivationsA8& a, int64_t m_begin, int64_t m_end);        \
  void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,         \
                 const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,   \
                 int64_t block_end);                                                          \
  void dequantize_transposed(const uint8_t* packed, const PackedShape& s, void* wt,           \
                             int64_t ldw, DType dtype, int64_t block_begin, int64_t block_end); \
  }

INT4KIT_DECLARE_ISA(ref)
INT4KIT_DECLARE_ISA(avx2)
INT4KIT_DECLARE_ISA(avx512)
INT4KIT_DECLARE_ISA(avx512bf16)
INT4KIT_DECLARE_ISA(amx)

namespace avx512 {
// Rows [m_begin, m_end) of x on the int24 grid (Activations::xint's three planes, act_quant.h's
// Int24Grid) for any M: what the AMX path's int8 tiles read for fp32 and fp16 x (the GEMV's
// prepare_activations makes the same planes for its few rows).
void prepare_x_int24(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                     const ActivationsA8& a, int64_t m_begin, int64_t m_end);
}  // namespace avx512

namespace amx {
// Asks the kernel for the AMX tile state (once per process); false when refused.
bool request_permission();
}  // namespace amx

#undef INT4KIT_DECLARE_ISA

}  // namespace cpu
}  // namespace int4kit
