// A CPU stand-in for the CUDA features the fused linear kernel uses, so a C++ test can run the
// kernel's own code (csrc/cuda/linear_kernel.cuh) where there is no GPU. One std::thread per CUDA
// thread of a block, blocks one after another, one shared-memory buffer; ptx.cuh's functions in
// plain C++ (this header defines its include guard first):
//   * cp.async copies are held back until the cp.async.wait_group that must see them, so a read
//     of shared memory before its wait finds stale data;
//   * mma.sync.m16n8k16 gathers the 32 threads' fragments (PTX ISA tables) and gives each thread
//     its accumulators, in fp32;
//   * bar.sync and __syncthreads are barriers that abort with a message after 60 s instead of
//     hanging (a barrier some threads never reach).
// Not emulated: timing, memory-model subtleties beyond the barriers, anything the kernel does not
// use. Include this before the kernel header.
#pragma once

#define INT4KIT_CUDA_PTX_CUH  // ptx.cuh's functions come from here

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "ptx_mma_reference.h"

#undef __global__  // the CUDA headers' host-compiler versions: attributes g++ does not know
#undef __shared__
#define __global__
#define __shared__
#define __launch_bounds__(...)

// ---- built-in variables and the device intrinsics host code lacks ------------------------------

struct EmulatedDim {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmulatedDim threadIdx, blockIdx;
inline EmulatedDim blockDim, gridDim;

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }  // CUDA's device overload

inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __floats2half2_rn(std::fma(__low2float(a), __low2float(b), __low2float(c)),
                           std::fma(__high2float(a), __high2float(b), __high2float(c)));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __floats2bfloat162_rn(std::fma(__low2float(a), __low2float(b), __low2float(c)),
                               std::fma(__high2float(a), __high2float(b), __high2float(c)));
}
inline __half2 h2rint(__half2 v) {
  return __floats2half2_rn(std::nearbyint(__low2float(v)), std::nearbyint(__high2float(v)));
}
inline __nv_bfloat162 h2rint(__nv_bfloat162 v) {
  return __floats2bfloat162_rn(std::nearbyint(__low2float(v)), std::nearbyint(__high2float(v)));
}

namespace int4kit {
namespace cuda {
namespace emulator {

// A barrier for a fixed number of threads that aborts rather than hangs.
class Barrier {
 public:
  explicit Barrier(int threads) : threads_(threads) {}
  int threads() const { return threads_; }
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++waiting_ == threads_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "cuda emulator: %s: %d of %d threads arrived, the rest never did\n", what,
                   waiting_, threads_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int threads_, waiting_ = 0;
  uint64_t generation_ = 0;
};

constexpr int kWarp = 32;
constexpr size_t kSharedBytes = 228 * 1024;  // an sm_90 SM's shared memory

// What the threads of one block share: shared memory, barriers, mma exchange areas per warp.
struct Block {
  explicit Block(int threads) : all(threads), warps(size_t(threads / kWarp)) {}
  Barrier all;  // __syncthreads
  std::mutex barriers_mutex;
  std::map<int, std::unique_ptr<Barrier>> named;  // bar.sync id -> barrier
  struct Warp {
    Barrier sync{kWarp};
    uint32_t a[kWarp][4], b[kWarp][2];
  };
  std::vector<Warp> warps;
};

}  // namespace emulator

// The kernel's `extern __shared__ uint4 smem[]` (a block-scope declaration of this namespace's
// smem): one buffer, as blocks run one after another. Defined here: include this header in one
// translation unit only.
namespace fused_linear {
alignas(16) uint4 smem[emulator::kSharedBytes / 16];
}  // namespace fused_linear

namespace emulator {

inline unsigned char* const shared_memory = reinterpret_cast<unsigned char*>(fused_linear::smem);
inline thread_local Block* block = nullptr;

// This thread's cp.async copies: committed groups, oldest first, and the open one.
struct Copy {
  unsigned dst;
  const void* src;
  int bytes;
};
inline thread_local std::deque<std::vector<Copy>> committed;
inline thread_local std::vector<Copy> open_group;

inline void perform(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.dst + unsigned(c.bytes) > kSharedBytes || c.dst % unsigned(c.bytes) != 0) {
      std::fprintf(stderr, "cuda emulator: cp.async of %d bytes to shared offset %u\n", c.bytes, c.dst);
      std::abort();
    }
    std::memcpy(shared_memory + c.dst, c.src, size_t(c.bytes));
  }
}

// Runs kernel(args...) on a grid of blocks of `threads` threads, `shared_bytes` of dynamic shared
// memory each (filled with a pattern first, so a read of memory nothing wrote shows).
template <typename Kernel, typename... Args>
void launch(EmulatedDim grid, int threads, size_t shared_bytes, Kernel kernel, Args... args) {
  if (shared_bytes > kSharedBytes || threads % kWarp != 0 || threads > 1024) {
    std::fprintf(stderr, "cuda emulator: cannot launch %d threads with %zu bytes of shared memory\n",
                 threads, shared_bytes);
    std::abort();
  }
  gridDim = grid;
  blockDim = {unsigned(threads), 1, 1};
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::memset(shared_memory, 0xA5, kSharedBytes);
      Block state(threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          threadIdx = {unsigned(t), 0, 0};
          blockIdx = {bx, by, 0};
          block = &state;
          kernel(args...);
          while (!committed.empty()) committed.pop_front();  // the kernel waited or never will
          open_group.clear();
        });
      for (std::thread& th : pool) th.join();
    }
}

