// The fused W4A16 linear on tensor cores: out[M, N] = x[M, K] @ W^T (+ bias), with W streamed from
// the CUDA prepacked layout (int4kit/cuda_layout.h) and dequantized in registers.
//
// Orientation: mma.sync.m16n8k16 with the weights as A (16 output channels x 16 k) and the
// activations as B (16 k x 8 tokens), accumulating a 16 x 8 tile of out^T in fp32. Small M wastes
// nothing on padding this way (a token tile is 8 wide, not 16), and one A fragment, the costly part
// (load + dequantize), is reused for TM token tiles.
//
// Work split. A block owns NT row tiles (16 NT output channels) and 8 TM tokens; its WK warps split
// K between them (warp w takes chunks w, w + WK, ...: in-block split-K keeps many loads in flight
// even when N is small) and add their partial tiles through shared memory at the end. Blocks are
// numbered token block fastest, so the blocks that share a weight tile run together and read it
// from L2 after the first.
//
// Pipeline. Every lane streams its own data through a STAGES-deep cp.async ring in shared memory:
// per chunk, NT 16-byte code loads (its A fragments for 4 k16 steps), NT records (scale and zero
// point of its two rows) and, per token tile, 32 bytes of x (its B fragments for the 4 steps). A
// lane only ever reads back what it copied itself, so cp.async.wait_group is the only
// synchronisation the loop needs; the ring is laid out [warp][stage][slot][lane] so every 16-byte
// shared access of a warp is conflict-free.
//
// Dequantization per A register (two codes): (word >> 4r) & 0x000F000F | magic gives magic + q in
// both halves; subtracting magic + round(z) leaves q - round(z) exactly, and one FMA with the scale
// and the fractional rest of the zero point, -(z - round(z)) * s, gives (q - z) * s. For integer
// zero points (RTN, GPTQ, symmetric) that rest is 0 and the only rounding is the final product's.
#include <atomic>

#include "cuda/device_utils.cuh"
#include "int4kit/cuda_kernels.h"
#include "int4kit/cuda_layout.h"

