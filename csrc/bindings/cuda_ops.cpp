// CUDA implementations of the sparsekernels ops: argument checks, then the kernels of csrc/cuda/ for
// the cases they cover, else a composite path (expand the weight to dense, then ATen matmuls).
//
// Kernel paths (bfloat16 / float16 only; float32 always takes the composite path):
//   * nm_linear / bsr_linear with M = prod(leading dims) <= 16: the decode kernels
//     (nm_decode.cu, bsr_decode.cu), which read every kept weight byte once.
//   * nm_linear, 2:4, M > 16, built with CUTLASS: the sparse tensor core GEMM on metadata derived
//     from positions on the fly (nm24_compress.cu). Hopper (sm_90), in % 128 == 0, out % 8 == 0:
//     nm24_gemm_sm90.cu (sparse wgmma) writes y directly, the bias is added after. Other 8.x / 9.x
//     GPUs (or shapes), out % 32 == 0 and in % 64 == 0: nm24_gemm_sm80.cu (mma.sp) writes y.T and
//     the transposed copy into y carries the bias. Rows of x are zero-padded to a multiple of 8.
//     Each GEMM is taken only where nm24_gemm_sm*_runnable says the build has a real image of it
//     for the device (GPUs after Hopper, or a build without 9.0a, fall back).
// Backward ops run the composite path for now: grad_input = grad_output @ W (dense W),
// grad_values = (grad_output.T @ input) sampled at the kept positions.
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which needs the cuBLAS headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../cuda/bsr_decode.cuh"
#include "../cuda/nm24_compress.cuh"
#include "../cuda/nm_decode.cuh"
#ifdef SPARSEKERNELS_WITH_CUTLASS
#include "../cuda/nm24_gemm_sm80.cuh"
#include "../cuda/nm24_gemm_sm90.cuh"
#endif
#include "checks.h"

