// Canonical-format kernels (pack, unpack, quantize, dequantize) and the CPU prepack, in plain C++.
// They run once per weight and are memory-bound, so one scalar implementation serves every ISA.
#include <algorithm>
#include <cmath>

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

Status pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight) {
  const int64_t row_bytes = packed_row_bytes(K);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* src = codes + n * K;
    uint8_t* dst = qweight + n * row_bytes;
    for (int64_t j = 0; j < row_bytes; ++j) {
      const uint8_t lo = src[2 * j];
      const uint8_t hi = (2 * j + 1 < K) ? src[2 * j + 1] : 0;
      if (lo > kMaxCode || hi > kMaxCode) return Status::CodeOutOfRange;
      dst[j] = uint8_t(lo | (hi << 4));
    }
  }
  return Status::Ok;
}

void unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes) {
  const int64_t row_bytes = packed_row_bytes(K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) codes[n * K + k] = canonical_code(qweight + n * row_bytes, k);
}

static float round_to_dtype(float v, DType t) {
  switch (t) {
    case DType::BF16: return bf16_to_float(float_to_bf16(v));
    case DType::F16: return f16_to_float(float_to_f16(v));
    default: return v;
  }
}

void quantize_rtn(const float* w, int64_t N, int64_t K, int64_t G, bool symmetric,
                  DType scale_dtype, uint8_t* codes, float* scales, float* zeros) {
  const int64_t groups = num_groups(K, G);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* wg = w + n * K + g * G;
      const int64_t len = std::min(G, K - g * G);
      float lo = 0.f, hi = 0.f;  // the range always includes 0, so 0 is exactly representable
      for (int64_t i = 0; i < len; ++i) {
        lo = std::min(lo, wg[i]);
        hi = std::max(hi, wg[i]);
      }
      float s, z;
      if (symmetric) {
        s = round_to_dtype(std::max(hi, -lo) / 7.5f, scale_dtype);
        z = float(kSymmetricZero);
      } else {
        s = round_to_dtype((hi - lo) / 15.f, scale_dtype);
        z = 0.f;
      }
      if (!(s > 0.f)) s = 1.f;
      // 0 - lo, not -lo: lo = +0 (no negative weight) must give z = +0, not -0, on every device
      if (!symmetric) z = std::clamp(std::nearbyint((0.f - lo) / s), 0.f, float(kMaxCode));
      scales[n * groups + g] = s;
      zeros[n * groups + g] = z;
      uint8_t* cg = codes + n * K + g * G;
      for (int64_t i = 0; i < len; ++i)
        cg[i] = uint8_t(std::clamp(std::nearbyint(wg[i] / s) + z, 0.f, float(kMaxCode)));
    }
  }
}

void dequantize(const uint8_t* qweight, const float* scales, const float* zeros, int64_t N,
                int64_t K, int64_t G, float* out) {
  const int64_t groups = num_groups(K, G);
  const int64_t row_bytes = packed_row_bytes(K);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / G;
      const float z = zeros ? zeros[n * groups + g] : float(kSymmetricZero);
      const float q = float(canonical_code(qweight + n * row_bytes, k));
      out[n * K + k] = (q - z) * scales[n * groups + g];
    }
  }
}

void prepack(const uint8_t* qweight, const float* scales, const float* zeros,
             const PackedShape& s, uint8_t* packed) {
  std::memset(packed, 0, size_t(s.total_bytes()));  // padding rows and columns: code 0, scale 0
  const int64_t groups = s.groups(), row_bytes = packed_row_bytes(s.K);
  for (int64_t b = 0; b < s.row_blocks(); ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* rec = group_record(packed, s, b, g);
      uint32_t* words = record_codes(rec);
      void* params = record_params(rec, s);
      for (int64_t l = 0; l < kBlockN; ++l) {
        const int64_t n = b * kBlockN + l;
        if (n >= s.N) break;
        store_from_float(params, s.scale_dtype, scale_index(l), scales[n * groups + g]);
        store_from_float(params, s.scale_dtype, zero_index(l),
                         zeros ? zeros[n * groups + g] : float(kSymmetricZero));
        for (int64_t i = 0; i < s.group_len(g); ++i) {
          const uint32_t q = canonical_code(qweight + n * row_bytes, g * s.G + i);
          words[(i / kCodesPerWord) * kBlockN + l] |= q << nibble_shift(int(i % kCodesPerWord));
        }
      }
    }
  }
}

void unprepack(const uint8_t* packed, const PackedShape& s, uint8_t* qweight, float* scales,
               float* zeros) {
  const int64_t groups = s.groups(), row_bytes = packed_row_bytes(s.K);
  std::memset(qweight, 0, size_t(s.N * row_bytes));
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t b = n / kBlockN, l = n % kBlockN;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = group_record(packed, s, b, g);
      const uint32_t* words = record_codes(rec);
      scales[n * groups + g] = record_scale(rec, s, l);
      zeros[n * groups + g] = record_zero(rec, s, l);
      for (int64_t i = 0; i < s.group_len(g); ++i) {
        const int64_t k = g * s.G + i;
        const uint32_t q = word_code(words[(i / kCodesPerWord) * kBlockN + l], i % kCodesPerWord);
        qweight[n * row_bytes + (k >> 1)] |= uint8_t(q << (4 * (k & 1)));
      }
    }
  }
}

// The int8 record's codes: byte 16 i + l is lane l's code of column i (format.h).
void prepack_int8(const uint8_t* codes, const float* scales, const float* zeros,
                  const PackedShape& s, uint8_t* packed) {
  std::memset(packed, 0, size_t(s.total_bytes()));  // padding rows and columns: code 0, scale 0
  const int64_t groups = s.groups();
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t b = n / kBlockN, l = n % kBlockN;
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* rec = group_record(packed, s, b, g);
      void* params = record_params(rec, s);
      store_from_float(params, s.scale_dtype, scale_index(l), scales[n * groups + g]);
      store_from_float(params, s.scale_dtype, zero_index(l),
                       zeros ? zeros[n * groups + g] : float(kSymmetricZero8));
      for (int64_t i = 0; i < s.group_len(g); ++i) rec[i * kBlockN + l] = codes[n * s.K + g * s.G + i];
    }
  }
}

void unprepack_int8(const uint8_t* packed, const PackedShape& s, uint8_t* codes, float* scales,
                    float* zeros) {
  const int64_t groups = s.groups();
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t b = n / kBlockN, l = n % kBlockN;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = group_record(packed, s, b, g);
      scales[n * groups + g] = record_scale(rec, s, l);
      zeros[n * groups + g] = record_zero(rec, s, l);
      for (int64_t i = 0; i < s.group_len(g); ++i) codes[n * s.K + g * s.G + i] = rec[i * kBlockN + l];
    }
  }
}

}  // namespace cpu
}  // namespace int4kit
