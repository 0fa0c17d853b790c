// Scalar reference of the fused int4 linear on the CPU prepacked layout: the oracle every vector
// path is tested against, and the fallback on CPUs without AVX2. Same arithmetic as the vector
// paths' GEMV: per group, acc = sum_k x[k] * q[k]; y += s * (acc - z * sum_k x[k]).
#include "act_quant.h"
#include "kernels_internal.h"

namespace int4kit {
namespace cpu {
namespace ref {

namespace {

// Lane l's code of column i of a group record, int4 or int8 (format.h).
inline uint32_t record_code(const uint8_t* rec, const PackedShape& s, int64_t l, int64_t i) {
  if (s.bits == 8) return rec[i * kBlockN + l];
  return word_code(record_codes(rec)[(i / kCodesPerWord) * kBlockN + l], i % kCodesPerWord);
}

// y[m, n] = sum over groups of group_term(m, g, codes of row n in group g, scale, zero) (+ bias),
// for the rows of row blocks [block_begin, block_end): the loop both reference linears share.
// code(i) gives row n's code of column i of the group.
template <typename GroupTerm>
void reference_linear(int64_t M, const uint8_t* packed, const PackedShape& s, const float* bias,
                      void* y, DType dtype, int64_t ldy, int64_t block_begin, int64_t block_end,
                      GroupTerm&& group_term) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    for (int64_t l = 0; l < kBlockN && b * kBlockN + l < s.N; ++l) {
      const int64_t n = b * kBlockN + l;
      for (int64_t m = 0; m < M; ++m) {
        float out = 0.f;
        for (int64_t g = 0; g < s.groups(); ++g) {
          const uint8_t* rec = group_record(packed, s, b, g);
          auto code = [&](int64_t i) { return record_code(rec, s, l, i); };
          out += group_term(m, g, code, record_scale(rec, s, l), record_zero(rec, s, l));
        }
        store_from_float(y, dtype, m * ldy + n, bias ? out + bias[n] : out);
      }
    }
  }
}

}  // namespace

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
  reference_linear(a.M, packed, s, bias, y, dtype, ldy, block_begin, block_end,
                   [&](int64_t m, int64_t g, auto code, float scale, float zero) {
                     const float* xg = a.x + m * Kp + g * Gp;
                     float acc = 0.f;
                     for (int64_t i = 0; i < Gp; ++i) acc += xg[i] * float(code(i));
                     return scale * (acc - zero * a.xsum[m * groups + g]);
                   });
}

void prepare_activations_a8(const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end) {
  quantize_rows<ScalarRowOps, Int8Grid>(x, dtype, ldx, s, a, m_begin, m_end, [](int i) { return i; });  // natural order
}

void linear_a8(const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end) {
  const int64_t Kp = s.padded_k(), Gp = s.padded_group(), groups = s.groups();
  reference_linear(a.M, packed, s, bias, y, dtype, ldy, block_begin, block_end,
                   [&](int64_t m, int64_t g, auto code, float scale, float zero) {
                     const int8_t* xg = a.xq + m * Kp + g * Gp;
                     int32_t acc = 0;
                     for (int64_t i = 0; i < Gp; ++i) acc += int32_t(xg[i]) * int32_t(code(i));
                     const float centred = float(acc) - zero * float(a.xq_sum[m * groups + g]);
                     return scale * a.scale[m] * centred;
                   });
}

void dequantize_transposed(const uint8_t* packed, const PackedShape& s, void* wt, int64_t ldw,
                           DType dtype, int64_t block_begin, int64_t block_end) {
  for (int64_t b = block_begin; b < block_end; ++b)
    for (int64_t g = 0; g < s.groups(); ++g) {
      const uint8_t* rec = group_record(packed, s, b, g);
      for (int64_t l = 0; l < kBlockN && b * kBlockN + l < s.N; ++l) {
        const float scale = record_scale(rec, s, l), zero = record_zero(rec, s, l);
        for (int64_t i = 0; i < s.group_len(g); ++i) {
          const float q = float(record_code(rec, s, l, i));
          store_from_float(wt, dtype, (g * s.G + i) * ldw + b * kBlockN + l, (q - zero) * scale);
        }
      }
    }
}

}  // namespace ref
}  // namespace cpu
}  // namespace int4kit
