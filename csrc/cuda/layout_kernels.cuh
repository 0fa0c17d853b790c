// Kernels converting between the canonical format and the CUDA prepacked layout
// (int4kit/cuda_layout.h), and dequantizing straight from the prepacked layout (the dense-matmul
// path of linear). Offline or once-per-load kernels, grid-stride loops. Device code only:
// layout.cu launches it; tests/cpp/cuda_emulator.h runs it on a CPU.
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"
#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace cuda {
namespace layout_kernels {

using namespace cuda_layout;

// Word index -> (tile, chunk, lane, step), the order of the codes array.
struct WordPosition {
  int64_t tile, chunk;
  int lane, step;
};
__device__ inline WordPosition word_position(int64_t i, int64_t chunks) {
  const int64_t tile_chunk = i / (kLanes * kSteps);
  return {tile_chunk / chunks, tile_chunk % chunks, int((i / kSteps) % kLanes), int(i % kSteps)};
}

__global__ void prepack_codes_kernel(const uint8_t* __restrict__ qweight, int64_t N, int64_t K,
                                     int64_t chunks, int64_t words, uint32_t* __restrict__ codes) {
  const int64_t row_bytes = (K + 1) / 2;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x) {
    const WordPosition p = word_position(i, chunks);
    uint32_t word = 0;
    for (int nibble = 0; nibble < 8; ++nibble) {
      const TileElement e = fragment_element(p.lane, p.step, nibble);
      const int64_t n = p.tile * kTileRows + e.row, k = p.chunk * kChunkK + e.k;
      if (n < N && k < K) {
        const uint8_t byte = qweight[n * row_bytes + (k >> 1)];
        word |= uint32_t((k & 1) ? (byte >> 4) : (byte & 0xF)) << (4 * nibble);
      }
    }
    codes[i] = word;
  }
}

// One thread per canonical byte: two codes, gathered from their fragment positions.
__global__ void unprepack_codes_kernel(const uint32_t* __restrict__ codes, int64_t N, int64_t K,
                                       int64_t chunks, uint8_t* __restrict__ qweight) {
  const int64_t row_bytes = (K + 1) / 2, total = N * row_bytes;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / row_bytes, tile = n / kTileRows;
    uint8_t byte = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t k = 2 * (i % row_bytes) + h;
      if (k >= K) break;
      const FragmentPosition f = fragment_position(int(n % kTileRows), int(k % kChunkK));
      const uint32_t word = codes[((tile * chunks + k / kChunkK) * kLanes + f.lane) * kSteps + f.step];
      byte |= uint8_t(((word >> (4 * f.nibble)) & 0xF) << (4 * h));
    }
    qweight[i] = byte;
  }
}

// Records are copied as raw bits (Bits = uint32_t for fp32 scales, uint16_t for 16-bit ones), so
// the round trip is exact. zeros == nullptr stores the symmetric zero point.
template <typename Bits>
__global__ void prepack_records_kernel(const Bits* __restrict__ scales, const Bits* __restrict__ zeros,
                                       Bits symmetric_zero, int64_t N, int64_t groups, int64_t total,
                                       Bits* __restrict__ records) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int value = int(i % kRecordValues);
    const int64_t lane_group = (i / kRecordValues) % kLaneGroups;
    const int64_t tile_group = i / (kRecordValues * kLaneGroups);
    const int64_t tile = tile_group / groups, group = tile_group % groups;
    const int64_t n = tile * kTileRows + lane_group + 8 * (value & 1);
    Bits bits = 0;  // padded rows: scale 0, zero 0
    if (n < N) {
      if (value < 2) bits = scales[n * groups + group];
      else bits = zeros ? zeros[n * groups + group] : symmetric_zero;
    }
    records[i] = bits;
  }
}