namespace int4kit {
namespace cuda {
namespace {

using namespace cuda_layout;

template <typename T>
struct Half;
template <>
struct Half<__half> {
  using T = __half;
  using T2 = __half2;
  static constexpr uint32_t kMagicBits = 0x64006400u;  // 1024 in both halves: codes land in the mantissa
  static constexpr float kMagic = 1024.f;
  static __device__ T2 pair(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ T from_float(float v) { return __float2half_rn(v); }
  static __device__ float to_float(T v) { return __half2float(v); }
};
template <>
struct Half<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagicBits = 0x43004300u;  // 128 in both halves
  static constexpr float kMagic = 128.f;
  static __device__ T2 pair(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ T from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ float to_float(T v) { return __bfloat162float(v); }
};

__device__ inline int64_t ceil_div_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T2>
__device__ inline T2 as_pair(uint32_t bits) {
  T2 v;
  memcpy(&v, &bits, 4);
  return v;
}
template <typename T2>
__device__ inline uint32_t as_bits(T2 v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return bits;
}

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

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 fills the destination with zeros.
__device__ inline void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ inline void cp_async8(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(src) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

struct LinearArgs {
  const void* x;        // [M, K], rows ldx apart; 16-byte aligned, ldx % 8 == 0, zeros in [K, ldx)
  const uint4* codes;   // prepacked codes
  const uint8_t* records;
  const void* bias;     // [N] or nullptr
  void* out;            // [M, N]
  int64_t M, ldx, N, K, G, groups, tiles, chunks;
  DType scale_dtype;
};

template <int NT, int TM>
struct Slots {  // the uint4 slots of one lane in one stage
  static constexpr int kCodes = 0, kRecords = NT, kX = 2 * NT, kCount = 2 * NT + 2 * TM;
};

template <typename T, int NT, int TM, int WK, int STAGES>
__global__ void __launch_bounds__(32 * WK) linear_kernel(LinearArgs args) {
  using H = Half<T>;
  using T2 = typename H::T2;
  using S = Slots<NT, TM>;
  extern __shared__ uint4 smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // One grid dimension (y and z stop at 65535): token blocks fastest, so the blocks sharing a
  // weight tile run side by side and all but the first read it from L2.
  const int64_t token_blocks = ceil_div_device(args.M, 8 * TM);
  const int64_t tile0 = int64_t(blockIdx.x) / token_blocks * NT;
  const int64_t token0 = int64_t(blockIdx.x) % token_blocks * 8 * TM;
  const T* x = static_cast<const T*>(args.x);
  const int64_t record_bytes = kRecordValues * scale_bytes(args.scale_dtype);
  uint4* ring = smem + int64_t(warp) * STAGES * S::kCount * kLanes + lane;
  auto slot = [&](int stage, int s) { return ring + (stage * S::kCount + s) * kLanes; };

  // Warp `warp` takes chunks warp, warp + WK, ...
  const int64_t iterations = args.chunks > warp ? (args.chunks - warp + WK - 1) / WK : 0;

  auto issue = [&](int64_t it) {
    const int stage = int(it % STAGES);
    const int64_t chunk = warp + it * WK;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t tile = tile0 + nt < args.tiles ? tile0 + nt : args.tiles - 1;
      cp_async16(slot(stage, S::kCodes + nt), args.codes + (tile * args.chunks + chunk) * kLanes + lane,
                 16);
      const int64_t record =
          (tile * args.groups + lane_group(chunk, lane, args.G, args.groups)) * kLaneGroups + lane / 4;
      const uint8_t* src = args.records + record * record_bytes;
      if (record_bytes == 16) cp_async16(slot(stage, S::kRecords + nt), src, 16);
      else cp_async8(slot(stage, S::kRecords + nt), src);
    }
    const int64_t k = chunk * kChunkK + 16 * (lane & 3);
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      int64_t token = token0 + 8 * tm + lane / 4;
      token = token < args.M ? token : args.M - 1;  // rows past M repeat the last one, never stored
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // A piece that starts inside K is read whole (the row's padding up to ldx is zeros); one
        // that starts past it is zero-filled.
        const bool inside = k + 8 * h < args.K;
        cp_async16(slot(stage, S::kX + 2 * tm + h), inside ? x + token * args.ldx + k + 8 * h : x,
                   inside ? 16 : 0);
      }
    }
  };

  float acc[NT][TM][4] = {};
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < iterations) issue(s);
    cp_async_commit();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    cp_async_wait<STAGES - 2>();  // this lane's copies for `it` have landed
    const int stage = int(it % STAGES);
    uint4 xs[TM][2];
#pragma unroll
    for (int tm = 0; tm < TM; ++tm) {
      xs[tm][0] = *slot(stage, S::kX + 2 * tm);
      xs[tm][1] = *slot(stage, S::kX + 2 * tm + 1);
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4 words = *slot(stage, S::kCodes + nt);
      const uint4 raw = *slot(stage, S::kRecords + nt);
      const LaneRecord r = decode_record(raw, args.scale_dtype);
      // q - round(z) exactly, then * s + (the fractional rest of z) * -s
      // (round(z) is kept within +-64 so magic + round(z) stays exact in bf16 too)
      const float zi_lo = fminf(fmaxf(rintf(r.zero_lo), -64.f), 64.f);
      const float zi_hi = fminf(fmaxf(rintf(r.zero_hi), -64.f), 64.f);
      const T2 shift_lo = H::pair(H::kMagic + zi_lo, H::kMagic + zi_lo);
      const T2 shift_hi = H::pair(H::kMagic + zi_hi, H::kMagic + zi_hi);
      const T2 scale_lo = H::pair(r.scale_lo, r.scale_lo), scale_hi = H::pair(r.scale_hi, r.scale_hi);
      const float rest_lo = -(r.zero_lo - zi_lo) * r.scale_lo, rest_hi = -(r.zero_hi - zi_hi) * r.scale_hi;
      const T2 bias_lo = H::pair(rest_lo, rest_lo), bias_hi = H::pair(rest_hi, rest_hi);
      const uint32_t step_words[kSteps] = {words.x, words.y, words.z, words.w};
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        uint32_t a[4];
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const T2 magic_q = as_pair<T2>(((step_words[step] >> (4 * reg)) & 0x000F000Fu) | H::kMagicBits);
          const bool hi = reg & 1;  // registers 1 and 3 hold row g + 8
          a[reg] = as_bits(__hfma2(__hsub2(magic_q, hi ? shift_hi : shift_lo), hi ? scale_hi : scale_lo,
                                   hi ? bias_hi : bias_lo));
        }
#pragma unroll
        for (int tm = 0; tm < TM; ++tm) {
          // B fragments: x elements 4 step + {0,1} and 4 step + {2,3} of this lane's 16
          const uint4& v = xs[tm][step / 2];
          const uint32_t b0 = (step & 1) ? v.z : v.x, b1 = (step & 1) ? v.w : v.y;
          mma_16816(acc[nt][tm], a, b0, b1, T{});
        }
      }
    }
    if (it + STAGES - 1 < iterations) issue(it + STAGES - 1);
    cp_async_commit();
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused for the split-K reduction

  // Partial tiles of all warps: [warp][nt][tm][value][lane] floats.
  constexpr int kTileValues = NT * TM * 4 * kLanes;
  float* partial = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int tm = 0; tm < TM; ++tm)