namespace sparsekernels::bindings {
namespace {

namespace kernels = sparsekernels::cuda;

constexpr int64_t kMaxDecodeRows = 16;

bool is_16bit(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

kernels::DType kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? kernels::DType::bfloat16 : kernels::DType::float16;
}

// Per-device properties, queried once (host-side queries only: no synchronisation).
struct DeviceInfo {
  int sm_count = 0;
  // Whether each 2:4 GEMM can run here: the GPU's arch is one the kernel is built for and the build
  // holds a real image of it for this device (nm24_gemm_sm*_runnable); else those shapes fall back.
  bool gemm_sm80 = false;
  bool gemm_sm90 = false;
};

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  DeviceInfo& info = cache[device];
  if (info.sm_count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
#ifdef SPARSEKERNELS_WITH_CUTLASS
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // the queries read the current device
    info.gemm_sm80 = kernels::nm24_gemm_sm80_runnable();
    info.gemm_sm90 = kernels::nm24_gemm_sm90_runnable();
#endif
  }
  return info;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// 16-byte aligned contiguous copy when the tensor's data is not (e.g. a view with an odd offset).
at::Tensor aligned_contiguous(const at::Tensor& tensor) {
  at::Tensor result = tensor.contiguous();
  return kernels::aligned16(result.const_data_ptr()) ? result : result.clone();
}

// ------------------------------------------------------------------------- composite helpers
// Index contents are not checked on the GPU (that would need a host sync): like the kernels, these
// helpers clamp every index value into its range, so a corrupted index gives wrong numbers, never an
// out-of-range index (ATen's device-side asserts would then poison the CUDA context).

// Column of every kept value of an N:M matrix, [out, kept] int64 (unpacking as in
// sparsekernels.reference: offsets packed 1/2/4/4 bits for m = 2/4/8/16, low bits first; the low
// log2(m) bits of each code are the offset, so m = 8 codes 8..15 are read modulo 8, as nm_decode
// reads them).
at::Tensor nm_columns(const at::Tensor& positions, int64_t n, int64_t m, int64_t kept) {
  const int64_t bits = m == 2 ? 1 : (m == 4 ? 2 : 4);
  const auto shifts = at::arange(8 / bits, positions.options().dtype(at::kInt)) * bits;
  const auto offsets = at::bitwise_right_shift(positions.to(at::kInt).unsqueeze(-1), shifts)
                           .bitwise_and(m - 1)
                           .reshape({positions.size(0), -1})
                           .slice(1, 0, kept)
                           .to(at::kLong);
  return offsets + at::arange(kept, positions.options().dtype(at::kLong)).div(n, "floor") * m;
}

// Dense [out, in] weight of an N:M matrix.
at::Tensor nm_dense_weight(const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                           int64_t in_features) {
  const auto columns = nm_columns(positions.contiguous(), n, m, values.size(1));
  return at::zeros({values.size(0), in_features}, values.options()).scatter_(1, columns, values);
}

// Block row of every kept block, [nnz] int64: the number of block rows that end at or before it
// (row r holds blocks offsets[r] .. offsets[r + 1] - 1), clamped to [0, n_block_rows). Whatever the
// offsets hold, every result is a valid block row (repeat_interleave with a fixed output size, the
// obvious alternative, relies on the counts being non-negative and summing to nnz).
at::Tensor bsr_block_rows(const at::Tensor& block_row_offsets, int64_t nnz) {
  const auto row_ends = block_row_offsets.slice(0, 1).to(at::kLong).contiguous();
  const auto kept_blocks = at::arange(nnz, row_ends.options());
  return at::searchsorted(row_ends, kept_blocks, /*out_int32=*/false, /*right=*/true).clamp_max_(row_ends.size(0) - 1);
}

// Block column of every kept block, [nnz] int64, clamped to [0, n_block_cols).
at::Tensor bsr_block_cols(const at::Tensor& block_col_indices, int64_t n_block_cols) {
  return block_col_indices.to(at::kLong).clamp(0, n_block_cols - 1);
}

at::Tensor bsr_dense_weight(const at::Tensor& values, const at::Tensor& block_row_offsets,
                            const at::Tensor& block_col_indices, const BsrShape& shape) {
  const int64_t b = shape.block_size;
  const auto flat = bsr_block_rows(block_row_offsets, shape.nnz) * shape.n_block_cols +
                    bsr_block_cols(block_col_indices, shape.n_block_cols);
  auto blocks = at::zeros({shape.n_block_rows * shape.n_block_cols, b, b}, values.options());
  blocks.index_put_({flat}, values);
  return blocks.reshape({shape.n_block_rows, shape.n_block_cols, b, b})
      .permute({0, 2, 1, 3})
      .reshape({shape.out_features(), shape.in_features()});
}

// ------------------------------------------------------------------------- N:M
bool try_nm_decode(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions, int64_t n, int64_t m,
                   const at::Tensor& bias, at::Tensor& y) {
  const kernels::NMDecodeProblem problem{x.size(0), values.size(0), x.size(1), n, m, x.size(1), values.size(0)};
  if (!kernels::nm_decode_supported(problem, values.const_data_ptr())) return false;
  const DeviceInfo info = device_info(x.get_device());
  const size_t workspace_bytes = kernels::nm_decode_workspace_bytes(problem, info.sm_count);
  at::Tensor workspace;
  if (workspace_bytes > 0) workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(kernels::nm_decode_linear(kernel_dtype(x.scalar_type()), x.const_data_ptr(), values.const_data_ptr(),
                                           positions.const_data_ptr<uint8_t>(),
                                           bias.defined() ? bias.const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                           workspace.defined() ? workspace.mutable_data_ptr() : nullptr, problem,
                                           info.sm_count, current_stream()));
  return true;
}

#ifdef SPARSEKERNELS_WITH_CUTLASS
at::Tensor nm24_metadata_for(const at::Tensor& positions, int64_t out, int64_t in, kernels::Nm24Layout layout,
                             cudaStream_t stream) {
  auto metadata = at::empty({static_cast<int64_t>(kernels::nm24_metadata_words(out, in, layout))},
                            positions.options().dtype(at::kShort));
  C10_CUDA_CHECK(kernels::nm24_metadata_from_positions(positions.const_data_ptr<uint8_t>(), out, in, layout,
                                                       reinterpret_cast<uint16_t*>(metadata.mutable_data_ptr()), stream));
  return metadata;
}

bool try_nm24_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& positions, const at::Tensor& bias,
                   at::Tensor& y) {
  const int64_t out = values.size(0), in = x.size(1), tokens = x.size(0);
  const int64_t padded_tokens = (tokens + 7) / 8 * 8;  // 16-byte rows of x and of the output
  const DeviceInfo info = device_info(x.get_device());
  const bool use_sm90 = info.gemm_sm90 && kernels::nm24_gemm_sm90_supported(out, in, padded_tokens);
  if (!use_sm90 && !(info.gemm_sm80 && kernels::nm24_gemm_sm80_supported(out, in, padded_tokens))) return false;
  at::Tensor operand = x;
  if (padded_tokens != tokens) {
    operand = at::zeros({padded_tokens, in}, x.options());
    operand.slice(0, 0, tokens).copy_(x);
  }
  const cudaStream_t stream = current_stream();
  const auto dtype = kernel_dtype(x.scalar_type());
  if (use_sm90) {
    const auto metadata = nm24_metadata_for(positions, out, in, kernels::Nm24Layout::sm90, stream);
    at::Tensor result = padded_tokens == tokens ? y : at::empty({padded_tokens, out}, x.options());
    C10_CUDA_CHECK(kernels::nm24_gemm_sm90(dtype, values.const_data_ptr(),
                                           reinterpret_cast<const uint16_t*>(metadata.const_data_ptr()),
                                           operand.const_data_ptr(), result.mutable_data_ptr(), out, in, padded_tokens,
                                           stream));
    if (padded_tokens != tokens) y.copy_(result.slice(0, 0, tokens));
    if (bias.defined()) y.add_(bias);
    return true;
  }
  const auto metadata = nm24_metadata_for(positions, out, in, kernels::Nm24Layout::sm80, stream);
  auto y_t = at::empty({out, padded_tokens}, x.options());
  C10_CUDA_CHECK(kernels::nm24_gemm_sm80(dtype, values.const_data_ptr(),
                                         reinterpret_cast<const uint16_t*>(metadata.const_data_ptr()),
                                         operand.const_data_ptr(), y_t.mutable_data_ptr(), out, in, padded_tokens,
                                         stream));
  const auto transposed = y_t.slice(1, 0, tokens).t();
  if (bias.defined()) {
    at::add_out(y, transposed, bias);
  } else {
    y.copy_(transposed);
  }
  return true;
}
#endif

at::Tensor nm_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& positions, int64_t n,
                     int64_t m, const std::optional<at::Tensor>& bias) {
  const NMShapeInfo info = check_nm_linear_operands(input, values, positions, n, m, bias);
  const c10::cuda::CUDAGuard guard(input.device());

  auto output = at::empty(with_last_dim(input, info.out_features), input.options());
  if (output.numel() == 0) return output;
  const auto x = aligned_contiguous(as_matrix(input));
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (is_16bit(input.scalar_type()) && info.kept_per_row > 0) {
    const auto weight_values = aligned_contiguous(values);
    const auto packed_positions = positions.contiguous();
    auto y = output.view({x.size(0), info.out_features});
    if (x.size(0) <= kMaxDecodeRows && try_nm_decode(x, weight_values, packed_positions, n, m, bias_values, y))
      return output;
#ifdef SPARSEKERNELS_WITH_CUTLASS
    if (n == 2 && m == 4 && x.size(0) > kMaxDecodeRows &&
        try_nm24_gemm(x, weight_values, packed_positions, bias_values, y))
      return output;
#endif
  }
  const auto weight = nm_dense_weight(values, positions, n, m, info.in_features);
  output.copy_(at::linear(input, weight, bias_values.defined() ? std::optional<at::Tensor>(bias_values) : std::nullopt));
  return output;
}

