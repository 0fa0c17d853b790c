// Raw-pointer CPU kernels of int4kit. No ATen here: the torch glue (csrc/cpu/ops_cpu.cpp), the
// C++ tests and the microbenchmarks all call these. Preconditions (shapes, code ranges, group size)
// are checked by the caller; functions that can meet bad data return a Status.
#pragma once

#include <cstdint>

#include "int4kit/format.h"

namespace int4kit {

enum class Status : int { Ok = 0, CodeOutOfRange = 1 };

namespace cpu {

// ---- canonical format (scalar; memory-bound and run once per weight) -------------------------
// codes uint8 [N, K] (each 0..15) -> qweight uint8 [N, ceil(K/2)]
Status pack(const uint8_t* codes, int64_t N, int64_t K, uint8_t* qweight);
// qweight [N, ceil(K/2)] -> codes [N, K]
void unpack(const uint8_t* qweight, int64_t N, int64_t K, uint8_t* codes);

// Round-to-nearest quantization of finite fp32 weights w [N, K] with group size G (effective).
// Scales are rounded to scale_dtype before the codes are computed, so the codes are those of the
// scale that will be saved. Writes codes [N, K] (unpacked), scales and zeros fp32 [N, groups]
// (zeros = 8 when symmetric).
// Per group, symmetric: s = max|w| / 7.5, z = 8. Asymmetric: lo = min(w, 0), hi = max(w, 0),
// s = (hi - lo) / 15, z = clamp(round(-lo / s), 0, 15). A group whose scale is 0 (all zeros, or
// underflow in the scale dtype) gets s = 1, so its codes dequantize to 0.
// q = clamp(round_half_even(w / s) + z, 0, 15).
void quantize_rtn(const float* w, int64_t N, int64_t K, int64_t G, bool symmetric,
                  DType scale_dtype, uint8_t* codes, float* scales, float* zeros);

// (q - z) * s in fp32, for the canonical format; zeros == nullptr means symmetric (z = 8).
void dequantize(const uint8_t* qweight, const float* scales, const float* zeros, int64_t N,
                int64_t K, int64_t G, float* out);

// ---- CPU prepacked layout (format.h) ----------------------------------------------------------
// scales/zeros are fp32 [N, groups], stored in shape.scale_dtype (rounded to it: exact for values
// that came from that dtype); zeros == nullptr means symmetric.
void prepack(const uint8_t* qweight, const float* scales, const float* zeros,
             const PackedShape& shape, uint8_t* packed);
// Inverse of prepack: qweight [N, ceil(K/2)], scales and zeros fp32 [N, groups].
void unprepack(const uint8_t* packed, const PackedShape& shape, uint8_t* qweight, float* scales,
               float* zeros);

// ---- fused linear: y[M, N] = x[M, K] . dequant(W)^T + bias ------------------------------------
// Avx512 needs AVX-512 F/BW/VL/VNNI (Cascade Lake, Ice Lake); Avx512Bf16 is that path plus a
// vdpbf16ps GEMM for bf16 and fp16 activations with several rows (Zen 4, Zen 5); Amx is the AVX-512
// path plus AMX tiles from a few rows.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };
constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx};  // every path, for tests and benchmarks
const char* isa_name(Isa isa);
// From this many rows of bf16 x the Avx512Bf16 and Amx paths multiply with the weights
// dequantized to bf16, (q - z) s rounded to nearest even (a bf16 dense layer's rounding of its
// weights), in one accumulation over K instead of one per group: every output is then within
// 2^-9 sum_k |x_k w_k| (plus fp32 accumulation) of the exact result, where the other paths are
// within an ulp of the output plus fp32 rounding (docs/FORMAT.md).
constexpr int64_t kBf16DequantizedMinRows = 64;

// x as fixed-point integers in int8 planes, the form the integer dot products (vpdpbusd,
// vpmaddubsw, AMX int8 tiles) take. W4A8: each row of x gets its own scale, max|x| / 127 (1 for an
// all-zero row), and int8 codes round_half_even(x / scale); the kernels apply per row and group
// y += s * scale * (sum xq q - z sum xq). Activations::xint has two or three planes: int16 or
// int24 codes as signed base-256 digits, 256 * xq + lower[0] or 65536 * xq + 256 * lower[0] +
// lower[1], each an int8, with a power-of-two scale per row and group.
struct ActivationsA8 {
  static constexpr int kMaxPlanes = 3;
  int8_t* xq = nullptr;       // activation_a8_sizes().codes, padded like the weights
  int32_t* xq_sum = nullptr;  // [M, groups]
  float* scale = nullptr;     // [M] ([M, groups] in xint); NaN for a row with an Inf or a NaN (its
                              // codes and sums are not written): W4A8's caller rejects such x
  int64_t M = 0;
  int planes = 1;                            // 1 (W4A8), 2 (int16) or 3 (int24)
  int8_t* lower[kMaxPlanes - 1] = {};        // the further digits (xint only), laid out like xq
  int32_t* lower_sums[kMaxPlanes - 1] = {};  // [M, groups] each
  // plane p (0: the most significant digit, xq) and its sums
  int8_t* plane(int p) const { return p == 0 ? xq : lower[p - 1]; }
  int32_t* plane_sums(int p) const { return p == 0 ? xq_sum : lower_sums[p - 1]; }
};

// Activations as the kernels read them: x converted to fp32 with every group padded like the
// weights (zeros), per-row per-group sums of x (they fold the zero point into one FMA per group),
// and x as bf16 for the paths built on bf16 dot products (an exact copy of bf16 x, or fp16/fp32
// x split into bf16 planes). The caller owns the buffers, sized by activation_sizes() for the
// ISA, M and dtype that prepare_activations and linear then run with; what goes inside is that
// ISA's business (rows for the GEMV, panels of microkernel rows for the FMA GEMM, 16-row tiles
// for AMX), and a path that does not need a buffer asks for 0 elements of it.
struct Activations {
  float* x = nullptr;
  float* xsum = nullptr;
  uint16_t* x_bf16 = nullptr;
  int64_t M = 0;
  // x in the AVX2 and AVX-512 GEMVs as fixed point in int8 planes, which meet the weight codes
  // in byte dot products like W4A8's x (on AVX-512, 2 vpdpbusd per plane and 128 codes where
  // bf16 dot products took 8 vdpbf16ps): bf16 x as int16 in two planes, fp32 and fp16 x as int24
  // in three. Each row and group has a power-of-two step (act_quant.h's Int16Grid / Int24Grid)
  // that holds every bf16 value within 2^6 (int16) and every fp16 value within 2^11 (int24) of
  // the group's largest |x| exactly (2^7 / 2^12 unless that largest lies within 0.4% under a
  // power of two, where the step doubles); any other value is off by at most half a step, under
  // 1 / kMax of that largest (~2^-15 for int16; ~2^-23 for int24, about one fp32 ulp of it, the
  // rounding an fp32 sum of the products has anyway). A row with an Inf or a NaN (NaN scales)
  // runs on x instead.
  ActivationsA8 xint;
};
struct ActivationSizes {
  int64_t floats = 0, sums = 0, bf16 = 0;  // elements of x, xsum and x_bf16
  int64_t xint = 0;         // int8 codes per xint plane (0: no xint)
  int xint_planes = 0;      // 2 (int16) or 3 (int24); its sums and scales take `sums` each
};
ActivationSizes activation_sizes(Isa isa, const PackedShape& s, int64_t M, DType dtype);

// Hands out 64-byte aligned pieces of one buffer (if base is) in order and counts the bytes they
// take; with base == nullptr it only counts.
struct BufferLayout {
  uint8_t* base = nullptr;
  int64_t used = 0;
  uint8_t* take(int64_t bytes) {
    uint8_t* p = base != nullptr ? base + used : nullptr;
    used += round_up(bytes, 64);
    return p;
  }
};

// An ActivationsA8's arrays: `codes` int8 codes and `sums` int32 sums per plane (1 to 3 planes,
// the most significant first), then `scales` floats.
inline ActivationsA8 lay_out_a8(BufferLayout& buf, int64_t M, int64_t codes, int64_t sums,
                                int64_t scales, int planes) {
  ActivationsA8 a;
  a.M = M;
  a.planes = planes;
  a.xq = reinterpret_cast<int8_t*>(buf.take(codes));
  for (int p = 1; p < planes; ++p) a.lower[p - 1] = reinterpret_cast<int8_t*>(buf.take(codes));
  a.xq_sum = reinterpret_cast<int32_t*>(buf.take(4 * sums));
  for (int p = 1; p < planes; ++p) a.lower_sums[p - 1] = reinterpret_cast<int32_t*>(buf.take(4 * sums));
  a.scale = reinterpret_cast<float*>(buf.take(4 * scales));
  return a;
}

// Lays all of an Activations' arrays out from `base` in one buffer, each 64-byte aligned if base
// is, and returns the bytes they take; with base == nullptr only the bytes (activation_bytes).
inline int64_t lay_out_activations(const ActivationSizes& z, int64_t M, uint8_t* base, Activations* a) {
  BufferLayout buf{base};
  Activations out;
  out.M = M;
  out.x = reinterpret_cast<float*>(buf.take(4 * z.floats));
  out.xsum = reinterpret_cast<float*>(buf.take(4 * z.sums));
  out.x_bf16 = reinterpret_cast<uint16_t*>(buf.take(2 * z.bf16));
  if (z.xint > 0) out.xint = lay_out_a8(buf, M, z.xint, z.sums, z.sums, z.xint_planes);
  if (a != nullptr) *a = out;
  return buf.used;
}
inline int64_t activation_bytes(const ActivationSizes& z, int64_t M) {
  return lay_out_activations(z, M, nullptr, nullptr);
}
inline Activations activations_at(uint8_t* base, const ActivationSizes& z, int64_t M) {
  Activations a;
  lay_out_activations(z, M, base, &a);
  return a;
}

// x: [M, K] rows of dtype `dtype`, row stride ldx elements. Fills rows [m_begin, m_end) of a
// (a.M is the full M); independent across rows, so callers parallelise over them.
void prepare_activations(Isa isa, const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                         const Activations& a, int64_t m_begin, int64_t m_end);

// Computes output columns of row blocks [block_begin, block_end) for all M rows. bias is fp32 [N]
// or nullptr; y is [M, N] of dtype `dtype` with row stride ldy. Independent across row blocks, so
// callers parallelise over blocks.
void linear(Isa isa, const Activations& a, const uint8_t* packed, const PackedShape& s,
            const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
            int64_t block_end);

// The weights of row blocks [block_begin, block_end) dequantized and transposed for a dense GEMM:
// wt[k * ldw + n] = (q - z) * s rounded to dtype, wt [K, N] with row stride ldw >= N. The fused
// kernels are compute-bound at large M, where a library GEMM on the dequantized weight is faster
// (ops_cpu.cpp chooses). A row stride of a power-of-two bytes puts the rows the kernel writes
// in turn into one cache set; ops_cpu.cpp pads it.
void dequantize_transposed(Isa isa, const uint8_t* packed, const PackedShape& s, void* wt,
                           int64_t ldw, DType dtype, int64_t block_begin, int64_t block_end);

// ---- W4A8: int4 weights x dynamically quantized int8 activations (ActivationsA8) -------------
struct ActivationA8Sizes {
  int64_t codes = 0, sums = 0, scales = 0;
};
inline ActivationA8Sizes activation_a8_sizes(const PackedShape& s, int64_t M) {
  return {round_up(M, 16) * s.padded_k(), M * s.groups(), M};  // codes: whole 16-row AMX tiles
}
// W4A8's buffers in one buffer like lay_out_activations: the bytes they take, and their arrays
// laid out from a 64-byte aligned `base`.
inline int64_t activation_a8_bytes(const ActivationA8Sizes& z, int64_t M) {
  BufferLayout buf;
  lay_out_a8(buf, M, z.codes, z.sums, z.scales, /*planes=*/1);
  return buf.used;
}
inline ActivationsA8 activations_a8_at(uint8_t* base, const ActivationA8Sizes& z, int64_t M) {
  BufferLayout buf{base};
  return lay_out_a8(buf, M, z.codes, z.sums, z.scales, /*planes=*/1);
}
// Same contract as prepare_activations / linear: fill with the ISA that then runs.
void prepare_activations_a8(Isa isa, const void* x, DType dtype, int64_t ldx, const PackedShape& s,
                            const ActivationsA8& a, int64_t m_begin, int64_t m_end);
void linear_a8(Isa isa, const ActivationsA8& a, const uint8_t* packed, const PackedShape& s,
               const float* bias, void* y, DType dtype, int64_t ldy, int64_t block_begin,
               int64_t block_end);

// ---- int8 weights (Int8Linear): PackedShape with bits = 8 (format.h) -----------------------------
// codes uint8 [N, K] (the canonical int8 qweight), scales and zeros fp32 [N, groups] as prepack's;
// zeros == nullptr means symmetric (z = 128). activation_sizes, prepare_activations, linear and
// dequantize_transposed take such a shape as they take an int4 one: its x is fp32 rows (GEMV) or
// panels (GEMM), never fixed point (a code up to 255 times an int8 x overflows vpmaddubsw's pair
// sums), per group acc = sum_k x[k] * q[k] and y += s * (acc - z * sum_k x[k]) as int4's float
// GEMV. W4A8 (linear_a8) is int4 only.
void prepack_int8(const uint8_t* codes, const float* scales, const float* zeros,
                  const PackedShape& shape, uint8_t* packed);
void unprepack_int8(const uint8_t* packed, const PackedShape& shape, uint8_t* codes, float* scales,
                    float* zeros);

// ---- GPTQ's column loop (python/int4kit/quant/gptq.py) -----------------------------------------
// One sub-block of a GPTQ pass on W^T: `cols` consecutive columns of W in visiting order, each a
// row w [cols, n] (row stride ldw) holding that column's value for every output row. For c in
// order: q = clamp(round_half_even(w_c / s + z) (fractional zero points) or
// round_half_even(w_c / s) + z, 0, max_code) with s, z the rows group_of_col[c] of scales and
// zeros [groups, n] (row stride ldsz); codes[c] = q; errors[c] = (w_c - (q - z) s) / hinv[c, c];
// then w_r -= hinv[c, r] errors[c] for every later row r < cols (hinv: the sub-block of the
// inverse Hessian's upper Cholesky factor, row stride ldh). Independent across the n entries, so
// callers split n between threads. Row c of w is left as it was read.
// T is float or double (the two instantiations gptq.cpp makes).
template <typename T>
void gptq_columns(T* w, int64_t ldw, const T* hinv, int64_t ldh, const T* scales, const T* zeros,
                  int64_t ldsz, const int64_t* group_of_col, uint8_t* codes, int64_t ldq,
                  T* errors, int64_t lde, int64_t cols, int64_t n, bool fractional, int max_code);

// ---- dispatch ---------------------------------------------------------------------------------
// Best ISA this CPU supports, detected once.
Isa best_isa();
bool isa_supported(Isa isa);
// Parses "scalar" / "avx2" / "avx512" / "avx512bf16" / "amx"; returns false for an unknown name.
bool parse_isa(const char* name, Isa* out);
// Where int4 linear calls leave the GEMV for the GEMM. 0 (the default): each ISA's measured
// crossover (linear_simd.h's gemm_min_rows); rows > 0: the GEMM from that many rows of x on every
// vector ISA, for measuring the crossovers (bench/bench_crossover.py; the op glue sets it from
// INT4KIT_GEMM_MIN_ROWS on every call). Process-wide.
void set_gemm_min_rows(int64_t rows);
int64_t forced_gemm_rows();

}  // namespace cpu
}  // namespace int4kit
