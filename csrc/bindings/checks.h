// Argument checks shared by the op bindings of every device.
//
// They run before any kernel reads memory: a wrong shape, dtype or index length raises a
// ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument and what was
// expected. Index *contents* (bounds, sortedness) are validated once in Python when a pattern is
// set (sparsekernels.formats), not on every call.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sparsekernels::bindings {

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline void check_same_dtype_and_device(const at::Tensor& operand, const char* operand_name,
                                        const at::Tensor& weight, const char* weight_name) {
  TORCH_CHECK_TYPE(is_supported_float(weight.scalar_type()), weight_name,
                   " must be float32, bfloat16 or float16, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(operand.scalar_type() == weight.scalar_type(), "expected ", operand_name, " and ",
                   weight_name, " to have the same dtype (as nn.Linear requires), got ", operand_name, " ",
                   operand.scalar_type(), " and ", weight_name, " ", weight.scalar_type());
  TORCH_CHECK_VALUE(operand.device() == weight.device(), "expected ", operand_name, " and ", weight_name,
                    " on the same device, got ", operand_name, " on ", operand.device(), " and ", weight_name,
                    " on ", weight.device());
}

inline void check_last_dim(const at::Tensor& operand, const char* operand_name, int64_t expected,
                           const char* expected_name) {
  TORCH_CHECK_VALUE(operand.dim() >= 1, operand_name, " must have at least 1 dimension, got a scalar");
  TORCH_CHECK_VALUE(operand.size(-1) == expected, operand_name, ".shape[-1] must equal ", expected_name, "=",
                    expected, ", got shape ", operand.sizes());
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& weight, int64_t out_features) {
  if (!bias.has_value()) return;
  check_same_dtype_and_device(*bias, "bias", weight, "values");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape [out_features=",
                    out_features, "], got ", bias->sizes());
}

// Output shape: operand's leading dims followed by last_dim.
inline std::vector<int64_t> with_last_dim(const at::Tensor& operand, int64_t last_dim) {
  std::vector<int64_t> shape(operand.sizes().begin(), operand.sizes().end());
  shape.back() = last_dim;
  return shape;
}

// Shapes of a block-sparse weight, derived from its values and index tensors (checked).
struct BsrShape {
  int64_t block_size;
  int64_t nnz;
  int64_t n_block_rows;
  int64_t n_block_cols;
  int64_t out_features() const { return n_block_rows * block_size; }
  int64_t in_features() const { return n_block_cols * block_size; }
};

inline BsrShape check_bsr_index(const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                const at::Tensor& block_value_indices, int64_t block_size, int64_t nnz) {
  const std::pair<const at::Tensor*, const char*> index_tensors[] = {
      {&block_row_offsets, "block_row_offsets"}, {&block_col_indices, "block_col_indices"},
      {&block_col_offsets, "block_col_offsets"}, {&block_row_indices, "block_row_indices"},
      {&block_value_indices, "block_value_indices"}};
  const auto index_dtype = block_row_offsets.scalar_type();
  TORCH_CHECK_TYPE(index_dtype == at::kInt || index_dtype == at::kLong,
                   "block_row_offsets must be int32 or int64, got ", index_dtype);
  for (const auto& [tensor, name] : index_tensors) {
    TORCH_CHECK_TYPE(tensor->scalar_type() == index_dtype, name, " must have the dtype of block_row_offsets (",
                     index_dtype, "), got ", tensor->scalar_type());
    TORCH_CHECK_VALUE(tensor->dim() == 1, name, " must be 1-D, got shape ", tensor->sizes());
    TORCH_CHECK_VALUE(tensor->device() == block_row_offsets.device(), name,
                      " must be on the device of block_row_offsets (", block_row_offsets.device(), "), got ",
                      tensor->device());
  }
  TORCH_CHECK_VALUE(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
                    "block_size must be one of 16, 32, 64, 128, got ", block_size);
  TORCH_CHECK_VALUE(block_row_offsets.numel() >= 2, "block_row_offsets must have n_block_rows + 1 >= 2 entries, got ",
                    block_row_offsets.numel());
  TORCH_CHECK_VALUE(block_col_offsets.numel() >= 2, "block_col_offsets must have n_block_cols + 1 >= 2 entries, got ",
                    block_col_offsets.numel());
  for (const auto& [tensor, name] : {index_tensors[1], index_tensors[3], index_tensors[4]}) {
    TORCH_CHECK_VALUE(tensor->numel() == nnz, name, " must have nnz=", nnz, " entries (one per kept block), got ",
                      tensor->numel());
  }
  return BsrShape{block_size, nnz, block_row_offsets.numel() - 1, block_col_offsets.numel() - 1};
}

inline BsrShape check_bsr_values(const at::Tensor& values, const at::Tensor& block_row_offsets,
                                 const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                                 const at::Tensor& block_row_indices, const at::Tensor& block_value_indices) {
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) == values.size(2),
                    "values must have shape [nnz_blocks, block_size, block_size], got ", values.sizes());
  return check_bsr_index(block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                         block_value_indices, values.size(1), values.size(0));
}

// Shapes of an N:M weight, derived from values, positions, n and m (checked).
struct NMShapeInfo {
  int64_t out_features;
  int64_t in_features;
  int64_t kept_per_row;
};

inline int64_t nm_position_bytes(int64_t kept_per_row, int64_t m) {
  const int64_t per_byte = m <= 2 ? 8 : (m <= 4 ? 4 : 2);
  return (kept_per_row + per_byte - 1) / per_byte;
}

// Checks n, m and the packed positions of an N:M weight with kept_per_row values in each of its
// out_features rows.
inline NMShapeInfo check_nm_positions(const at::Tensor& positions, int64_t out_features, int64_t kept_per_row,
                                      int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(m == 2 || m == 4 || m == 8 || m == 16, "m must be one of 2, 4, 8, 16, got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n < m, "n must satisfy 1 <= n < m=", m, ", got n=", n);
  TORCH_CHECK_VALUE(kept_per_row % n == 0, "values.shape[1]=", kept_per_row, " must be a multiple of n=", n);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kByte, "positions must be uint8, got ", positions.scalar_type());
  const int64_t expected_bytes = nm_position_bytes(kept_per_row, m);
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == out_features && positions.size(1) == expected_bytes,
                    "positions must have shape [out_features=", out_features, ", ", expected_bytes, "], got ",
                    positions.sizes());
  return NMShapeInfo{out_features, kept_per_row / n * m, kept_per_row};
}

inline NMShapeInfo check_nm_values(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(values.dim() == 2, "values must have shape [out_features, in_features * n / m], got ",
                    values.sizes());
  TORCH_CHECK_VALUE(positions.device() == values.device(), "positions must be on the device of values (",
                    values.device(), "), got ", positions.device());
  return check_nm_positions(positions, values.size(0), values.size(1), n, m);
}

}  // namespace sparsekernels::bindings