at::Tensor nm_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& positions,
                                int64_t n, int64_t m) {
  const NMShapeInfo info = check_nm_grad_input_operands(grad_output, values, positions, n, m);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  if (grad_output.numel() == 0) return at::zeros(with_last_dim(grad_output, info.in_features), grad_output.options());
  return at::matmul(grad_output, nm_dense_weight(values, positions, n, m, info.in_features));
}

at::Tensor nm_linear_grad_values(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& positions,
                                 int64_t n, int64_t m) {
  const NMShapeInfo info = check_nm_grad_values_operands(grad_output, input, positions, n, m);
  const auto x = as_matrix(input);
  const auto dy = as_matrix(grad_output);
  const c10::cuda::CUDAGuard guard(input.device());
  if (x.size(0) == 0 || info.kept_per_row == 0)
    return at::zeros({info.out_features, info.kept_per_row}, input.options());
  // Dense product in float32 accumulation (matmul), sampled at the kept columns.
  const auto full = at::mm(dy.t(), x);
  return full.gather(1, nm_columns(positions.contiguous(), n, m, info.kept_per_row)).contiguous();
}

// ------------------------------------------------------------------------- block-sparse
at::Tensor bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& block_row_offsets,
                      const at::Tensor& block_col_indices, const at::Tensor& block_col_offsets,
                      const at::Tensor& block_row_indices, const at::Tensor& block_value_indices,
                      const std::optional<at::Tensor>& bias) {
  const BsrShape shape = check_bsr_linear_operands(input, values, block_row_offsets, block_col_indices,
                                                   block_col_offsets, block_row_indices, block_value_indices, bias);
  const c10::cuda::CUDAGuard guard(input.device());

  auto output = at::empty(with_last_dim(input, shape.out_features()), input.options());
  if (output.numel() == 0) return output;
  const auto x = aligned_contiguous(as_matrix(input));
  const auto bias_values = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (is_16bit(input.scalar_type()) && x.size(0) <= kMaxDecodeRows) {
    const auto weight_values = aligned_contiguous(values);
    const kernels::BsrDecodeProblem problem{x.size(0), shape.out_features(), shape.in_features(), shape.block_size,
                                            shape.nnz, x.size(1), shape.out_features()};
    if (kernels::bsr_decode_supported(problem, x.const_data_ptr(), weight_values.const_data_ptr())) {
      const auto offsets = block_row_offsets.contiguous(), cols = block_col_indices.contiguous();
      C10_CUDA_CHECK(kernels::bsr_decode_linear(
          kernel_dtype(input.scalar_type()), offsets.scalar_type() == at::kLong, x.const_data_ptr(),
          weight_values.const_data_ptr(), offsets.const_data_ptr(), cols.const_data_ptr(),
          bias_values.defined() ? bias_values.const_data_ptr() : nullptr, output.mutable_data_ptr(), problem,
          current_stream()));
      return output;
    }
  }
  const auto weight = bsr_dense_weight(values, block_row_offsets, block_col_indices, shape);
  output.copy_(at::linear(input, weight, bias_values.defined() ? std::optional<at::Tensor>(bias_values) : std::nullopt));
  return output;
}

