// Block-sparse decode linear for few rows (M <= 16): y = x @ W.T (+ bias), reading kept blocks only.
//
// W is [out_features, in_features] held as sparsekernels.formats.BlockSparseMatrix: values[nnz, b, b]
// (row-major inside a block), block_row_offsets[R + 1] and block_col_indices[nnz] (BSR, int32 or
// int64). Each kept block is read once with 16-byte vector loads; empty block rows give the bias.
// Index contents are not checked (that would need a host sync) but clamped as they are read
// (offsets into [0, nnz], block columns into [0, in_features / block_size)): a corrupted index gives
// wrong numbers, never an out-of-bounds access.
#pragma once

#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda {

struct BsrDecodeProblem {
  int64_t rows;          // M: rows of x and y, 1..16
  int64_t out_features;  // n_block_rows * block_size
  int64_t in_features;   // n_block_cols * block_size
  int64_t block_size;    // 16, 32, 64 or 128
  int64_t nnz;           // kept blocks: entries of values and block_col_indices
  int64_t x_row_stride;  // elements between rows of x (columns contiguous, rows 16-byte aligned)
  int64_t y_row_stride;  // elements between rows of y
};

// Whether bsr_decode_linear handles this problem: 1 <= rows <= 16, block_size in {16, 32, 64, 128},
// values and x 16-byte aligned with x_row_stride a multiple of 8.
bool bsr_decode_supported(const BsrDecodeProblem& problem, const void* x, const void* values);

// Launches on stream; index_is_int64 selects the dtype of both index tensors. bias may be null.
cudaError_t bsr_decode_linear(DType dtype, bool index_is_int64, const void* x, const void* values,
                              const void* block_row_offsets, const void* block_col_indices, const void* bias,
                              void* y, const BsrDecodeProblem& problem, cudaStream_t stream);

}  // namespace sparsekernels::cuda
