// N:M decode linear for M <= 16 (see nm_decode.cuh for the contract).
//
// Work split: a block of kWarps warps owns kRowsPerBlock consecutive output rows and one split of
// the kept values (grid.y). It first stages the split's columns of x (all M rows) in shared memory,
// then each warp walks its output rows one at a time: lane l reads 16-byte vectors l, l+32, ... of
// the row's kept values in the split, decodes the matching position bits, and accumulates the
// M dot products in registers (float32). A butterfly reduction then gives each output.
#include "device_common.cuh"
#include "nm_decode.cuh"

namespace sparsekernels::cuda {
namespace {

using detail::Storage;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kVector = 8;                       // kept values per 16-byte load
constexpr int64_t kSharedBytes = 48 * 1024;      // x tile budget (no opt-in needed)

// The x tile is stored with 2 padding elements (4 bytes) after every 16 columns. Lane l reads
// columns near 16 * l (8 kept values of 2:4 per lane), which without padding would put every
// fourth lane on the same shared-memory bank; with it, lane l lands on bank 9 * l mod 32.
__host__ __device__ constexpr int64_t padded_col(int64_t col) { return col + 2 * (col >> 4); }
__host__ __device__ constexpr int64_t padded_cols(int64_t cols) { return cols + 2 * (cols >> 4); }  // cols % 16 == 0
constexpr int kMaxSplits = 64;

int bits_per_position(int64_t m) { return m == 2 ? 1 : (m == 4 ? 2 : 4); }

// How the kept values of a row are split over grid.y.
struct Plan {
  int64_t kept;        // kept values per row
  int64_t split_kept;  // kept values per split (a multiple of kVector * n: whole groups, whole vectors)
  int splits;
  int row_blocks;
  int m_bucket;        // compile-time M the kernel is instantiated for (>= rows)
};

int m_bucket(int64_t rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : rows <= 8 ? 8 : 16; }

Plan make_plan(const NMDecodeProblem& p, int sm_count) {
  Plan plan{};
  plan.kept = p.in_features / p.m * p.n;
  plan.m_bucket = m_bucket(p.rows);
  plan.row_blocks = static_cast<int>(detail::ceil_div(p.out_features, kRowsPerBlock));
  const int64_t quantum = kVector * p.n;  // split granularity in kept values
  // Largest split whose x tile (m_bucket rows of 16-bit values) fits the shared-memory budget.
  const int64_t max_tile_cols = kSharedBytes / (2 * plan.m_bucket) * 8 / 9;  // room for the padding
  const int64_t max_split_kept = (max_tile_cols / p.m * p.n) / quantum * quantum;
  // Enough blocks to cover every SM twice, but never more splits than vectors.
  const int64_t wanted_splits = sm_count > 0 ? (2 * sm_count + plan.row_blocks - 1) / plan.row_blocks : 1;
  int64_t splits = wanted_splits < 1 ? 1 : (wanted_splits > kMaxSplits ? kMaxSplits : wanted_splits);
  int64_t split_kept = (plan.kept + splits - 1) / splits;
  split_kept = (split_kept + quantum - 1) / quantum * quantum;
  if (split_kept > max_split_kept) split_kept = max_split_kept;
  if (split_kept < quantum) split_kept = quantum;
  plan.split_kept = split_kept;
  plan.splits = static_cast<int>((plan.kept + split_kept - 1) / split_kept);
  return plan;
}

struct Params {
  const uint16_t* x;
  const uint16_t* values;
  const uint8_t* positions;
  const uint16_t* bias;
  uint16_t* y;
  float* partial;  // [splits, rows, out] when splits > 1, else null
  int64_t rows, out_features, in_features, n, m, x_row_stride, y_row_stride;
  int64_t kept, split_kept, position_bytes_per_row;
  int bits;
};

template <DType kDType, int MB>
__global__ void __launch_bounds__(kThreads) nm_decode_kernel(Params p) {
  extern __shared__ uint16_t x_tile[];  // [MB][padded_cols(tile_cols)]
  const int split = blockIdx.y;
  const int64_t kept_begin = split * p.split_kept;
  const int64_t kept_end = min(p.kept, kept_begin + p.split_kept);
  const int64_t col_begin = kept_begin / p.n * p.m;
  const int tile_cols = static_cast<int>(p.split_kept / p.n * p.m);  // a multiple of 16 (8 * m)
  const int tile_stride = static_cast<int>(padded_cols(tile_cols));
  const int64_t split_cols = (kept_end - kept_begin) / p.n * p.m;

  for (int64_t i = threadIdx.x; i < MB * tile_cols; i += kThreads) {
    const int64_t r = i / tile_cols, c = i % tile_cols;
    x_tile[r * tile_stride + padded_col(c)] =
        (r < p.rows && c < split_cols) ? p.x[r * p.x_row_stride + col_begin + c] : uint16_t(0);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t vectors = (kept_end - kept_begin) / kVector;
  // In-group offset of a code: its low log2(m) bits, i.e. the whole 1/2/4-bit field for m = 2/4/16,
  // but only 3 of the 4 bits for m = 8, whose codes 8..15 would otherwise address past the group
  // (and, in the last group of the last row, past the x tile). A corrupted code thus reads a wrong
  // column of its own group, never out of bounds, and costs nothing: the mask was there anyway.
  const unsigned position_mask = static_cast<unsigned>(p.m) - 1u;
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + i * kWarps + warp;
    if (row >= p.out_features) break;  // rows grow with i: the warp has no more work
    const uint16_t* row_values = p.values + row * p.kept;
    const uint8_t* row_positions = p.positions + row * p.position_bytes_per_row;
    float acc[MB];
#pragma unroll
    for (int r = 0; r < MB; ++r) acc[r] = 0.f;

    for (int64_t v = lane; v < vectors; v += 32) {
      const int64_t j0 = kept_begin + v * kVector;
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(row_values + j0));
      // The 8 positions of this vector take `bits` bytes starting at byte j0 * bits / 8.
      const uint8_t* pos = row_positions + j0 * p.bits / 8;
      uint32_t packed = 0;
      for (int b = 0; b < p.bits; ++b) packed |= static_cast<uint32_t>(__ldg(pos + b)) << (8 * b);
      // Group of kept value j0 and its rank inside the group, advanced incrementally (no division
      // per element). Columns are relative to the staged tile.
      int group_col = static_cast<int>(j0 / p.n * p.m - col_begin);
      int rank = static_cast<int>(j0 % p.n);
#pragma unroll
      for (int t = 0; t < kVector; ++t) {
        const int col = group_col + static_cast<int>((packed >> (t * p.bits)) & position_mask);
        const int slot = col + 2 * (col >> 4);  // padded_col, in 32-bit arithmetic
        const float weight = Storage<kDType>::to_float(detail::lane16(w, t));
#pragma unroll
        for (int r = 0; r < MB; ++r) acc[r] += weight * Storage<kDType>::to_float(x_tile[r * tile_stride + slot]);
        if (++rank == p.n) {
          rank = 0;
          group_col += static_cast<int>(p.m);
        }
      }
    }

#pragma unroll
    for (int r = 0; r < MB; ++r) acc[r] = detail::warp_sum(acc[r]);
    // Lane r writes output row r (static indexing keeps acc in registers).
#pragma unroll
    for (int r = 0; r < MB; ++r) {
      if (lane != r || r >= p.rows) continue;
      if (p.partial != nullptr) {
        p.partial[(static_cast<int64_t>(split) * p.rows + r) * p.out_features + row] = acc[r];
      } else {
        const float bias = p.bias != nullptr ? Storage<kDType>::to_float(p.bias[row]) : 0.f;
        p.y[r * p.y_row_stride + row] = Storage<kDType>::from_float(acc[r] + bias);
      }
    }
  }
}

// y[r, o] = sum over splits of partial[s, r, o] (+ bias[o]).
template <DType kDType>
__global__ void nm_decode_reduce_kernel(const float* partial, const uint16_t* bias, uint16_t* y, int splits,
                                        int64_t rows, int64_t out_features, int64_t y_row_stride) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * out_features) return;
  const int64_t r = i / out_features, o = i % out_features;
  float sum = bias != nullptr ? Storage<kDType>::to_float(bias[o]) : 0.f;
  for (int s = 0; s < splits; ++s) sum += partial[s * rows * out_features + i];
  y[r * y_row_stride + o] = Storage<kDType>::from_float(sum);
}