template <typename Bits>
__global__ void unprepack_records_kernel(const Bits* __restrict__ records, int64_t N, int64_t groups,
                                         Bits* __restrict__ scales, Bits* __restrict__ zeros) {
  const int64_t total = N * groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / groups, group = i % groups, tile = n / kTileRows;
    const int row = int(n % kTileRows), lane_group = row % 8, hi = row / 8;
    const int64_t record = ((tile * groups + group) * kLaneGroups + lane_group) * kRecordValues;
    scales[i] = records[record + hi];
    zeros[i] = records[record + 2 + hi];
  }
}

// One lane record (scale and zero point of rows g and g + 8) as loaded from memory.
__device__ inline uint4 load_record(const uint8_t* r, DType scale_dtype) {
  if (scale_dtype == DType::F32) return *reinterpret_cast<const uint4*>(r);
  const uint2 v = *reinterpret_cast<const uint2*>(r);
  return make_uint4(v.x, v.y, 0, 0);
}

// The dense weight [N, K] of Out straight from the prepacked layout, for linear's dense path. One
// thread per lane slot of a tile-chunk: its 16-byte load holds rows g and g + 8 at the 16
// contiguous columns 16q .. 16q + 15 of the chunk (lane_code), so each row is written as 16
// contiguous values, in 16-byte stores where rows allow. With G a multiple of 16 or one group
// per row (lane_groups) a row's 16 columns share one record; otherwise each column looks up its
// own. Values are (q - z) * s in fp32, rounded once to Out. K < 2^31 (the launcher checks).
template <typename Out>
__global__ void dequantize_prepacked_kernel(const uint4* __restrict__ codes,
                                            const uint8_t* __restrict__ records, DType scale_dtype,
                                            int64_t N, int K, int groups, FastDivisor group_divisor,
                                            bool lane_groups, int64_t chunks, int64_t slots,
                                            Out* __restrict__ out) {
  constexpr int kColumns = 16;
  const int64_t record_bytes = kRecordValues * scale_bytes(scale_dtype);
  const bool vector_rows = (int64_t(K) * int64_t(sizeof(Out))) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < slots;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int lane = int(i % kLanes), g = lane / 4;
    const int64_t tile = i / kLanes / chunks;
    const int k0 = int(i / kLanes % chunks) * kChunkK + kColumns * (lane % 4);
    if (k0 >= K) continue;
    const uint4 raw = codes[i];
    const uint32_t words[kSteps] = {raw.x, raw.y, raw.z, raw.w};
    const uint8_t* tile_records = records + tile * groups * kLaneGroups * record_bytes;
    auto record_at = [&](int k) {
      const int64_t group = lane_group(k, group_divisor, groups);
      const uint8_t* r = tile_records + (group * kLaneGroups + g) * record_bytes;
      return decode_record(load_record(r, scale_dtype), scale_dtype);
    };
    const LaneRecord shared_record = record_at(k0);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t n = tile * kTileRows + g + 8 * half;
      if (n >= N) continue;
      Out values[kColumns];
#pragma unroll
      for (int j = 0; j < kColumns; ++j) {
        const LaneRecord r = lane_groups ? shared_record : record_at(min(k0 + j, K - 1));
        const LaneCode c = lane_code(half, j);
        const float q = float((words[c.step] >> (4 * c.nibble)) & 0xF);
        values[j] = from_float<Out>((q - (half ? r.zero_hi : r.zero_lo)) * (half ? r.scale_hi : r.scale_lo));
      }
      Out* row = out + n * K + k0;
      if (vector_rows && k0 + kColumns <= K) {
        constexpr int kVectors = kColumns * int(sizeof(Out)) / 16;
        uint4 v[kVectors];
        memcpy(v, values, sizeof(values));
#pragma unroll
        for (int j = 0; j < kVectors; ++j) reinterpret_cast<uint4*>(row)[j] = v[j];
      } else {
        for (int j = 0; j < kColumns && k0 + j < K; ++j) row[j] = values[j];
      }
    }
  }
}

// The raw bits of 8.0 (the symmetric zero point) in each scale dtype.
constexpr uint32_t kEightF32 = 0x41000000u;
constexpr uint16_t kEightBF16 = 0x4100u, kEightF16 = 0x4800u;

}  // namespace layout_kernels
}  // namespace cuda
}  // namespace int4kit
