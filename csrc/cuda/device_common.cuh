// Device helpers shared by the .cu files of csrc/cuda: 16-bit storage <-> float, warp reduction,
// index clamping.
// Included only from .cu files (nvcc); the launcher headers stay host-only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda::detail {

// Storage traits: raw 16-bit payloads are carried as uint16_t and converted at the edges.
template <DType kDType>
struct Storage;

template <>
struct Storage<DType::bfloat16> {
  __device__ __forceinline__ static float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ __forceinline__ static uint16_t from_float(float value) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(value));
  }
};

template <>
struct Storage<DType::float16> {
  __device__ __forceinline__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ __forceinline__ static uint16_t from_float(float value) {
    return __half_as_ushort(__float2half_rn(value));
  }
};

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over aligned groups of `width` consecutive lanes (width a power of two <= 32).
__device__ __forceinline__ float group_sum(float value, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// The t-th (0..7) 16-bit lane of a 16-byte vector; t must be a compile-time constant after
// unrolling so the selection folds away (no local-memory array).
__device__ __forceinline__ uint16_t lane16(const uint4& v, int t) {
  const unsigned word = t < 2 ? v.x : t < 4 ? v.y : t < 6 ? v.z : v.w;
  return static_cast<uint16_t>((t & 1) ? (word >> 16) : (word & 0xffffu));
}

// value clamped to [low, high]: how the kernels keep a corrupted index value inside its tensors (the
// GPU ops check index metadata only; reading contents would need a host sync). A valid index is
// unchanged; a corrupted one gives wrong numbers instead of an out-of-bounds access. Two integer
// operations per index read.
template <typename T>
__device__ __forceinline__ T clamp_index(T value, T low, T high) {
  return min(max(value, low), high);
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace sparsekernels::cuda::detail
