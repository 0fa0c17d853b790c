// The fused W4A16 linear on tensor cores, host side: tile-shape choice, split-K, launch (the kernel
// and its design notes are in linear_kernel.cuh).
#include <atomic>
#include <string>
#include <utility>

#include "cuda/linear_kernel.cuh"
#include "int4kit/cuda_kernels.h"

namespace int4kit {
namespace cuda {
namespace {

using namespace cuda_layout;
using namespace fused_linear;

// Shared memory per block (Smem); above 48 KiB a kernel must opt in (a host-side attribute call,
// no stream work, so capture-safe). Every shape stays within the 99 KiB sm_86 and sm_89 allow.
template <typename T, TileShape kShape, bool kRecordsInT>
int launch(const LinearArgs& args, cudaStream_t stream) {
  constexpr int NT = kShape.nt, TM = kShape.tm, WN = kShape.wn, WK = kShape.wk, STAGES = kShape.stages;
  constexpr int kSmem = Smem<NT, TM, WN, WK, STAGES>::kBytes;
  static_assert(kSmem <= 99 * 1024, "over the shared memory of sm_86 and sm_89");
  auto kernel = linear_kernel<T, NT, TM, WN, WK, STAGES, kShape.codes_in_mma, kRecordsInT>;
  if (kSmem > 48 * 1024) {
    // The opt-in is per device: remember which devices have it (bit d), once per instantiation.
    static std::atomic<uint64_t> opted_in{0};
    int device = 0;
    int err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (!(opted_in.load(std::memory_order_relaxed) & bit)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      if (err != cudaSuccess) return err;
      opted_in.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const int64_t blocks = grid_blocks(args.M, args.tiles, kShape);
  const int64_t splits = ceil_div(args.chunks, args.chunks_per_split);
  if (blocks > 0x7FFFFFFF || splits > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(unsigned(blocks), unsigned(splits)), 32 * WN * WK, kSmem, stream>>>(args);
  int err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  reduce_splits_kernel<T><<<elementwise_grid(args.M * args.N), kElementwiseThreads, 0, stream>>>(
      args.partials, int(splits), args.M, args.N, static_cast<const T*>(args.bias),
      static_cast<T*>(args.out));
  return cudaGetLastError();
}

template <typename T, bool kRecordsInT, size_t... I>
int launch_shape(size_t index, const LinearArgs& args, cudaStream_t stream, std::index_sequence<I...>) {
  int err = cudaErrorInvalidValue;
  ((index == I ? (err = launch<T, kTileShapes[I], kRecordsInT>(args, stream)) : 0), ...);
  return err;
}

template <typename T>
int launch_tile(int tile, const LinearArgs& args, cudaStream_t stream) {
  const size_t index = size_t(tile);
  constexpr auto kShapes = std::make_index_sequence<kTileShapeCount>{};
  return args.scale_dtype == Half<T>::kDType ? launch_shape<T, true>(index, args, stream, kShapes)
                                             : launch_shape<T, false>(index, args, stream, kShapes);
}

// SMs of the current device, looked up once per device.
int multiprocessors() {
  static std::atomic<int> cached[64] = {};
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device < 64 && (sms = cached[device].load(std::memory_order_relaxed)) > 0) return sms;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 1;
  if (device < 64) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

int64_t chunks_per_split(int64_t M, const cuda_layout::Shape& shape, int tile) {
  return split_chunks(M, shape, kTileShapes[tile], multiprocessors());
}

}  // namespace

int linear_tile_count() { return kTileShapeCount; }

bool linear_tile_fits(int tile, int64_t K, int64_t G) {
  return tile_fits(tile, cuda_layout::group_per_chunk(K, G));
}

std::string linear_tile_name(int tile) {
  if (tile < 0 || tile >= kTileShapeCount) return "";
  const TileShape& t = kTileShapes[tile];
  return "NT " + std::to_string(t.nt) + " TM " + std::to_string(t.tm) + " WN " + std::to_string(t.wn) +
         " WK " + std::to_string(t.wk) + " stages " + std::to_string(t.stages) +
         (t.codes_in_mma ? ", scales after the mma" : "");
}

int64_t linear_workspace_floats(int64_t M, const cuda_layout::Shape& shape, int tile) {
  if (M <= 0 || shape.N <= 0 || shape.K <= 0 || shape.G <= 0) return 0;
  const bool per_chunk = cuda_layout::group_per_chunk(shape.K, shape.G);
  if (tile >= 0 && !tile_fits(tile, per_chunk)) return 0;
  const int index = tile_shape_index(M, per_chunk, tile);
  const int64_t splits = ceil_div(shape.chunks(), chunks_per_split(M, shape, index));
  return splits > 1 ? splits * M * shape.N : 0;
}

int linear(const void* x, int64_t M, int64_t ldx, const uint8_t* packed,
           const cuda_layout::Shape& shape, const void* bias, void* out, DType dtype, int tile,
           float* workspace, void* stream) {
  if (dtype != DType::F16 && dtype != DType::BF16) return cudaErrorInvalidValue;
  // the kernel's column arithmetic is 32-bit (cuda_layout::kMaxK)
  if (shape.K <= 0 || shape.K >= cuda_layout::kMaxK || shape.G <= 0) return cudaErrorInvalidValue;
  if (ldx % kChunkK != 0 || ldx < shape.K) return cudaErrorInvalidValue;  // whole chunks per row
  const bool per_chunk = cuda_layout::group_per_chunk(shape.K, shape.G);
  if (tile >= 0 && !tile_fits(tile, per_chunk)) return cudaErrorInvalidValue;
  if (M == 0 || shape.N == 0) return cudaSuccess;
  const int index = tile_shape_index(M, per_chunk, tile);
  const LinearArgs args{x, reinterpret_cast<const uint4*>(packed), packed + shape.codes_bytes(),
                        bias, out, M, ldx, shape.N, shape.K, shape.groups(),
                        shape.tiles(), shape.chunks(), shape.scale_dtype,
                        FastDivisor(uint32_t(shape.G)), per_chunk, chunks_per_split(M, shape, index),
                        workspace};
  if (args.chunks_per_split < shape.chunks() && workspace == nullptr) return cudaErrorInvalidValue;
  const auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::BF16 ? launch_tile<__nv_bfloat16>(index, args, s) : launch_tile<__half>(index, args, s);
}

}  // namespace cuda
}  // namespace int4kit