at::Tensor bsr_linear_grad_input(const at::Tensor& grad_output, const at::Tensor& values,
                                 const at::Tensor& block_row_offsets, const at::Tensor& block_col_indices,
                                 const at::Tensor& block_col_offsets, const at::Tensor& block_row_indices,
                                 const at::Tensor& block_value_indices) {
  const BsrShape shape = check_bsr_grad_input_operands(grad_output, values, block_row_offsets, block_col_indices,
                                                       block_col_offsets, block_row_indices, block_value_indices);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  if (grad_output.numel() == 0) return at::zeros(with_last_dim(grad_output, shape.in_features()), grad_output.options());
  return at::matmul(grad_output, bsr_dense_weight(values, block_row_offsets, block_col_indices, shape));
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
  const c10::cuda::CUDAGuard guard(input.device());
  if (x.size(0) == 0 || shape.nnz == 0) return at::zeros({shape.nnz, block_size, block_size}, input.options());
  // grad[k] = dy[:, rows of block k].T @ x[:, cols of block k], batched over the kept blocks.
  const int64_t rows = x.size(0);
  const auto block_rows = bsr_block_rows(block_row_offsets, shape.nnz);
  const auto block_cols = bsr_block_cols(block_col_indices, shape.n_block_cols);
  const auto dy_blocks = dy.view({rows, shape.n_block_rows, block_size}).index_select(1, block_rows);  // [M, nnz, b]
  const auto x_blocks = x.view({rows, shape.n_block_cols, block_size}).index_select(1, block_cols);     // [M, nnz, b]
  return at::bmm(dy_blocks.permute({1, 2, 0}), x_blocks.permute({1, 0, 2})).contiguous();
}

// ------------------------------------------------------------------------- 2:4 compression
kernels::Nm24Layout nm24_layout(c10::string_view name) {
  if (name == "natural") return kernels::Nm24Layout::natural;
  if (name == "sm80") return kernels::Nm24Layout::sm80;
  if (name == "sm90") return kernels::Nm24Layout::sm90;
  if (name == "sm90_k64") return kernels::Nm24Layout::sm90_k64;
  TORCH_CHECK_VALUE(name == "sm90_k32", "layout must be one of 'natural', 'sm80', 'sm90', 'sm90_k64', 'sm90_k32', got '",
                    name, "'");
  return kernels::Nm24Layout::sm90_k32;
}

void check_nm24_shape(int64_t rows, int64_t cols, c10::string_view layout) {
  TORCH_CHECK_VALUE(rows >= 1 && cols >= 16 && cols % 16 == 0,
                    "2:4 metadata needs in_features (cols) to be a positive multiple of 16, got ", rows, "x", cols);
  TORCH_CHECK_VALUE(layout != "sm80" || (rows % 32 == 0 && cols % 32 == 0),
                    "the sm80 metadata layout needs out_features % 32 == 0 and in_features % 32 == 0, got ", rows,
                    "x", cols);
}

