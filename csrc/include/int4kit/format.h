// int4kit weight formats: the canonical (saved, portable) format and the CPU prepacked layout.
// Torch-free: included by kernels, glue, C++ tests and microbenchmarks. docs/FORMAT.md is the prose
// version of this file; keep the two in step.
#pragma once

#include <cstdint>
#include <cstring>

namespace int4kit {

// ---------------------------------------------------------------------------------------------
// Canonical format, for a weight W of shape [N, K] and group size G (G = K means per channel):
//   qweight uint8 [N, ceil(K/2)]: byte j of row n holds k = 2j in its low nibble, k = 2j+1 in its
//                                 high nibble (an odd K leaves the last high nibble 0). Codes 0..15.
//   scales  [N, ceil(K/G)]        in the compute dtype (fp32, bf16 or fp16).
//   zeros   [N, ceil(K/G)]        same dtype, zero point in code units; absent when symmetric (= 8).
//   w[n, k] = (q[n, k] - zeros[n, k / G]) * scales[n, k / G]
// ---------------------------------------------------------------------------------------------
constexpr int kSymmetricZero = 8;
constexpr int kMaxCode = 15;

// Int8 weights (Int8Linear) use the same scales and zeros, with one code per byte:
//   qweight uint8 [N, K]: qweight[n, k] is the code of w[n, k], 0..255; symmetric zero point 128.
constexpr int kSymmetricZero8 = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline int64_t packed_row_bytes(int64_t K) { return ceil_div(K, 2); }
inline int64_t num_groups(int64_t K, int64_t G) { return ceil_div(K, G); }

inline uint8_t canonical_code(const uint8_t* qweight_row, int64_t k) {
  const uint8_t byte = qweight_row[k >> 1];
  return (k & 1) ? (byte >> 4) : (byte & 0xF);
}

// ---------------------------------------------------------------------------------------------
// Dtypes the kernels read and write (activations, outputs, the prepacked records' scales and zero
// points), and scalar conversions shared by every path (round-to-nearest-even, as torch does).
// ---------------------------------------------------------------------------------------------
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float mag = float(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (au < 0x38800000u) {
    // subnormal half (or zero): the value in units of 2^-24, rounded to nearest even. Adding
    // 0.5 (2^-1) as a float puts the units in the low mantissa bits with the FPU's rounding.
    const float scaled = bits_to_float(au) + 0.5f;
    return uint16_t(sign | uint16_t(float_to_bits(scaled) - float_to_bits(0.5f)));
  }
  uint32_t v = au + 0xfffu + ((au >> 13) & 1u);  // round mantissa to 10 bits, nearest even
  v -= 112u << 23;                                // rebias exponent 127 -> 15
  return uint16_t(sign | uint16_t(v >> 13));
}

inline float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_f16(v); break;
  }
}

// ---------------------------------------------------------------------------------------------
// CPU prepacked layout (what Int4Linear keeps in memory on CPU; never saved).
//
// Rows are taken in blocks of kBlockN = 16 output channels (N padded up to a multiple of 16 with
// all-zero rows). Every group is padded up to Gp = round_up(G, 8) columns with code 0, so each
// group starts on a whole 32-bit word and the kernels never split a word between two groups; the
// activations are laid out with the same padding (zeros), see prepare_activations().
//
// The buffer is one stream per row block: for block b, for group g, a "group record" of
//   Gp/8 words x 16 lanes of uint32   codes: lane l is row 16b+l; word w holds the 8 columns
//                                     k = g*G + 8w + i, i = 0..7, column i at bit nibble_shift(i)
//   16 x scale dtype                  scales of the 16 rows for group g
//   16 x scale dtype                  zero points of the 16 rows for group g (8 when symmetric)
// so a SIMD load of 16 consecutive words gives 8 columns of 16 rows, and each group's scale and
// zero point sit right after their codes in the same sequential stream. The scale dtype is the
// canonical one (fp32, bf16 or fp16), so records hold the canonical values bit for bit; 16-bit
// ones make an M = 1 stream 5.6% shorter at G = 128. After the last block, a footer of 0, 8 or
// 24 zero bytes (fp32, bf16, fp16 scales): the record sizes are multiples of 64, so the three
// totals differ (0, 8, 24 mod 64) and the op glue tells the scale dtype from a buffer's size; and
// no CPU size is a CUDA one (16, 32 or 48 mod 64, cuda_layout.h), so a buffer prepacked for one
// device is refused by the other's ops.
//
// Int8 weights (PackedShape::bits = 8) take the same blocks, groups, records, parameters and
// footer; only a record's codes differ: Gp columns x 16 rows of bytes, byte 16 i + l of the
// record is row 16b+l's code of column k = g*G + i. One 16-byte load (or 8) gives one column of
// the block's rows, which the float GEMV widens to fp32 lanes and multiplies by one x value.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBlockN = 16;
constexpr int64_t kCodesPerWord = 8;

