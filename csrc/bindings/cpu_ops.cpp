// CPU implementations of the sparsekernels ops: argument checks, then the C++ kernels of csrc/cpu/.
//
// This file is the only place where the CPU kernels meet ATen: it flattens leading dims, makes dense
// operands contiguous, maps c10::BFloat16 / c10::Half storage onto the kernels' own 16-bit types and
// hands at::parallel_for to them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../cpu/bsr.h"
#include "../cpu/nm.h"
#include "checks.h"

namespace sparsekernels::bindings {
namespace {

static_assert(sizeof(cpu::bfloat16) == sizeof(c10::BFloat16) && sizeof(cpu::float16) == sizeof(c10::Half),
              "kernel storage types must match c10's");

void torch_parallel_for(int64_t begin, int64_t end, int64_t grain_size, const cpu::ParallelBody& body) {
  at::parallel_for(begin, end, grain_size, [&](int64_t chunk_begin, int64_t chunk_end) { body(chunk_begin, chunk_end); });
}

// Calls fn with a null pointer of the kernel storage type matching dtype (float, bfloat16, float16).
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return fn(static_cast<cpu::bfloat16*>(nullptr));
    case at::kHalf:
      return fn(static_cast<cpu::float16*>(nullptr));
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype, "; expected float32, bfloat16 or float16");
  }
}

template <typename T>
const T* data_as(const at::Tensor& tensor) {
  return reinterpret_cast<const T*>(tensor.const_data_ptr());
}
template <typename T>
T* mutable_data_as(at::Tensor& tensor) {
  return reinterpret_cast<T*>(tensor.mutable_data_ptr());
}

template <typename index_t>
cpu::BsrIndex<index_t> bsr_index(const BsrShape& shape, const at::Tensor& block_row_offsets,
                                 const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                                 const at::Tensor& block_row_indices, const at::Tensor& block_value_indices) {
  return cpu::BsrIndex<index_t>{block_row_offsets.const_data_ptr<index_t>(),
                                block_col_indices.const_data_ptr<index_t>(),
                                block_col_offsets.const_data_ptr<index_t>(),
                                block_row_indices.const_data_ptr<index_t>(),
                                block_value_indices.const_data_ptr<index_t>(),
                                shape.n_block_rows,
                                shape.n_block_cols,
                                shape.block_size,
                                shape.nnz};
}

// Which of the two indexes a kernel walks: forward and grad_values the BSR one, grad_input the CSC.
enum class IndexWalk { bsr, csc };

// Per-call content checks of the index the kernel walks (see checks.h): nothing out of bounds.
template <typename index_t>
void check_bsr_contents(const BsrShape& shape, const at::Tensor& block_row_offsets,
                        const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                        const at::Tensor& block_row_indices, const at::Tensor& block_value_indices, IndexWalk walk) {
  if (walk == IndexWalk::bsr) {
    check_offsets_host(block_row_offsets.const_data_ptr<index_t>(), shape.n_block_rows, shape.nnz,
                       "block_row_offsets");
    check_indices_host(block_col_indices.const_data_ptr<index_t>(), shape.nnz, shape.n_block_cols,
                       "block_col_indices", "n_block_cols");
  } else {
    check_offsets_host(block_col_offsets.const_data_ptr<index_t>(), shape.n_block_cols, shape.nnz,
                       "block_col_offsets");
    check_indices_host(block_row_indices.const_data_ptr<index_t>(), shape.nnz, shape.n_block_rows,
                       "block_row_indices", "n_block_rows");
    check_indices_host(block_value_indices.const_data_ptr<index_t>(), shape.nnz, shape.nnz, "block_value_indices",
                       "nnz");
  }
}

