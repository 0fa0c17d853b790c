// AVX-512 instantiation of the vector fused linear (linear_simd.h): 16 fp32 lanes, one vector per
// 16-row block, twice the work per instruction of the AVX2 path. Built with the AVX-512 F/BW/VL/
// VNNI flags only (no BF16, so Cascade Lake and Ice Lake run it); dispatch.cpp checks the CPU.
#include <immintrin.h>

// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_ps(), which its flow
// analysis reports as "may be used uninitialized" once inlined: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>
#include <array>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>

#include "act_quant.h"
#include "gemm_blocking.h"
#include "kernels_internal.h"
#include "store_row.h"
#include "simd_avx512.h"

namespace int4kit {
namespace cpu {
namespace avx512 {
namespace {

using Simd = avx512_simd::Simd;

#include "linear_simd.h"

}  // namespace

INT4KIT_SIMD_ENTRY_POINTS

void prepare_x_int24(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                     const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  quantize_rows<SimdRowOps, Int24Grid>(x, dtype, ldx, s, a, m_begin, m_end, a8_position);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace int4kit
