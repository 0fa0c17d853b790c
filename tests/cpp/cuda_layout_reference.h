// The CUDA prepacked layout's code words built on the CPU straight from fragment_element, for the
// C++ tests that feed the layout to an emulation of the kernel (test_cuda_layout.cpp) or to the
// kernel itself (test_cuda_kernel_emulated.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace cuda_layout {

// codes q [N, K] (0..15, row-major) -> words [tiles][chunks][lanes][steps]; padding codes 0.
inline std::vector<uint32_t> reference_code_words(const std::vector<int>& q, const Shape& shape) {
  std::vector<uint32_t> words(size_t(shape.codes_bytes() / 4));
  for (int64_t t = 0; t < shape.tiles(); ++t)
    for (int64_t c = 0; c < shape.chunks(); ++c)
      for (int lane = 0; lane < kLanes; ++lane)
        for (int step = 0; step < kSteps; ++step) {
          uint32_t word = 0;
          for (int nibble = 0; nibble < 8; ++nibble) {
            const TileElement e = fragment_element(lane, step, nibble);
            const int64_t n = t * kTileRows + e.row, k = c * kChunkK + e.k;
            if (n < shape.N && k < shape.K) word |= uint32_t(q[size_t(n * shape.K + k)]) << (4 * nibble);
          }
          words[size_t(((t * shape.chunks() + c) * kLanes + lane) * kSteps + step)] = word;
        }
  return words;
}

}  // namespace cuda_layout
}  // namespace int4kit
