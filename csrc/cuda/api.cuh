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

}  // namespace sparsekernels::cuda
