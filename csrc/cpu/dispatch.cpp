// CPU feature detection and the per-ISA dispatch of the fused linear. Compiled without ISA flags.
#include <cpuid.h>

#include <atomic>
#include <cstring>

#include "kernels_internal.h"

namespace int4kit {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Amx: return "amx";
    default: return "scalar";
  }
}

bool parse_isa(const char* name, Isa* out) {
  if (std::strcmp(name, "scalar") == 0) *out = Isa::Scalar;
  else if (std::strcmp(name, "avx2") == 0) *out = Isa::Avx2;
  else if (std::strcmp(name, "avx512") == 0) *out = Isa::Avx512;
  else if (std::strcmp(name, "avx512bf16") == 0) *out = Isa::Avx512Bf16;
  else if (std::strcmp(name, "amx") == 0) *out = Isa::Amx;
  else return false;
  return true;
}

// gcc 12's __builtin_cpu_supports does not know AMX: CPUID leaf 7 EDX bits 24 (tile) and
// 22 (bf16) and 25 (int8).
static bool cpu_has_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return (edx >> 24 & 1) && (edx >> 22 & 1) && (edx >> 25 & 1);
}

bool isa_supported(Isa isa) {
  // __builtin_cpu_supports reads a table the runtime fills once at start-up: cheap to call.
  switch (isa) {
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:  // no AVX-512 BF16 needed: Cascade Lake and Ice Lake run this path too
      return isa_supported(Isa::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
    case Isa::Avx512Bf16:
      return isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512bf16");
    case Isa::Amx: {  // its translation unit is built with the AVX-512 BF16 flags as well
      static const bool ok = isa_supported(Isa::Avx512Bf16) && cpu_has_amx() && amx::request_permission();
      return ok;
    }
    default: return true;
  }
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::Amx)          ? Isa::Amx
                          : isa_supported(Isa::Avx512Bf16) ? Isa::Avx512Bf16
                          : isa_supported(Isa::Avx512)     ? Isa::Avx512
                          : isa_supported(Isa::Avx2)  ? Isa::Avx2
                                                      : Isa::Scalar;
  return best;
}

// Calls `call` (a function call without its namespace) in the namespace of `isa`'s translation
// unit; the scalar reference for Isa::Scalar.
#define INT4KIT_DISPATCH(isa, call)         \
  switch (isa) {                            \
    case Isa::Avx2: return avx2::call;      \
    case Isa::Avx512: return avx512::call;  \
    case Isa::Avx512Bf16: return avx512bf16::call; \
    case Isa::Amx: return amx::call;        \
    default: return ref::call;              \
  }

ActivationSizes activation_sizes(Isa isa, const PackedShape& s, int64_t M, DType dtype) {
  INT4KIT_DISPATCH(isa, activation_sizes(s, M, dtype));
}

void prepare_activations(Isa isa, const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end) {
  INT4KIT_DISPATCH(isa, prepare_activations(x, dtype, ldx, s, a, m_begin, m_end));
}

void prepare_activations_a8(Isa isa, const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  INT4KIT_DISPATCH(isa, prepare_activations_a8(x, dtype, ldx, s, a, m_begin, m_end));
}

void linear_a8(Isa isa, const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end) {
  INT4KIT_DISPATCH(isa, linear_a8(a, packed, s, bias, y, dtype, ldy, block_begin, block_end));
}

void dequantize_transposed(Isa isa, const uint8_t* packed, const PackedShape& s, void* wt,
                           int64_t ldw, DType dtype, int64_t block_begin, int64_t block_end) {
  INT4KIT_DISPATCH(isa, dequantize_transposed(packed, s, wt, ldw, dtype, block_begin, block_end));
}

void linear(Isa isa, const Activations& a, const uint8_t* packed, const PackedShape& s,
            const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
            int64_t block_end) {
  INT4KIT_DISPATCH(isa, linear(a, packed, s, bias, y, dtype, ldy, block_begin, block_end));
}

#undef INT4KIT_DISPATCH

namespace {
std::atomic<int64_t> forced_gemm_min_rows{0};
}  // namespace

void set_gemm_min_rows(int64_t rows) { forced_gemm_min_rows.store(rows, std::memory_order_relaxed); }
int64_t forced_gemm_rows() { return forced_gemm_min_rows.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace int4kit
