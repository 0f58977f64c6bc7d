// Block-sparse decode linear for M <= 16 (see bsr_decode.cuh for the contract).
//
// Work split: block (CTA) (chunk, block_row) owns kRowsPerCta consecutive weight rows of one block
// row. Its 256 threads are laid out as [lanes_k][kRowsPerCta][b / 8]: the b / 8 consecutive threads
// of a weight row each hold one 16-byte vector (8 columns) of that row in every kept block, and
// lanes_k > 1 (small blocks) deals the block row's kept blocks round-robin over thread groups so
// all 256 threads work. x is read straight from global memory (it is small and shared by every
// CTA, so it lives in L1/L2). Partial sums are reduced over the b / 8 threads with shuffles, then
// over lanes_k through shared memory.
#include <limits>

#include "bsr_decode.cuh"
#include "device_common.cuh"

namespace sparsekernels::cuda {
namespace {

using detail::Storage;

constexpr int kThreads = 256;

template <int B>
struct Tiling {
  static constexpr int kVectorsPerRow = B / 8;                                   // 2, 4, 8, 16
  static constexpr int kRowsPerCta = (kThreads / kVectorsPerRow) < B ? kThreads / kVectorsPerRow : B;
  static constexpr int kLanesK = kThreads / (kVectorsPerRow * kRowsPerCta);      // 8, 2, 1, 1
  static constexpr int kChunks = B / kRowsPerCta;                                // 1, 1, 2, 8
  static_assert(kVectorsPerRow * kRowsPerCta * kLanesK == kThreads, "tiling must use every thread");
};

template <DType kDType, typename index_t, int B, int MB>
__global__ void __launch_bounds__(kThreads)
    bsr_decode_kernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ values,
                      const index_t* __restrict__ block_row_offsets, const index_t* __restrict__ block_col_indices,
                      const uint16_t* __restrict__ bias, uint16_t* __restrict__ y, int64_t rows, int64_t nnz,
                      int64_t n_block_cols, int64_t x_row_stride, int64_t y_row_stride) {
  using T = Tiling<B>;
  __shared__ float partial[T::kLanesK > 1 ? T::kLanesK : 1][T::kRowsPerCta][MB];

  const int block_row = blockIdx.y;
  const int vec = threadIdx.x % T::kVectorsPerRow;
  const int local_row = (threadIdx.x / T::kVectorsPerRow) % T::kRowsPerCta;
  const int lane_k = threadIdx.x / (T::kVectorsPerRow * T::kRowsPerCta);
  const int row_in_block = blockIdx.x * T::kRowsPerCta + local_row;

  float acc[MB];
#pragma unroll
  for (int r = 0; r < MB; ++r) acc[r] = 0.f;

  // Index values are clamped (offsets into [0, nnz], columns into [0, n_block_cols)): a corrupted
  // index gives wrong numbers, never a read outside values, block_col_indices or x. Columns are
  // clamped in index_t (32-bit operations for an int32 index): every non-negative index_t is below
  // a larger n_block_cols.
  const int64_t begin = detail::clamp_index<int64_t>(block_row_offsets[block_row], 0, nnz);
  const int64_t end = detail::clamp_index<int64_t>(block_row_offsets[block_row + 1], begin, nnz);
  constexpr int64_t kIndexMax = std::numeric_limits<index_t>::max();
  const index_t last_col = static_cast<index_t>(n_block_cols - 1 < kIndexMax ? n_block_cols - 1 : kIndexMax);
  for (int64_t k = begin + lane_k; k < end; k += T::kLanesK) {
    const index_t block_col = detail::clamp_index<index_t>(block_col_indices[k], 0, last_col);
    const int64_t col0 = static_cast<int64_t>(block_col) * B + vec * 8;
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(values + (k * B + row_in_block) * B + vec * 8));
    float wf[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) wf[t] = Storage<kDType>::to_float(detail::lane16(w, t));
#pragma unroll
    for (int r = 0; r < MB; ++r) {
      if (r >= rows) break;
      const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + r * x_row_stride + col0));
#pragma unroll
      for (int t = 0; t < 8; ++t) acc[r] += wf[t] * Storage<kDType>::to_float(detail::lane16(xv, t));
    }
  }

  // Reduce over the vectors of a weight row (consecutive lanes of one warp).
#pragma unroll
  for (int r = 0; r < MB; ++r) acc[r] = detail::group_sum(acc[r], T::kVectorsPerRow);

  const int64_t out_row = static_cast<int64_t>(block_row) * B + row_in_block;
  if constexpr (T::kLanesK > 1) {
    if (vec == 0) {
#pragma unroll
      for (int r = 0; r < MB; ++r) partial[lane_k][local_row][r] = acc[r];
    }
    __syncthreads();
    if (vec != 0 || lane_k != 0) return;
#pragma unroll
    for (int r = 0; r < MB; ++r) {
      float sum = 0.f;
      for (int l = 0; l < T::kLanesK; ++l) sum += partial[l][local_row][r];
      acc[r] = sum;
    }
  } else {
    if (vec != 0) return;
  }
  const float bias_value = bias != nullptr ? Storage<kDType>::to_float(bias[out_row]) : 0.f;