// Column i of a word sits at bits nibble_shift(i)..+3: even columns in the low half-word, odd
// columns in the high half-word (i = 0..7 -> 0, 16, 4, 20, 8, 24, 12, 28). One shift then lines up
// a column pair (2p, 2p+1) in the two 16-bit halves of every lane, the shape that pairwise
// 16-bit dot products (vdpbf16ps, vpmaddwd) consume.
constexpr int nibble_shift(int i) { return 4 * (i / 2) + 16 * (i % 2); }
inline uint32_t word_code(uint32_t word, int64_t i) { return (word >> nibble_shift(int(i))) & 0xF; }

struct PackedShape {
  int64_t N = 0, K = 0, G = 0;  // G is the effective group size (K for per channel)
  DType scale_dtype = DType::F32;  // of the records' scales and zero points
  int bits = 4;                    // 4 (Int4Linear) or 8 (Int8Linear): the records' codes
  int64_t groups() const { return num_groups(K, G); }
  int64_t padded_group() const { return round_up(G, kCodesPerWord); }
  int64_t padded_k() const { return groups() * padded_group(); }
  int64_t row_blocks() const { return ceil_div(N, kBlockN); }
  int64_t words_per_group() const { return padded_group() / kCodesPerWord; }
  int64_t scale_bytes() const { return scale_dtype == DType::F32 ? 4 : 2; }
  // offset of the scales in a group record: they follow the codes (16 rows x Gp codes of `bits`)
  int64_t params_offset() const { return padded_group() * kBlockN * bits / 8; }
  // bytes of one group record: codes, then 16 scales, then 16 zero points (a multiple of 64)
  int64_t group_record_bytes() const {
    return params_offset() + 2 * kBlockN * scale_bytes();
  }
  int64_t row_block_bytes() const { return groups() * group_record_bytes(); }
  int64_t footer_bytes() const {
    return scale_dtype == DType::F32 ? 0 : scale_dtype == DType::BF16 ? 8 : 24;
  }
  int64_t total_bytes() const { return row_blocks() * row_block_bytes() + footer_bytes(); }
  // length of group g in real (unpadded) columns; the last group may be shorter than G
  int64_t group_len(int64_t g) const { return (g + 1) * G <= K ? G : K - g * G; }
};

inline const uint8_t* group_record(const uint8_t* packed, const PackedShape& s, int64_t block,
                                   int64_t g) {
  return packed + block * s.row_block_bytes() + g * s.group_record_bytes();
}
inline uint8_t* group_record(uint8_t* packed, const PackedShape& s, int64_t block, int64_t g) {
  return packed + block * s.row_block_bytes() + g * s.group_record_bytes();
}
inline const uint32_t* record_codes(const uint8_t* rec) {
  return reinterpret_cast<const uint32_t*>(rec);
}
inline uint32_t* record_codes(uint8_t* rec) { return reinterpret_cast<uint32_t*>(rec); }
// The record's 16 scales, then its 16 zero points, in s.scale_dtype.
inline const void* record_params(const uint8_t* rec, const PackedShape& s) {
  return rec + s.params_offset();
}
inline void* record_params(uint8_t* rec, const PackedShape& s) { return rec + s.params_offset(); }
// Indices into record_params: lane l's scale and zero point.
constexpr int64_t scale_index(int64_t lane) { return lane; }
constexpr int64_t zero_index(int64_t lane) { return kBlockN + lane; }
inline float record_scale(const uint8_t* rec, const PackedShape& s, int64_t lane) {
  return load_as_float(record_params(rec, s), s.scale_dtype, scale_index(lane));
}
inline float record_zero(const uint8_t* rec, const PackedShape& s, int64_t lane) {
  return load_as_float(record_params(rec, s), s.scale_dtype, zero_index(lane));
}

}  // namespace int4kit
