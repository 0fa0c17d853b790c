// Pieces shared by the CPU GEMMs' blocking (linear_simd.h, linear_avx512bf16.cpp, linear_amx.cpp):
// 64-byte-aligned scratch arrays, prefetching a window of x, and K cut into chunks whose segments
// each lie in one quantization group.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "int4kit/format.h"

namespace int4kit {
namespace cpu {
// Internal linkage: every ISA's translation unit compiles its own copy with its own flags (see
// act_quant.h and cmake/check_isa_objects.cmake).
namespace {

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;
// count values of T, 64-byte aligned (the vector loads and stores of the tiles rely on it)
template <typename T>
AlignedArray<T> aligned_array(int64_t count) {
  void* p = std::aligned_alloc(64, size_t(round_up(count * int64_t(sizeof(T)), 64)));
  if (p == nullptr) throw std::bad_alloc();
  return AlignedArray<T>(static_cast<T*>(p));
}

// Requests [p, p + bytes) into L2 (prefetcht1), a line at a time: a GEMM's next window of x
// while the current one is multiplied.
inline void prefetch_window(const void* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 2);
}

// ---- K in chunks, each cut into segments of one group ------------------------------------------
// Columns are counted in the GEMM's units over the padded K (groups of Gp columns): pairs of
// columns for 2-way dot products (vdpbf16ps), quads for 4-way ones (vpdpbusd). A chunk holds as
// many whole groups as fit in the GEMM's maximum, else consecutive pieces of one group (per-
// channel scales: G = K). A group's zero-point term goes with its first piece (in_group == 0).
struct KSegment {
  int64_t group;
  int64_t in_chunk;  // the segment's first unit: its index in the chunk (the tile's row)
  int64_t in_group;  // and in its group
  int64_t units;
};

// Units per chunk for groups of group_units units and chunks of at most max_units.
inline int64_t chunk_units(int64_t group_units, int64_t max_units) {
  return group_units <= max_units ? max_units / group_units * group_units : max_units;
}

// The segments of units [u0, u1) into out; returns how many (at most the chunk's units over the
// units of the smallest group, 8 columns, plus one where a chunk of pieces crosses a group).
inline int k_segments(int64_t group_units, int64_t u0, int64_t u1, KSegment* out) {
  int n = 0;
  for (int64_t u = u0; u < u1; ++n) {
    const int64_t g = u / group_units, end = std::min(u1, (g + 1) * group_units);
    out[n] = {g, u - u0, u - g * group_units, end - u};
    u = end;
  }
  return n;
}

}  // namespace
}  // namespace cpu
}  // namespace int4kit