#pragma unroll
  for (int r = 0; r < MB; ++r) {
    if (r < rows) y[r * y_row_stride + out_row] = Storage<kDType>::from_float(acc[r] + bias_value);
  }
}

template <DType kDType, typename index_t, int B, int MB>
cudaError_t launch(const void* x, const void* values, const void* offsets, const void* cols, const void* bias, void* y,
                   const BsrDecodeProblem& p, cudaStream_t stream) {
  const dim3 grid(Tiling<B>::kChunks, static_cast<unsigned>(p.out_features / B));
  bsr_decode_kernel<kDType, index_t, B, MB><<<grid, kThreads, 0, stream>>>(
      static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(values), static_cast<const index_t*>(offsets),
      static_cast<const index_t*>(cols), static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), p.rows,
      p.nnz, p.in_features / B, p.x_row_stride, p.y_row_stride);
  return cudaGetLastError();
}

template <DType kDType, typename index_t, int B>
cudaError_t dispatch_rows(const void* x, const void* values, const void* offsets, const void* cols, const void* bias,
                          void* y, const BsrDecodeProblem& p, cudaStream_t stream) {
  if (p.rows <= 1) return launch<kDType, index_t, B, 1>(x, values, offsets, cols, bias, y, p, stream);
  if (p.rows <= 2) return launch<kDType, index_t, B, 2>(x, values, offsets, cols, bias, y, p, stream);
  if (p.rows <= 4) return launch<kDType, index_t, B, 4>(x, values, offsets, cols, bias, y, p, stream);
  if (p.rows <= 8) return launch<kDType, index_t, B, 8>(x, values, offsets, cols, bias, y, p, stream);
  return launch<kDType, index_t, B, 16>(x, values, offsets, cols, bias, y, p, stream);
}

template <DType kDType, typename index_t>
cudaError_t dispatch_block(const void* x, const void* values, const void* offsets, const void* cols,
                           const void* bias, void* y, const BsrDecodeProblem& p, cudaStream_t stream) {
  switch (p.block_size) {
    case 16: return dispatch_rows<kDType, index_t, 16>(x, values, offsets, cols, bias, y, p, stream);
    case 32: return dispatch_rows<kDType, index_t, 32>(x, values, offsets, cols, bias, y, p, stream);
    case 64: return dispatch_rows<kDType, index_t, 64>(x, values, offsets, cols, bias, y, p, stream);
    default: return dispatch_rows<kDType, index_t, 128>(x, values, offsets, cols, bias, y, p, stream);
  }
}

template <DType kDType>
cudaError_t dispatch_index(bool index_is_int64, const void* x, const void* values, const void* offsets,
                           const void* cols, const void* bias, void* y, const BsrDecodeProblem& p,
                           cudaStream_t stream) {
  return index_is_int64 ? dispatch_block<kDType, int64_t>(x, values, offsets, cols, bias, y, p, stream)
                        : dispatch_block<kDType, int32_t>(x, values, offsets, cols, bias, y, p, stream);
}

}  // namespace

bool bsr_decode_supported(const BsrDecodeProblem& p, const void* x, const void* values) {
  const int64_t b = p.block_size;
  if (p.rows < 1 || p.rows > 16 || !(b == 16 || b == 32 || b == 64 || b == 128) || p.nnz < 0) return false;
  if (p.out_features < b || p.out_features % b != 0 || p.in_features < b || p.in_features % b != 0) return false;
  if (p.out_features / b > 65535) return false;  // grid.y limit
  return aligned16(x) && aligned16(values) && p.x_row_stride % 8 == 0 && p.x_row_stride >= p.in_features &&
         p.y_row_stride >= p.out_features;
}

cudaError_t bsr_decode_linear(DType dtype, bool index_is_int64, const void* x, const void* values,
                              const void* block_row_offsets, const void* block_col_indices, const void* bias,
                              void* y, const BsrDecodeProblem& problem, cudaStream_t stream) {
  if (!bsr_decode_supported(problem, x, values)) return cudaErrorInvalidValue;
  return dtype == DType::bfloat16
             ? dispatch_index<DType::bfloat16>(index_is_int64, x, values, block_row_offsets, block_col_indices,
                                               bias, y, problem, stream)
             : dispatch_index<DType::float16>(index_is_int64, x, values, block_row_offsets, block_col_indices,
                                              bias, y, problem, stream);
}

}  // namespace sparsekernels::cuda
