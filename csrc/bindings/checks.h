// Argument checks shared by the op bindings of every device (and the two shape helpers they use,
// with_last_dim and as_matrix).
//
// They run before any kernel reads memory: a wrong shape, dtype or index length raises a
// ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument and what was
// expected. Two levels (docs/reliability.md):
//
// * Every call, every device (metadata only, O(1)): shapes, dtypes, devices, index lengths, n/m,
//   block size, size limits of the kernels' index types.
// * Every call, host memory only (the "Host-memory checks" below, used by cpu_ops.cpp): whatever
//   keeps a kernel from reading or writing out of bounds, i.e. offsets that start at 0, end at nnz
//   and never decrease, and indices inside their range (O(n_lines + nnz) integer reads, against the
//   O(M * nnz * b^2) work of the kernel), and the N:M position codes of m = 8 (4-bit codes of which
//   8..15 would point past the group).
// * Once, in Python, when a pattern is set (sparsekernels.formats, SparseLinear.load_state_dict):
//   sortedness, duplicates, consistency of the CSC index with the BSR index, N:M offsets strictly
//   increasing within a group. Violating these gives wrong numbers, never an out-of-bounds access.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
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

// [..., features] -> contiguous [M, features]: the matrix every kernel sees.
inline at::Tensor as_matrix(const at::Tensor& operand) {
  return operand.reshape({-1, operand.size(-1)}).contiguous();
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

// The index tensors' metadata; they must be on the device of `operand` (values, or input for
// bsr_linear_grad_values), whose kernels read them.
inline BsrShape check_bsr_index(const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                const at::Tensor& block_value_indices, int64_t block_size, int64_t nnz,
                                const at::Tensor& operand, const char* operand_name) {
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
    TORCH_CHECK_VALUE(tensor->device() == operand.device(), name, " must be on the device of ", operand_name, " (",
                      operand.device(), "), got ", tensor->device());
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
                         block_value_indices, values.size(1), values.size(0), values, "values");
}

// ---------------------------------------------------------------------------------------------
// Host-memory checks (CPU operands only: they read index data).

// The scans below first reduce with branch-free integer ORs (which the compiler vectorises) and only
// walk the data again, to name the first bad entry, when something is wrong.

// offsets[0] == 0, offsets[n_lines] == nnz and offsets never decrease.
template <typename index_t>
void check_offsets_host(const index_t* offsets, int64_t n_lines, int64_t nnz, const char* name) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets[0]) == 0 && static_cast<int64_t>(offsets[n_lines]) == nnz, name,
                    " must start at 0 and end at nnz=", nnz, ", got ", static_cast<int64_t>(offsets[0]), " and ",
                    static_cast<int64_t>(offsets[n_lines]));
  uint32_t decreasing = 0;
  for (int64_t i = 0; i < n_lines; ++i) decreasing |= static_cast<uint32_t>(offsets[i] > offsets[i + 1]);
  if (decreasing == 0) return;
  for (int64_t i = 0; i < n_lines; ++i) {
    TORCH_CHECK_VALUE(offsets[i] <= offsets[i + 1], name, " must be non-decreasing, got ", name, "[", i, "]=",
                      static_cast<int64_t>(offsets[i]), " > ", name, "[", i + 1, "]=",
                      static_cast<int64_t>(offsets[i + 1]));
  }
}

// Every index in [0, limit).
template <typename index_t>
void check_indices_host(const index_t* indices, int64_t count, int64_t limit, const char* name,
                        const char* limit_name) {
  // One unsigned compare also rejects negative indices.
  using unsigned_t = std::make_unsigned_t<index_t>;
  uint32_t out_of_range = 0;
  if (limit <= static_cast<int64_t>(std::numeric_limits<index_t>::max())) {
    const auto bound = static_cast<unsigned_t>(limit);
    for (int64_t i = 0; i < count; ++i) {
      out_of_range |= static_cast<uint32_t>(static_cast<unsigned_t>(indices[i]) >= bound);
    }
  } else {  // every non-negative index_t is below the limit: only negative values are out of range
    for (int64_t i = 0; i < count; ++i) out_of_range |= static_cast<uint32_t>(indices[i] < 0);
  }
  if (out_of_range == 0) return;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t value = static_cast<int64_t>(indices[i]);
    TORCH_CHECK_VALUE(value >= 0 && value < limit, name, " must be in [0, ", limit_name, "=", limit, "), got ",
                      name, "[", i, "]=", value);
  }
}

// m = 8 stores each in-group offset in 4 bits: codes 8..15 would address past the group (and past
// the row for the last group). m = 2, 4 and 16 use every code of their field, so need no check.
inline void check_nm_position_codes_host(const uint8_t* positions, int64_t count, int64_t m) {
  if (m != 8) return;
  uint64_t high_bits = 0;  // bit 3 of every nibble, eight bytes at a time
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    uint64_t word;
    std::memcpy(&word, positions + i, sizeof(word));
    high_bits |= word & 0x8888888888888888ull;
  }
  for (; i < count; ++i) high_bits |= positions[i] & 0x88u;
  TORCH_CHECK_VALUE(high_bits == 0,
                    "positions must hold in-group offsets in [0, m=8) (4-bit codes 0..7), got a code >= 8");
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
  // The CPU kernels hold input columns as int32 (decoded positions, AVX-512 gathers).
  TORCH_CHECK_VALUE(kept_per_row / n * m <= INT32_MAX, "in_features=", kept_per_row / n * m,
                    " exceeds the N:M kernels' limit of 2^31 - 1 input features");
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

