// N:M decode linear for few rows (M <= 16): y = x @ W.T (+ bias), bound by the weight bytes.
//
// W is [out_features, in_features] with n of every m kept along in_features, stored as in
// sparsekernels.formats.NMMatrix: values[out, kept] (kept = in * n / m, kept values in column
// order) and positions[out, ceil(kept / per_byte)] (in-group offsets, 1/2/4/4 bits for
// m = 2/4/8/16, low bits first). The kernel reads every value and position byte once, with 16-byte
// vector loads of values, and splits the reduction over in_features when there are too few output
// rows to fill the GPU (partial sums in a float32 workspace, reduced by a second small kernel).
// Position codes are not checked (that would need a host sync): m = 8 codes are read modulo 8 (8..15
// as 0..7), so a corrupted pattern gives wrong numbers, never an out-of-bounds access.
#pragma once

#include <cstddef>
#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda {

struct NMDecodeProblem {
  int64_t rows;          // M: rows of x and y, 1..16
  int64_t out_features;  // rows of W
  int64_t in_features;   // columns of W (a multiple of m)
  int64_t n;             // kept per group, 1 <= n < m
  int64_t m;             // group size: 2, 4, 8 or 16
  int64_t x_row_stride;  // elements between rows of x (x's columns are contiguous)
  int64_t y_row_stride;  // elements between rows of y (y's columns are contiguous)
};

// Whether nm_decode_linear handles this problem: 1 <= rows <= 16, m in {2, 4, 8, 16}, 1 <= n < m,
// kept values per row a multiple of 8 (16-byte vectors), and 16-byte aligned values.
bool nm_decode_supported(const NMDecodeProblem& problem, const void* values);

// Bytes of float32 workspace nm_decode_linear needs on a GPU with sm_count SMs (0: none).
size_t nm_decode_workspace_bytes(const NMDecodeProblem& problem, int sm_count);

// Launches on stream. bias may be null; workspace must hold nm_decode_workspace_bytes(problem,
// sm_count) bytes (it may be null when that is 0). Returns cudaErrorInvalidValue, launching
// nothing, unless nm_decode_supported.
cudaError_t nm_decode_linear(DType dtype, const void* x, const void* values, const uint8_t* positions,
                             const void* bias, void* y, void* workspace, const NMDecodeProblem& problem,
                             int sm_count, cudaStream_t stream);

}  // namespace sparsekernels::cuda
