// Shared helpers of the CUDA test programs: GPU presence (exit code 77 = skipped, for CTest),
// error checks, 16-bit host conversions, a deterministic random generator and host-side pieces of
// the references (2:4 selection, reading strided results back).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/api.cuh"

namespace sparsekernels::cuda::test {

constexpr int kSkipped = 77;  // CTest SKIP_RETURN_CODE

// Exits with kSkipped when no usable GPU is present (no driver, no device).
inline void require_gpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIP: no CUDA GPU\n");
    std::exit(kSkipped);
  }
}

#define SK_CHECK_CUDA(call)                                                                          \
  do {                                                                                               \
    const cudaError_t status_ = (call);                                                              \
    if (status_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

inline uint16_t to_bits(float value, DType dtype) {
  if (dtype == DType::bfloat16) {
    const __nv_bfloat16 h = __float2bfloat16(value);
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    return bits;
  }
  const __half h = __float2half(value);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

inline float from_bits(uint16_t bits, DType dtype) {
  if (dtype == DType::bfloat16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &bits, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// xorshift64*: reproducible across platforms.
struct Random {
  uint64_t state;
  explicit Random(uint64_t seed) : state(seed * 2654435761u + 1) {}
  uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 2685821657736338717ull;
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) / 16777216.f; }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
};

// Device buffer holding a copy of a host vector (freed at exit of scope).
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(const std::vector<T>& host) : count(host.size()) {
    SK_CHECK_CUDA(cudaMalloc(&ptr, count * sizeof(T) + 16));
    if (count) SK_CHECK_CUDA(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit DeviceBuffer(size_t n) : count(n) { SK_CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T) + 16)); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
  std::vector<T> to_host() const {
    std::vector<T> host(count);
    if (count) SK_CHECK_CUDA(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

// Offsets i0 < i1 of the two largest of four scores, the first maximum winning ties: the host
// reference of 2:4 magnitude selection.
inline void top2_of_4(const float s[4], int& i0, int& i1) {
  int best = 0;
  for (int t = 1; t < 4; ++t)
    if (s[t] > s[best]) best = t;
  int second = best == 0 ? 1 : 0;
  for (int t = 0; t < 4; ++t)
    if (t != best && s[t] > s[second]) second = t;
  i0 = best < second ? best : second;
  i1 = best < second ? second : best;
}

// rows x cols 16-bit values of a strided device result (row stride ld), as float [rows, cols].
inline std::vector<float> rows_to_float(const std::vector<uint16_t>& bits, int64_t rows, int64_t cols, int64_t ld,
                                        DType dtype) {
  std::vector<float> values(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) values[r * cols + c] = from_bits(bits[r * ld + c], dtype);
  return values;
}

// |got - want| <= atol + rtol * |want| for every element; prints the first mismatch.
inline bool all_close(const std::vector<float>& got, const std::vector<float>& want, float rtol, float atol,
                      const char* what) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]))) {
      std::fprintf(stderr, "FAIL %s: element %zu: got %g, want %g\n", what, i, got[i], want[i]);
      return false;
    }
  }
  return true;
}

// Relative tolerance of a 16-bit kernel result against a float64 reference.
inline float rtol_for(DType dtype) { return dtype == DType::bfloat16 ? 1.6e-2f : 2e-3f; }

// all_close, then one "ok" or "FAIL" line naming the case.
inline bool report_close(const std::vector<float>& got, const std::vector<float>& want, float rtol, float atol,
                         const char* what) {
  const bool ok = all_close(got, want, rtol, atol, what);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  return ok;
}

}  // namespace sparsekernels::cuda::test