// mma.sync.m16n8k16: the warp's fragments gathered, this thread's C by ptx_mma_reference.h.
template <typename T>
void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using Raw = std::conditional_t<std::is_same_v<T, __half>, __half_raw, __nv_bfloat16_raw>;
  auto value = [](uint32_t reg, int half) {
    Raw raw;
    raw.x = uint16_t(half ? reg >> 16 : reg & 0xFFFFu);
    return float(T(raw));
  };
  const int lane = int(threadIdx.x % kWarp);
  Block::Warp& w = block->warps[threadIdx.x / kWarp];
  std::memcpy(w.a[lane], a, sizeof(a));
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.sync.arrive_and_wait("mma.sync (inputs)");
  MmaFragments f;
  for (int l = 0; l < kWarp; ++l) {
    for (int i = 0; i < 8; ++i) f.a[l][i] = value(w.a[l][i / 2], i % 2);
    for (int i = 0; i < 4; ++i) f.b[l][i] = value(w.b[l][i / 2], i % 2);
  }
  reference_mma_lane(f, lane, c);
  w.sync.arrive_and_wait("mma.sync (outputs)");  // nobody overwrites the inputs before all read
}

}  // namespace emulator

// ---- ptx.cuh, emulated ---------------------------------------------------------------------------

template <uint32_t kMask, uint32_t kBits>
inline uint32_t and_or(uint32_t a) {
  return (a & kMask) | kBits;
}
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  emulator::mma<__half>(c, a, b0, b1);
}
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  emulator::mma<__nv_bfloat16>(c, a, b0, b1);
}
inline void cp_async16(unsigned dst, const void* src) { emulator::open_group.push_back({dst, src, 16}); }
inline void cp_async8(unsigned dst, const void* src) { emulator::open_group.push_back({dst, src, 8}); }
inline void cp_async_commit() {
  emulator::committed.push_back(std::move(emulator::open_group));
  emulator::open_group.clear();
}
template <int kPending>
inline void cp_async_wait() {  // all but the kPending newest groups have landed
  while (emulator::committed.size() > size_t(kPending)) {
    emulator::perform(emulator::committed.front());
    emulator::committed.pop_front();
  }
}
inline void named_barrier(int id, int threads) {
  emulator::Barrier* barrier;
  {
    std::lock_guard<std::mutex> lock(emulator::block->barriers_mutex);
    auto& slot = emulator::block->named[id];
    if (!slot) slot = std::make_unique<emulator::Barrier>(threads);
    barrier = slot.get();
  }
  if (barrier->threads() != threads) {
    std::fprintf(stderr, "cuda emulator: bar.sync %d with %d threads, earlier %d\n", id, threads,
                 barrier->threads());
    std::abort();
  }
  barrier->arrive_and_wait("bar.sync");
}
inline unsigned opaque(unsigned v) { return v; }
inline unsigned shared_address(const void* p) {
  return unsigned(static_cast<const unsigned char*>(p) - emulator::shared_memory);
}

}  // namespace cuda
}  // namespace int4kit

inline void __syncthreads() { int4kit::cuda::emulator::block->all.arrive_and_wait("__syncthreads"); }
