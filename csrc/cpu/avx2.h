// AVX2 + FMA building blocks shared by the CPU kernel families (bsr.cpp, nm.cpp): 8-lane loads
// that widen every storage type to float32, stores that round back exactly as from_float() does,
// and horizontal sums.
//
// Everything here carries SPARSEKERNELS_AVX2, a target attribute, rather than relying on -mavx2:
// the library is built for the baseline ISA and reaches these functions only after cpu_isa()
// (isa.h) has found AVX2, FMA and F16C.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include "common.h"

#include <immintrin.h>

#include <cstdint>

#define SPARSEKERNELS_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sparsekernels::cpu::avx2_simd {

constexpr int64_t kLanes = 8;

// Eight consecutive stored values as float32.
SPARSEKERNELS_AVX2 inline __m256 load8(const float* source) { return _mm256_loadu_ps(source); }

SPARSEKERNELS_AVX2 inline __m256 load8(const bfloat16* source) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

SPARSEKERNELS_AVX2 inline __m256 load8(const float16* source) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source)));
}

// Eight values rounded to nearest even into the storage type. Bit for bit what from_float()
// gives, float16 NaN payloads aside (the hardware conversion keeps the payload's top bits, the
// scalar one returns the canonical quiet NaN; both are quiet NaNs of the same sign).
SPARSEKERNELS_AVX2 inline void store8(float* destination, __m256 value) { _mm256_storeu_ps(destination, value); }

SPARSEKERNELS_AVX2 inline void store8(bfloat16* destination, __m256 value) {
  const __m256i bits = _mm256_castps_si256(value);
  const __m256i high_half = _mm256_srli_epi32(bits, 16);
  // word + 0x7fff + (lowest kept bit): ties go to the even neighbour, overflow carries into inf.
  const __m256i rounding = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(high_half, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, rounding), 16);
  // A NaN is truncated and made quiet instead, so that rounding cannot carry it into inf.
  const __m256i quiet_nan = _mm256_or_si256(high_half, _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
  const __m256i result = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
  // Every 32-bit lane holds a value below 2^16, so the unsigned saturating pack is exact; it packs
  // within 128-bit halves, and the 64-bit permute brings the two packed quarters together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(result, result), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(destination), _mm256_castsi256_si128(packed));
}

SPARSEKERNELS_AVX2 inline void store8(float16* destination, __m256 value) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(destination),
                   _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Sum of the eight lanes.
SPARSEKERNELS_AVX2 inline float sum_lanes(__m256 value) {
  const __m128 folded = _mm_add_ps(_mm256_castps256_ps128(value), _mm256_extractf128_ps(value, 1));
  const __m128 pairs = _mm_add_ps(folded, _mm_movehl_ps(folded, folded));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
}

// {sum of sums[0], ..., sum of sums[3]}: two rounds of pairwise horizontal adds within each
// 128-bit half, then the halves added.
SPARSEKERNELS_AVX2 inline __m128 sum_each_of_4(const __m256 sums[4]) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(sums[0], sums[1]), _mm256_hadd_ps(sums[2], sums[3]));
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// destination[i] = float(source[i]) for i < count.
template <typename scalar_t>
SPARSEKERNELS_AVX2 void to_float_array(const scalar_t* source, float* destination, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) _mm256_storeu_ps(destination + i, load8(source + i));
  for (; i < count; ++i) destination[i] = to_float(source[i]);
}

// destination[i] = from_float(source[i]) for i < count.
template <typename scalar_t>
SPARSEKERNELS_AVX2 void from_float_array(const float* source, scalar_t* destination, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) store8(destination + i, _mm256_loadu_ps(source + i));
  for (; i < count; ++i) destination[i] = from_float<scalar_t>(source[i]);
}

}  // namespace sparsekernels::cpu::avx2_simd

#endif
