// 2:4 sparse-tensor-core GEMM through CUTLASS 2.x SparseGemm (mma.sp, sm_80; also runs on sm_90).
//
// Computes y_t = W @ x.T, i.e. y_t[out, tokens] = (x @ W.T).T, with W 2:4 along in_features given as
// kept values[out, in / 2] and metadata in the "sm80" layout of nm24_compress.cuh. CUTLASS's sparse
// GEMM takes the sparse operand as A and (in 2.x) writes a row-major D only, hence the transposed
// output: the caller transposes (and adds the bias) while copying into y. Built only when the
// CUTLASS headers are found (SPARSEKERNELS_WITH_CUTLASS).
#pragma once

#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda {

// out % 32 == 0 (metadata rows), in % 64 == 0 (threadblock K), tokens % 8 == 0 (16-byte vectors of
// x rows and y_t rows), and 16-byte aligned pointers.
bool nm24_gemm_sm80_supported(int64_t out_features, int64_t in_features, int64_t tokens);

// Whether the current device can run this GEMM: compute capability 8.x or 9.x (the archs it is built
// and tested for; later GPUs take the other paths), and the kernel image the driver loads for it was
// compiled for sm_80 or later (older code has no mma.sp: CUTLASS leaves the body empty). Host-side
// queries only (no stream work, no synchronisation); callers cache the answer per device.
bool nm24_gemm_sm80_runnable();

// values, metadata, x (row-major [tokens, in_features]) -> y_t (row-major [out_features, tokens]).
cudaError_t nm24_gemm_sm80(DType dtype, const void* values, const uint16_t* metadata, const void* x, void* y_t,
                           int64_t out_features, int64_t in_features, int64_t tokens, cudaStream_t stream);

}  // namespace sparsekernels::cuda