// ---------------------------------------------------------------------------------------------
// The operand checks of each op, identical on every device (metadata only). Each returns the
// weight's shape; the device bindings add their own content checks and run the kernel.

// Both operands have at least one dimension (checked before).
inline void check_same_leading_dims(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK_VALUE(grad_output.sizes().slice(0, grad_output.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
                    "grad_output and input must have the same leading dims, got ", grad_output.sizes(), " and ",
                    input.sizes());
}

inline BsrShape check_bsr_linear_operands(const at::Tensor& input, const at::Tensor& values,
                                          const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                          const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                          const at::Tensor& block_value_indices, const std::optional<at::Tensor>& bias) {
  const BsrShape shape = check_bsr_values(values, block_row_offsets, block_col_indices, block_col_offsets,
                                          block_row_indices, block_value_indices);
  check_same_dtype_and_device(input, "input", values, "values");
  check_last_dim(input, "input", shape.in_features(), "in_features");
  check_bias(bias, values, shape.out_features());
  return shape;
}

inline BsrShape check_bsr_grad_input_operands(const at::Tensor& grad_output, const at::Tensor& values,
                                              const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                              const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                              const at::Tensor& block_value_indices) {
  const BsrShape shape = check_bsr_values(values, block_row_offsets, block_col_indices, block_col_offsets,
                                          block_row_indices, block_value_indices);
  check_same_dtype_and_device(grad_output, "grad_output", values, "values");
  check_last_dim(grad_output, "grad_output", shape.out_features(), "out_features");
  return shape;
}

inline BsrShape check_bsr_grad_values_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                               const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                               const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                               const at::Tensor& block_value_indices, int64_t block_size) {
  const BsrShape shape = check_bsr_index(block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                                         block_value_indices, block_size, block_col_indices.numel(), input, "input");
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), "input must be float32, bfloat16 or float16, got ",
                   input.scalar_type());
  check_same_dtype_and_device(grad_output, "grad_output", input, "input");
  check_last_dim(input, "input", shape.in_features(), "in_features");
  check_last_dim(grad_output, "grad_output", shape.out_features(), "out_features");
  check_same_leading_dims(grad_output, input);
  return shape;
}

inline NMShapeInfo check_nm_linear_operands(const at::Tensor& input, const at::Tensor& values,
                                            const at::Tensor& positions, int64_t n, int64_t m,
                                            const std::optional<at::Tensor>& bias) {
  const NMShapeInfo info = check_nm_values(values, positions, n, m);
  check_same_dtype_and_device(input, "input", values, "values");
  check_last_dim(input, "input", info.in_features, "in_features");
  check_bias(bias, values, info.out_features);
  return info;
}

inline NMShapeInfo check_nm_grad_input_operands(const at::Tensor& grad_output, const at::Tensor& values,
                                                const at::Tensor& positions, int64_t n, int64_t m) {
  const NMShapeInfo info = check_nm_values(values, positions, n, m);
  check_same_dtype_and_device(grad_output, "grad_output", values, "values");
  check_last_dim(grad_output, "grad_output", info.out_features, "out_features");
  return info;
}

inline NMShapeInfo check_nm_grad_values_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                                 const at::Tensor& positions, int64_t n, int64_t m) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), "input must be float32, bfloat16 or float16, got ",
                   input.scalar_type());
  check_same_dtype_and_device(grad_output, "grad_output", input, "input");
  TORCH_CHECK_VALUE(m == 2 || m == 4 || m == 8 || m == 16, "m must be one of 2, 4, 8, 16, got ", m);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) % m == 0, "input.shape[-1] must be a multiple of m=", m,
                    ", got shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.dim() >= 1, "grad_output must have at least 1 dimension");
  TORCH_CHECK_VALUE(positions.device() == input.device(), "positions must be on the device of input (",
                    input.device(), "), got ", positions.device());
  const NMShapeInfo info = check_nm_positions(positions, grad_output.size(-1), input.size(-1) / m * n, n, m);
  check_same_leading_dims(grad_output, input);
  return info;
}

// linear_bias_grad has one implementation for every device: a float32-accumulated sum over all
// leading dims, cast back to the storage dtype.
inline at::Tensor linear_bias_grad_any_device(const at::Tensor& grad_output) {
  TORCH_CHECK_TYPE(is_supported_float(grad_output.scalar_type()),
                   "grad_output must be float32, bfloat16 or float16, got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.dim() >= 1, "grad_output must have at least 1 dimension");
  return grad_output.reshape({-1, grad_output.size(-1)}).sum(0, /*keepdim=*/false, at::kFloat).to(grad_output.scalar_type());
}

}  // namespace sparsekernels::bindings