std::tuple<at::Tensor, at::Tensor> nm24_compress(const at::Tensor& weight, const std::optional<at::Tensor>& mask,
                                                 c10::string_view layout_name) {
  const auto layout = nm24_layout(layout_name);
  TORCH_CHECK_TYPE(is_16bit(weight.scalar_type()), "weight must be bfloat16 or float16, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_cuda(), "weight must be a CUDA tensor, got one on ", weight.device());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  check_nm24_shape(rows, cols, layout_name);
  at::Tensor mask_bytes;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->sizes() == weight.sizes(), "mask must have the shape of weight ", weight.sizes(), ", got ",
                      mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == weight.device(), "mask must be on ", weight.device(), ", got ", mask->device());
    mask_bytes = aligned_contiguous(mask->view(at::kByte));
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto dense = aligned_contiguous(weight);
  auto values = at::empty({rows, cols / 2}, weight.options());
  auto metadata = at::empty({static_cast<int64_t>(kernels::nm24_metadata_words(rows, cols, layout))},
                            weight.options().dtype(at::kShort));
  auto bad_groups = at::zeros({1}, weight.options().dtype(at::kInt));
  C10_CUDA_CHECK(kernels::nm24_compress(kernel_dtype(weight.scalar_type()), dense.const_data_ptr(), cols,
                                        mask_bytes.defined() ? mask_bytes.const_data_ptr<uint8_t>() : nullptr, cols,
                                        rows, cols, layout, values.mutable_data_ptr(),
                                        reinterpret_cast<uint16_t*>(metadata.mutable_data_ptr()),
                                        bad_groups.mutable_data_ptr<int>(), current_stream()));
  if (mask_bytes.defined()) {
    const int64_t bad = bad_groups.item<int>();  // synchronises; masks change rarely
    TORCH_CHECK_VALUE(bad == 0, "mask must keep exactly n=2 of every m=4 weights; ", bad, " groups do not");
  }
  if (layout == kernels::Nm24Layout::natural) metadata = metadata.view({rows, cols / 16});
  return {values, metadata};
}

at::Tensor nm24_metadata_from_positions(const at::Tensor& positions, int64_t out_features, int64_t in_features,
                                        c10::string_view layout_name) {
  const auto layout = nm24_layout(layout_name);
  check_nm24_shape(out_features, in_features, layout_name);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kByte, "positions must be uint8, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == out_features && positions.size(1) == in_features / 8,
                    "positions of a 2:4 weight must have shape [", out_features, ", ", in_features / 8, "], got ",
                    positions.sizes());
  const c10::cuda::CUDAGuard guard(positions.device());
  const auto packed = positions.contiguous();
  auto metadata = at::empty({static_cast<int64_t>(kernels::nm24_metadata_words(out_features, in_features, layout))},
                            positions.options().dtype(at::kShort));
  C10_CUDA_CHECK(kernels::nm24_metadata_from_positions(packed.const_data_ptr<uint8_t>(), out_features, in_features,
                                                       layout, reinterpret_cast<uint16_t*>(metadata.mutable_data_ptr()),
                                                       current_stream()));
  if (layout == kernels::Nm24Layout::natural) metadata = metadata.view({out_features, in_features / 16});
  return metadata;
}

}  // namespace

// CUDA-only ops of the 2:4 sparse tensor core path (sparsekernels.formats.nm24_metadata calls them for
// CUDA tensors; its pure-PyTorch functions are the reference). Metadata: int16 bit patterns, flat in
// the sm80/sm90 layouts, [out, in / 16] in the natural one.
TORCH_LIBRARY_FRAGMENT(sparsekernels, m) {
  m.def("nm24_compress(Tensor weight, Tensor? mask, str layout) -> (Tensor, Tensor)");
  m.def("nm24_metadata_from_positions(Tensor positions, int out_features, int in_features, str layout) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekernels, CUDA, m) {
  m.impl("nm24_compress", &nm24_compress);
  m.impl("nm24_metadata_from_positions", &nm24_metadata_from_positions);
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_grad_input", &bsr_linear_grad_input);
  m.impl("bsr_linear_grad_values", &bsr_linear_grad_values);
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_linear_grad_input", &nm_linear_grad_input);
  m.impl("nm_linear_grad_values", &nm_linear_grad_values);
  m.impl("linear_bias_grad", &linear_bias_grad_any_device);
}

}  // namespace sparsekernels::bindings
