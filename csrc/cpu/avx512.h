// AVX-512 building blocks shared by the CPU kernel families (bsr.cpp, nm.cpp): the target
// attributes of the AVX-512 and AVX512-BF16 code, a 16 x 16 transpose of 32-bit words, the
// broadcast of one bfloat16 pair, and the register-blocked VDPBF16PS micro-kernel.
//
// As in avx2.h, everything carries a target attribute rather than relying on -mavx512f: the
// library is built for the baseline ISA and reaches these functions only after cpu_isa() (isa.h)
// has found the instructions.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include "common.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SPARSEKERNELS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
// The avx512_bf16 level (isa.h): AVX512-BF16 for VDPBF16PS, VBMI2 for VPEXPANDW.
#define SPARSEKERNELS_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16,avx512vbmi2")))

namespace sparsekernels::cpu::avx512_simd {

#define SPARSEKERNELS_AVX512_UNROLL _Pragma("GCC unroll 16")

// In-register transpose of a 16 x 16 matrix of 32-bit elements (rows[i] = row i).
SPARSEKERNELS_AVX512 inline void transpose16x16_epi32(__m512i rows[16]) {
  __m512i pairs[16];
  // Within each 128-bit lane, interleave the 32-bit elements of rows 2i and 2i + 1 ...
  SPARSEKERNELS_AVX512_UNROLL
  for (int i = 0; i < 8; ++i) {
    pairs[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    pairs[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  // ... then the 64-bit pairs of row pairs: quad[4g + j] holds, in lane L, column 4L + j of rows
  // 4g .. 4g + 3.
  __m512i quads[16];
  SPARSEKERNELS_AVX512_UNROLL
  for (int group = 0; group < 4; ++group) {
    const __m512i* in = pairs + 4 * group;
    quads[4 * group + 0] = _mm512_unpacklo_epi64(in[0], in[2]);
    quads[4 * group + 1] = _mm512_unpackhi_epi64(in[0], in[2]);
    quads[4 * group + 2] = _mm512_unpacklo_epi64(in[1], in[3]);
    quads[4 * group + 3] = _mm512_unpackhi_epi64(in[1], in[3]);
  }
  // Finally a 4 x 4 transpose of 128-bit lanes across the four row groups.
  SPARSEKERNELS_AVX512_UNROLL
  for (int j = 0; j < 4; ++j) {
    const __m512i low01 = _mm512_shuffle_i32x4(quads[j], quads[4 + j], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(quads[j], quads[4 + j], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(quads[8 + j], quads[12 + j], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(quads[8 + j], quads[12 + j], 0xee);
    rows[j] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    rows[4 + j] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
    rows[8 + j] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    rows[12 + j] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
  }
}

// One pair of adjacent bfloat16 values (the low half is pair[0]) broadcast to all 16 32-bit lanes:
// the scalar operand of a VDPBF16PS.
SPARSEKERNELS_AVX512_BF16 inline __m512i broadcast_pair(const bfloat16* pair) {
  uint32_t word;
  std::memcpy(&word, pair, sizeof(word));  // activations need not be 4-byte aligned
  return _mm512_set1_epi32(static_cast<int>(word));
}

// ------------------------------------------------------------------------------------------------
// The VDPBF16PS micro-kernel: a bfloat16 product with float32 accumulation, depth counted in pairs.
// Used by bsr.cpp (forward, grad_input, grad_values of kept blocks) and nm.cpp (grad_input on
// expanded weight tiles) at the avx512_bf16 level.

// out[rows][width] (+)= lhs[rows][2 * pairs] @ rhs[2 * pairs][width], float32 out. Pair p of lhs
// row i starts at lhs + i * lhs_row_stride + p * lhs_pair_stride (in bfloat16 elements, so both
// in-place activations and packed pair words can be addressed); rhs is [pairs][rhs_stride] words
// in the pair layout.
struct Dpbf16Tile {
  int64_t rows, pairs, width;
  const bfloat16* lhs;
  int64_t lhs_row_stride, lhs_pair_stride;
  const uint32_t* rhs;
  int64_t rhs_stride;
  float* out;
  int64_t out_stride;
  bool accumulate;  // false: overwrite out
};

// kRows x (16 * kVectors) outputs in registers over the whole depth, as avx512_fma_strip: each
// pair step loads kVectors rhs vectors and broadcasts one pair per row, kRows * kVectors
// VDPBF16PS per kRows + kVectors loads.
template <int kRows, int kVectors>
SPARSEKERNELS_AVX512_BF16 inline void dpbf16_strip(const Dpbf16Tile& tile, int64_t row0, int64_t col0) {
  const int64_t out_stride = tile.out_stride;
  float* out = tile.out + row0 * out_stride + col0;
  __m512 acc[kRows][kVectors];
  SPARSEKERNELS_AVX512_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_AVX512_UNROLL
    for (int v = 0; v < kVectors; ++v) {
      acc[i][v] = tile.accumulate ? _mm512_loadu_ps(out + i * out_stride + 16 * v) : _mm512_setzero_ps();
    }
  }
  const bfloat16* lhs = tile.lhs + row0 * tile.lhs_row_stride;
  const uint32_t* rhs = tile.rhs + col0;
  const int64_t lhs_row_stride = tile.lhs_row_stride;
  for (int64_t p = 0; p < tile.pairs; ++p) {
    __m512i rhs_vectors[kVectors];
    SPARSEKERNELS_AVX512_UNROLL
    for (int v = 0; v < kVectors; ++v) rhs_vectors[v] = _mm512_loadu_si512(rhs + 16 * v);
    SPARSEKERNELS_AVX512_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const __m512i lhs_pair = broadcast_pair(lhs + i * lhs_row_stride);
      SPARSEKERNELS_AVX512_UNROLL
      for (int v = 0; v < kVectors; ++v) {
        acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)lhs_pair, (__m512bh)rhs_vectors[v]);
      }
    }
    lhs += tile.lhs_pair_stride;
    rhs += tile.rhs_stride;
  }
  SPARSEKERNELS_AVX512_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_AVX512_UNROLL
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(out + i * out_stride + 16 * v, acc[i][v]);
  }
}

template <int kRows, int kVectors>
SPARSEKERNELS_AVX512_BF16 inline void dpbf16_rows_left(const Dpbf16Tile& tile, int64_t row0, int64_t col0,
                                                       int64_t rows) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      dpbf16_strip<kRows, kVectors>(tile, row0, col0);
    } else {
      dpbf16_rows_left<kRows - 1, kVectors>(tile, row0, col0, rows);
    }
  }
}

template <int kRows, int kVectors>
SPARSEKERNELS_AVX512_BF16 inline void dpbf16_panel(const Dpbf16Tile& tile, int64_t col0) {
  int64_t row = 0;
  for (; row + kRows <= tile.rows; row += kRows) dpbf16_strip<kRows, kVectors>(tile, row, col0);
  dpbf16_rows_left<kRows - 1, kVectors>(tile, row, col0, tile.rows - row);
}

// 64-, 32- and 16-column panels of 6 x 4, 12 x 2 and 12 x 1 vectors, the register blocking of
// bsr.cpp's float32 avx512_fma_tile.
SPARSEKERNELS_AVX512_BF16 inline void dpbf16_tile(const Dpbf16Tile& tile) {
  int64_t col0 = 0;
  for (; col0 + 64 <= tile.width; col0 += 64) dpbf16_panel<6, 4>(tile, col0);
  if (col0 + 32 <= tile.width) {
    dpbf16_panel<12, 2>(tile, col0);
    col0 += 32;
  }
  if (col0 < tile.width) dpbf16_panel<12, 1>(tile, col0);
}

#undef SPARSEKERNELS_AVX512_UNROLL

}  // namespace sparsekernels::cpu::avx512_simd

#endif