// Calls fn(BsrIndex<index_t>) for the index dtype of the (checked) index tensors, after checking
// the contents of the index the kernel walks.
template <typename Fn>
void with_bsr_index(const BsrShape& shape, const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                    const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                    const at::Tensor& block_value_indices, IndexWalk walk, Fn&& fn) {
  const auto offsets = block_row_offsets.contiguous(), cols = block_col_indices.contiguous(),
             col_offsets = block_col_offsets.contiguous(), rows = block_row_indices.contiguous(),
             value_indices = block_value_indices.contiguous();
  if (offsets.scalar_type() == at::kInt) {
    check_bsr_contents<int32_t>(shape, offsets, cols, col_offsets, rows, value_indices, walk);
    fn(bsr_index<int32_t>(shape, offsets, cols, col_offsets, rows, value_indices));
  } else {
    check_bsr_contents<int64_t>(shape, offsets, cols, col_offsets, rows, value_indices, walk);
    fn(bsr_index<int64_t>(shape, offsets, cols, col_offsets, rows, value_indices));
  }
}

// The content checks alone, for calls that return before reaching a kernel (empty operands): a
// corrupted index raises whatever the batch size.
void check_bsr_contents_only(const BsrShape& shape, const at::Tensor& block_row_offsets,
                             const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                             const at::Tensor& block_row_indices, const at::Tensor& block_value_indices,
                             IndexWalk walk) {
  with_bsr_index(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                 block_value_indices, walk, [](const auto&) {});
}

at::Tensor bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& block_row_offsets,
                      const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                      const at::Tensor& block_row_indices, const at::Tensor& block_value_indices,
                      const std::optional<at::Tensor>& bias) {
  const BsrShape shape = check_bsr_linear_operands(input, values, block_row_offsets, block_col_indices,
                                                   block_col_offsets, block_row_indices, block_value_indices, bias);

  auto output = at::empty(with_last_dim(input, shape.out_features()), input.options());
  if (output.numel() == 0) {
    check_bsr_contents_only(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                            block_value_indices, IndexWalk::bsr);
    return output;
  }
  const auto x = as_matrix(input);
  const auto weight_values = values.contiguous();
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  dispatch_float(input.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    with_bsr_index(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                   block_value_indices, IndexWalk::bsr, [&](const auto& index) {
                     cpu::bsr_linear_forward<scalar_t>(
                         data_as<scalar_t>(x), x.size(0), data_as<scalar_t>(weight_values), index,
                         bias_values.defined() ? data_as<scalar_t>(bias_values) : nullptr,
                         mutable_data_as<scalar_t>(output), torch_parallel_for);
                   });
  });
  return output;
}

at::Tensor bsr_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& values,
                                 const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                 const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                 const at::Tensor& block_value_indices) {
  const BsrShape shape = check_bsr_grad_input_operands(grad_output, values, block_row_offsets, block_col_indices,
                                                       block_col_offsets, block_row_indices, block_value_indices);

  auto grad_input = at::empty(with_last_dim(grad_output, shape.in_features()), grad_output.options());
  if (grad_input.numel() == 0) {
    check_bsr_contents_only(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                            block_value_indices, IndexWalk::csc);
    return grad_input;
  }
  const auto dy = as_matrix(grad_output);
  const auto weight_values = values.contiguous();
  dispatch_float(values.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    with_bsr_index(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                   block_value_indices, IndexWalk::csc, [&](const auto& index) {
                     cpu::bsr_linear_grad_input<scalar_t>(data_as<scalar_t>(dy), dy.size(0),
                                                          data_as<scalar_t>(weight_values), index,
                                                          mutable_data_as<scalar_t>(grad_input), torch_parallel_for);
                   });
  });
  return grad_input;
}

at::Tensor bsr_linear_grad_values(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                  const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                  const at::Tensor& block_value_indices, int64_t block_size) {
  const BsrShape shape = check_bsr_grad_values_operands(grad_output, input, block_row_offsets, block_col_indices,
                                                        block_col_offsets, block_row_indices, block_value_indices,
                                                        block_size);
  const auto x = as_matrix(input);
  const auto dy = as_matrix(grad_output);

  if (x.size(0) == 0 || shape.nnz == 0) {
    check_bsr_contents_only(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                            block_value_indices, IndexWalk::bsr);
    // With no rows to reduce over, the gradient of every kept block is zero.
    return at::zeros({shape.nnz, block_size, block_size}, input.options());
  }
  auto grad_values = at::empty({shape.nnz, block_size, block_size}, input.options());
  dispatch_float(input.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    with_bsr_index(shape, block_row_offsets, block_col_indices, block_col_offsets, block_row_indices,
                   block_value_indices, IndexWalk::bsr, [&](const auto& index) {
                     cpu::bsr_linear_grad_values<scalar_t>(data_as<scalar_t>(dy), data_as<scalar_t>(x), x.size(0),
                                                           index, mutable_data_as<scalar_t>(grad_values),
                                                           torch_parallel_for);
                   });
  });
  return grad_values;
}

