// The PTX the fused linear kernel (linear_kernel.cuh) is built from, one small function each:
// tensor-core mma, cp.async, named barriers, a fused LOP3, the shared-window address of a pointer.
// tests/cpp/cuda_emulator.h gives the same functions in plain C++ (defining this guard first), so
// the kernel also runs, thread by thread, on a CPU in the C++ tests.
#ifndef INT4KIT_CUDA_PTX_CUH
#define INT4KIT_CUDA_PTX_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace int4kit {
namespace cuda {

// (a & kMask) | kBits as one LOP3. Written as C++ with two constants it compiles to two (a LOP3
// takes one immediate); ptxas keeps one of these constants in a register across the loop.
template <uint32_t kMask, uint32_t kBits>
__device__ inline uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(kMask), "n"(kBits));
  return d;
}

// d += a * b on tensor cores, m16n8k16, fp32 accumulation; the last argument picks the input type.
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                 __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                 __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy that bypasses L1, to shared-window address dst.
__device__ inline void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ inline void cp_async8(unsigned dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads') for `threads` threads, a multiple of 32.
__device__ inline void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// v, opaque to the optimiser: a per-lane constant it would otherwise recompute from the thread
// index inside the loop rather than keep in a register.
__device__ inline unsigned opaque(unsigned v) {
  asm volatile("mov.b32 %0, %0;\n" : "+r"(v));
  return v;
}

// The shared-window address of a pointer into shared memory, as cp.async takes it.
__device__ inline unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

}  // namespace cuda
}  // namespace int4kit

#endif  // INT4KIT_CUDA_PTX_CUH
