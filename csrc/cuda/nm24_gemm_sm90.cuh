// 2:4 sparse-tensor-core GEMM for Hopper through the CUTLASS 3.x sparse collective (sparse wgmma,
// TMA, warp-specialised; sm_90a only).
//
// Computes y = x @ W.T directly into row-major y[tokens, out] (CUTLASS's D is column-major
// [out, tokens]) with W 2:4 along in_features, given as kept values[out, in / 2] and metadata in the
// "sm90" layout of nm24_compress.cuh (MinTileShapeK 128: this kernel's K tile is 128). The bias is
// not fused (the caller adds it). Built only with the CUTLASS headers and only for sm_90a code
// (SPARSEKERNELS_WITH_CUTLASS; compiling it for plain sm_90 is a build error); the launcher
// returns cudaErrorInvalidDevice on other GPUs and cudaErrorNoKernelImageForDevice when the build has
// no sm_90a image of it (see nm24_gemm_sm90_runnable).
#pragma once

#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda {

// in % 128 == 0 (K tile; also TMA's 16-byte rows), out % 8 == 0 and tokens % 8 == 0 (16-byte rows
// of y and x), and 16-byte aligned pointers.
bool nm24_gemm_sm90_supported(int64_t out_features, int64_t in_features, int64_t tokens);

// Whether the current device can run this GEMM: compute capability 9.x, and the kernel image the
// driver loads for it was compiled from sm_90a code. Without a 9.0a entry in the arch list that image
// would be PTX of an older arch, JIT-compiled, whose body CUTLASS reduces to a printf (y left
// unwritten). Host-side queries only (no stream work, no synchronisation; legal during graph capture);
// callers cache the answer per device.
bool nm24_gemm_sm90_runnable();

// values, metadata ("sm90" layout), x (row-major [tokens, in]) -> y (row-major [tokens, out]).
cudaError_t nm24_gemm_sm90(DType dtype, const void* values, const uint16_t* metadata, const void* x, void* y,
                           int64_t out_features, int64_t in_features, int64_t tokens, cudaStream_t stream);

}  // namespace sparsekernels::cuda