// positions as a contiguous tensor whose codes have been checked (see checks.h).
at::Tensor checked_positions(const at::Tensor& positions, int64_t m) {
  auto packed = positions.contiguous();
  check_nm_position_codes_host(packed.const_data_ptr<uint8_t>(), packed.numel(), m);
  return packed;
}

cpu::NMShape nm_kernel_shape(const NMShapeInfo& info, int64_t n, int64_t m) {
  return cpu::NMShape{info.out_features, info.in_features, n, m};
}

at::Tensor nm_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& positions, int64_t n,
                     int64_t m, const std::optional<at::Tensor>& bias) {
  const NMShapeInfo info = check_nm_linear_operands(input, values, positions, n, m, bias);
  const auto packed_positions = checked_positions(positions, m);

  auto output = at::empty(with_last_dim(input, info.out_features), input.options());
  if (output.numel() == 0) return output;
  const auto x = as_matrix(input);
  const auto weight_values = values.contiguous();
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  dispatch_float(input.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    cpu::nm_linear_forward<scalar_t>(data_as<scalar_t>(x), x.size(0), data_as<scalar_t>(weight_values),
                                     packed_positions.const_data_ptr<uint8_t>(), nm_kernel_shape(info, n, m),
                                     bias_values.defined() ? data_as<scalar_t>(bias_values) : nullptr,
                                     mutable_data_as<scalar_t>(output), torch_parallel_for);
  });
  return output;
}

at::Tensor nm_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& positions,
                                int64_t n, int64_t m) {
  const NMShapeInfo info = check_nm_grad_input_operands(grad_output, values, positions, n, m);
  const auto packed_positions = checked_positions(positions, m);

  auto grad_input = at::empty(with_last_dim(grad_output, info.in_features), grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  const auto dy = as_matrix(grad_output);
  const auto weight_values = values.contiguous();
  dispatch_float(values.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    cpu::nm_linear_grad_input<scalar_t>(data_as<scalar_t>(dy), dy.size(0), data_as<scalar_t>(weight_values),
                                        packed_positions.const_data_ptr<uint8_t>(), nm_kernel_shape(info, n, m),
                                        mutable_data_as<scalar_t>(grad_input), torch_parallel_for);
  });
  return grad_input;
}

at::Tensor nm_linear_grad_values(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& positions,
                                 int64_t n, int64_t m) {
  const NMShapeInfo info = check_nm_grad_values_operands(grad_output, input, positions, n, m);
  const auto packed_positions = checked_positions(positions, m);
  const auto x = as_matrix(input);
  const auto dy = as_matrix(grad_output);

  if (x.size(0) == 0) return at::zeros({info.out_features, info.kept_per_row}, input.options());
  auto grad_values = at::empty({info.out_features, info.kept_per_row}, input.options());
  if (grad_values.numel() == 0) return grad_values;
  dispatch_float(input.scalar_type(), [&](auto* type_tag) {
    using scalar_t = std::remove_pointer_t<decltype(type_tag)>;
    cpu::nm_linear_grad_values<scalar_t>(data_as<scalar_t>(dy), data_as<scalar_t>(x), x.size(0),
                                         packed_positions.const_data_ptr<uint8_t>(), nm_kernel_shape(info, n, m),
                                         mutable_data_as<scalar_t>(grad_values), torch_parallel_for);
  });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekernels, CPU, m) {
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_grad_input", &bsr_linear_grad_input);
  m.impl("bsr_linear_grad_values", &bsr_linear_grad_values);
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_linear_grad_input", &nm_linear_grad_input);
  m.impl("nm_linear_grad_values", &nm_linear_grad_values);
  m.impl("linear_bias_grad", &linear_bias_grad_any_device);
}

}  // namespace sparsekernels::bindings
