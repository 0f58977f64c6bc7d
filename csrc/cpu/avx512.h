// AVX-512 building blocks shared by the CPU kernel families (bsr.cpp, nm.cpp): the target
// attributes of the AVX-512 and AVX512-BF16 code, a 16 x 16 transpose of 32-bit words, and the
// broadcast of one bfloat16 pair for VDPBF16PS.
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
#define SPARSEKERNELS_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

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

#undef SPARSEKERNELS_AVX512_UNROLL

}  // namespace sparsekernels::cpu::avx512_simd

#endif
