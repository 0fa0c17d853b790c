// mma.sync.m16n8k16 as the PTX ISA defines its fragments (16-bit A and B, "row.col", fp32 C),
// written out independently of the CUDA layout header, for the C++ tests that replay or emulate
// the fused kernel. g = lane / 4, q = lane % 4; element i of a lane's A, B or C fragment:
//   A (16 x 16): a0,a1 (g, 2q+{0,1}); a2,a3 (g+8, 2q+{0,1}); a4,a5 (g, 2q+8+{0,1}); a6,a7 (g+8, ...)
//   B (16 x 8):  b0,b1 (2q+{0,1}, g);  b2,b3 (2q+8+{0,1}, g)
//   C (16 x 8):  c0,c1 (g, 2q+{0,1});  c2,c3 (g+8, 2q+{0,1})
// Register r of A or B holds elements 2r and 2r + 1 (low half first).
#pragma once

namespace int4kit {

struct MmaFragments {
  float a[32][8], b[32][4];  // every lane's A and B elements, in the order above
};

// c += A x B for `lane`'s four C elements, summed in k order in fp32.
inline void reference_mma_lane(const MmaFragments& f, int lane, float (&c)[4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    for (int i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * q + 8 * (i / 4) + i % 2] = f.a[l][i];
    for (int i = 0; i < 4; ++i) B[2 * q + 8 * (i / 2) + i % 2][g] = f.b[l][i];
  }
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    for (int k = 0; k < 16; ++k) c[i] += A[row][k] * B[k][col];
  }
}

}  // namespace int4kit