template <DType kDType, int MB>
cudaError_t launch(const Params& params, const Plan& plan, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(MB) * padded_cols(plan.split_kept / params.n * params.m) * sizeof(uint16_t);
  const dim3 grid(plan.row_blocks, plan.splits);
  nm_decode_kernel<kDType, MB><<<grid, kThreads, shared, stream>>>(params);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || params.partial == nullptr) return status;
  const int64_t outputs = params.rows * params.out_features;
  nm_decode_reduce_kernel<kDType><<<detail::ceil_div(outputs, 256), 256, 0, stream>>>(
      params.partial, params.bias, params.y, plan.splits, params.rows, params.out_features, params.y_row_stride);
  return cudaGetLastError();
}

template <DType kDType>
cudaError_t dispatch_rows(const Params& params, const Plan& plan, cudaStream_t stream) {
  switch (plan.m_bucket) {
    case 1: return launch<kDType, 1>(params, plan, stream);
    case 2: return launch<kDType, 2>(params, plan, stream);
    case 4: return launch<kDType, 4>(params, plan, stream);
    case 8: return launch<kDType, 8>(params, plan, stream);
    default: return launch<kDType, 16>(params, plan, stream);
  }
}

}  // namespace

bool nm_decode_supported(const NMDecodeProblem& p, const void* values) {
  if (p.rows < 1 || p.rows > 16 || p.out_features < 1 || p.in_features < 1) return false;
  if (!(p.m == 2 || p.m == 4 || p.m == 8 || p.m == 16) || p.n < 1 || p.n >= p.m) return false;
  if (p.in_features % p.m != 0) return false;
  const int64_t kept = p.in_features / p.m * p.n;
  return kept % kVector == 0 && aligned16(values) && p.x_row_stride >= p.in_features &&
         p.y_row_stride >= p.out_features;
}

