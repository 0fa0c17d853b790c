// The inner column loop of a GPTQ pass (python/int4kit/quant/gptq.py, _gptq_pass), the part that is
// one small step per column and so cannot run as a few large torch ops. Scalar C++ compiled with no
// ISA flags: the row loops are contiguous, so the compiler vectorises them for the baseline ISA.
#include <cmath>

#include "int4kit/kernels.h"

namespace int4kit {
namespace cpu {

template <typename T>
void gptq_columns(T* w, int64_t ldw, const T* hinv, int64_t ldh, const T* scales, const T* zeros,
                  int64_t ldsz, const int64_t* group_of_col, uint8_t* codes, int64_t ldq,
                  T* errors, int64_t lde, int64_t cols, int64_t n, bool fractional, int max_code) {
  const T top = static_cast<T>(max_code);
  for (int64_t c = 0; c < cols; ++c) {
    T* wc = w + c * ldw;
    const T* s = scales + group_of_col[c] * ldsz;
    const T* z = zeros + group_of_col[c] * ldsz;
    uint8_t* qc = codes + c * ldq;
    T* ec = errors + c * lde;
    const T d = hinv[c * ldh + c];
    for (int64_t j = 0; j < n; ++j) {
      // torch's order: round(w / s) + z for integer zero points, round(w / s + z) for fractional
      // ones; nearbyint rounds half to even in the default rounding mode, as torch.round does
      T q = fractional ? std::nearbyint(wc[j] / s[j] + z[j]) : std::nearbyint(wc[j] / s[j]) + z[j];
      q = q > top ? top : (q >= T(0) ? q : T(0));  // a NaN weight becomes code 0
      qc[j] = static_cast<uint8_t>(q);
      ec[j] = (wc[j] - (q - z[j]) * s[j]) / d;
    }
    // the error passes on to the later columns of the sub-block: w_r -= hinv[c, r] * e_c
    for (int64_t r = c + 1; r < cols; ++r) {
      const T h = hinv[c * ldh + r];
      T* wr = w + r * ldw;
      for (int64_t j = 0; j < n; ++j) wr[j] -= h * ec[j];
    }
  }
}

template void gptq_columns<float>(float*, int64_t, const float*, int64_t, const float*,
                                  const float*, int64_t, const int64_t*, uint8_t*, int64_t, float*,
                                  int64_t, int64_t, int64_t, bool, int);
template void gptq_columns<double>(double*, int64_t, const double*, int64_t, const double*,
                                   const double*, int64_t, const int64_t*, uint8_t*, int64_t,
                                   double*, int64_t, int64_t, int64_t, bool, int);

}  // namespace cpu
}  // namespace int4kit
