// Scalar reference of the fused int4 linear on the CPU prepacked layout: the oracle every vector
// path is tested against, and the fallback on CPUs without AVX2. Same arithmetic as the vector
// paths' GEMV: per group, acc = sum_k x[k] * q[k]; y += s * (acc - z * sum_k x[k]).
#include "act_quant.h"
#include "kernels_internal.h"

namespace int4kit {
namespace cpu {
namespace ref {

ActivationSizes activation_sizes(const PackedShape& s, int64_t M, DType) {
  return {M * s.padded_k(), M * s.groups(), 0};
}

void prepare_activations(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t m = m_begin; m < m_end; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t len = s.group_len(g);
      float* dst = a.x + m * Kp + g * Gp;
      float sum = 0.f;
      for (int64_t i = 0; i < Gp; ++i) {
        dst[i] = i < len ? load_as_float(x, dtype, m * ldx + g * s.G + i) : 0.f;
        sum += dst[i];
      }
      a.xsum[m * groups + g] = sum;
    }
  }
}

void linear(const Activations& a, const uint8_t* packed, const PackedShape& s, const float* bias,
            void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t l = 0; l < kBlockN && b * kBlockN + l < s.N; ++l) {
      const int64_t n = b * kBlockN + l;
      for (int64_t m = 0; m < a.M; ++m) {
        float out = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* rec = group_record(packed, s, b, g);
          const uint32_t* words = record_codes(rec);
          const float* xg = a.x + m * Kp + g * Gp;
          float acc = 0.f;
          for (int64_t i = 0; i < Gp; ++i) {
            const uint32_t q = word_code(words[(i / kCodesPerWord) * kBlockN + l], i % kCodesPerWord);
            acc += xg[i] * float(q);
          }
          out += record_scales(rec, s)[l] * (acc - record_zeros(rec, s)[l] * a.xsum[m * groups + g]);
        }
        store_from_float(y, dtype, m * ldy + n, bias ? out + bias[n] : out);
      }
    }
  }
}

void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  quantize_rows_int8(x, dtype, ldx, s, a, m_begin, m_end, [](int i) { return i; });  // natural order
}

void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t l = 0; l < kBlockN && b * kBlockN + l < s.N; ++l) {
      const int64_t n = b * kBlockN + l;
      for (int64_t m = 0; m < a.M; ++m) {
        float out = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* rec = group_record(packed, s, b, g);
          const uint32_t* words = record_codes(rec);
          const int8_t* xg = a.xq + m * Kp + g * Gp;
          int32_t acc = 0;
          for (int64_t i = 0; i < Gp; ++i)
            acc += int32_t(xg[i]) * int32_t(word_code(words[(i / kCodesPerWord) * kBlockN + l], i % kCodesPerWord));
          const float centred = float(acc) - record_zeros(rec, s)[l] * float(a.xq_sum[m * groups + g]);
          out += record_scales(rec, s)[l] * a.scale[m] * centred;
        }
        store_from_float(y, dtype, m * ldy + n, bias ? out + bias[n] : out);
      }
    }
  }
}

}  // namespace ref
}  // namespace cpu
}  // namespace int4kit
