// Block-sparse (BSR) linear kernels for CPU: forward, input gradient and kept-block weight gradient.
//
// The weight W [out_features x in_features] is cut into square blocks of block_size. Only kept blocks
// are stored, each contiguous and row-major (row = output feature, column = input feature):
//   values[nnz][block_size][block_size]
// Two indexes over the same blocks, both built once when the pattern is set:
//   row-major (BSR):    block_row_offsets[n_block_rows + 1], block_col_indices[nnz]; block i of block
//                       row r is values[i] for i in [block_row_offsets[r], block_row_offsets[r + 1]).
//   column-major (CSC): block_col_offsets[n_block_cols + 1], block_row_indices[nnz],
//                       block_value_indices[nnz]; entry j of block column c lies in block row
//                       block_row_indices[j] and is stored at values[block_value_indices[j]].
// The CSC index lets the input gradient walk block columns without materialising a transpose.
//
// Dense operands are contiguous row-major. Accumulation is always float32, whatever the storage type.
#pragma once

#include <cstdint>

#include "common.h"

namespace sparsekernels::cpu {

template <typename index_t>
struct BsrIndex {
  const index_t* block_row_offsets;    // [n_block_rows + 1]
  const index_t* block_col_indices;    // [nnz]
  const index_t* block_col_offsets;    // [n_block_cols + 1]
  const index_t* block_row_indices;    // [nnz], CSC order
  const index_t* block_value_indices;  // [nnz], CSC order
  int64_t n_block_rows;                // out_features / block_size
  int64_t n_block_cols;                // in_features / block_size
  int64_t block_size;                  // 16, 32, 64 or 128
  int64_t nnz;                         // number of kept blocks
};

// y[M, out_features] = x[M, in_features] @ W^T (+ bias[out_features] when bias is not null).
// Block rows with no kept block produce bias (or zeros).
template <typename scalar_t, typename index_t>
void bsr_linear_forward(const scalar_t* x, int64_t M, const scalar_t* values, const BsrIndex<index_t>& index,
                        const scalar_t* bias, scalar_t* y, const ParallelFor& parallel_for);

// grad_input[M, in_features] = grad_out[M, out_features] @ W, walking block columns (CSC index).
template <typename scalar_t, typename index_t>
void bsr_linear_grad_input(const scalar_t* grad_out, int64_t M, const scalar_t* values,
                           const BsrIndex<index_t>& index, scalar_t* grad_input, const ParallelFor& parallel_for);

// grad_values[i] = grad_out[:, rows of block i]^T @ x[:, cols of block i], for kept blocks only
// (a sampled dense-dense product: no dense weight gradient is ever formed). Each block is reduced
// over all of M by one task, so the result is deterministic.
template <typename scalar_t, typename index_t>
void bsr_linear_grad_values(const scalar_t* grad_out, const scalar_t* x, int64_t M, const BsrIndex<index_t>& index,
                            scalar_t* grad_values, const ParallelFor& parallel_for);

}  // namespace sparsekernels::cpu