size_t nm_decode_workspace_bytes(const NMDecodeProblem& problem, int sm_count) {
  if (!nm_decode_supported(problem, nullptr)) return 0;
  const Plan plan = make_plan(problem, sm_count);
  return plan.splits > 1 ? sizeof(float) * plan.splits * problem.rows * problem.out_features : 0;
}

cudaError_t nm_decode_linear(DType dtype, const void* x, const void* values, const uint8_t* positions,
                             const void* bias, void* y, void* workspace, const NMDecodeProblem& problem,
                             int sm_count, cudaStream_t stream) {
  if (!nm_decode_supported(problem, values)) return cudaErrorInvalidValue;
  const Plan plan = make_plan(problem, sm_count);
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  Params params{};
  params.x = static_cast<const uint16_t*>(x);
  params.values = static_cast<const uint16_t*>(values);
  params.positions = positions;
  params.bias = static_cast<const uint16_t*>(bias);
  params.y = static_cast<uint16_t*>(y);
  params.partial = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  params.rows = problem.rows;
  params.out_features = problem.out_features;
  params.in_features = problem.in_features;
  params.n = problem.n;
  params.m = problem.m;
  params.x_row_stride = problem.x_row_stride;
  params.y_row_stride = problem.y_row_stride;
  params.kept = plan.kept;
  params.split_kept = plan.split_kept;
  params.bits = bits_per_position(problem.m);
  params.position_bytes_per_row = plan.kept * params.bits / 8;
  return dtype == DType::bfloat16 ? dispatch_rows<DType::bfloat16>(params, plan, stream)
                                  : dispatch_rows<DType::float16>(params, plan, stream);
}

}  // namespace sparsekernels::cuda