#pragma unroll
      for (int v = 0; v < 4; ++v) partial[warp * kTileValues + ((nt * TM + tm) * 4 + v) * kLanes + lane] = acc[nt][tm][v];
  __syncthreads();
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  for (int i = threadIdx.x; i < kTileValues; i += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) sum += partial[w * kTileValues + i];
    const int l = i % kLanes, v = (i / kLanes) % 4, tm = (i / (4 * kLanes)) % TM, nt = i / (4 * kLanes * TM);
    const AccumulatorElement e = accumulator_element(l, v);
    const int64_t n = (tile0 + nt) * kTileRows + e.row, token = token0 + 8 * tm + e.token;
    if (n < args.N && token < args.M)
      out[token * args.N + n] = H::from_float(bias ? sum + H::to_float(bias[n]) : sum);
  }
}

// Shared memory per block: WK * STAGES * (2 NT + 2 TM) * 512 bytes; above 48 KiB a kernel must opt
// in (a host-side attribute call, no stream work, so capture-safe).
template <typename T, int NT, int TM, int WK, int STAGES>
int launch(const LinearArgs& args, cudaStream_t stream) {
  constexpr int kSmem = WK * STAGES * Slots<NT, TM>::kCount * kLanes * 16;
  static_assert(NT * TM * 4 * kLanes * 4 <= kSmem / WK, "the split-K reduction must fit the ring");
  auto kernel = linear_kernel<T, NT, TM, WK, STAGES>;
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
  const int64_t blocks = ceil_div(args.M, 8 * TM) * ceil_div(args.tiles, NT);
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;
  kernel<<<unsigned(blocks), 32 * WK, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
int launch_for_m(const LinearArgs& args, cudaStream_t stream) {
  // M <= 8 is a GEMV: one token tile, many warps per row tile so enough bytes are in flight.
  if (args.M <= 8) return launch<T, 2, 1, 8, 4>(args, stream);
  if (args.M <= 16) return launch<T, 2, 2, 4, 4>(args, stream);
  if (args.M <= 32) return launch<T, 2, 4, 4, 3>(args, stream);
  return launch<T, 2, 8, 2, 3>(args, stream);
}

}  // namespace

int linear(const void* x, int64_t M, int64_t ldx, const uint8_t* packed,
           const cuda_layout::Shape& shape, const void* bias, void* out, DType dtype, void* stream) {
  if (dtype != DType::F16 && dtype != DType::BF16) return cudaErrorInvalidValue;
  if (M == 0 || shape.N == 0) return cudaSuccess;
  const LinearArgs args{x, reinterpret_cast<const uint4*>(packed), packed + shape.codes_bytes(),
                        bias, out, M, ldx, shape.N, shape.K, shape.G, shape.groups(),
                        shape.tiles(), shape.chunks(), shape.scale_dtype};
  const auto s = static_cast<cudaStream_t>(stream);
  return dtype == DType::BF16 ? launch_for_m<__nv_bfloat16>(args, s) : launch_for_m<__half>(args, s);
}

}  // namespace cuda
}  // namespace int4kit
