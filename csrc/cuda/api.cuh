// Types shared by the launcher APIs of csrc/cuda (host-only, no ATen, no device code).
//
// Every kernel family has a header with a plain C++ launcher API: raw pointers, sizes and a
// cudaStream_t, returning cudaError_t. Launchers check what they need (sizes, alignment) and
// return cudaErrorInvalidValue rather than launching on unsupported input; the callers
// (csrc/bindings/cuda_ops.cpp, csrc/tests/cuda/*) check `*_supported` first and fall back.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparsekernels::cuda {

// 16-bit floating storage the kernels read and write; accumulation is always float32.
enum class DType : int { bfloat16 = 0, float16 = 1 };

// True when p is aligned for 16-byte vector loads.
inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// True when the GEMM extents are positive and fit the int sizes that CUTLASS takes.
inline bool gemm_extents_fit_int(int64_t out_features, int64_t in_features, int64_t tokens) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  return out_features > 0 && in_features > 0 && tokens > 0 && out_features < kLimit && in_features < kLimit &&
         tokens < kLimit;
}

// Compute capability major of the current device, 0 when it cannot be queried.
inline int current_device_major() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return major;
}

// PTX arch (major * 10 + minor) of the image of `kernel` that the driver loads on the current device
// (the arch its code was compiled for, also when that is PTX JIT-compiled for a newer GPU); 0 when the
// build has no image for the device. A failed query's error is cleared, so that a later
// cudaGetLastError() after a launch does not report it.
inline int kernel_ptx_version(const void* kernel) {
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return attributes.ptxVersion;
}

}  // namespace sparsekernels::cuda
