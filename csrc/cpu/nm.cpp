// N:M-structured linear kernels for CPU (see nm.h for the storage format).
//
// Design. The forward and the weight gradient multiply only the kept weights; the input gradient
// expands the weight panel by panel into small dense tiles. No dense weight or dense weight
// gradient of the full layer is ever formed.
//
// * Forward, small batches (M < kSmallBatch): a GEMV per output row. Sixteen kept values are
//   handled at a time: their packed positions are decoded in registers and the matching
//   activations fetched from the x rows (vector permutes of a loaded window when n divides 16 and
//   the window is at most 64 columns, gathers otherwise). x is a few KiB per row and stays in
//   cache, so at M = 1 the kernel streams values + positions at memory bandwidth.
//
// * Forward and grad_values for larger batches work on activations transposed into "batch
//   lanes": a copy of x (and of grad_out) stored as [column][batch row], the batch cut into blocks
//   of at most 128 rows padded with zeros to whole 16-lane vectors. A kept weight w at (o, k) then
//   pairs with one contiguous row of that copy:
//     forward      acc[o][m] += w * xT[k][m]               broadcast w, FMA into registers
//     grad_values  g[o][j]    = sum_m dyT[o][m] * xT[k][m]  dot products along the batch
//   so only kept values are multiplied (n/m of the FMAs of a dense GEMM). Output rows go in
//   blocks whose kept values and decoded columns are first unpacked, reading the weight rows
//   sequentially, into panel-major scratch; the inner loops then stream contiguous arrays while
//   one panel of transposed activations (about 32 KiB) stays in L1. For large batches the batch
//   blocks go in passes of a few MiB of activations, so that they stay in the last-level cache
//   while a task sweeps its rows.
//
// * grad_values for small batches (AVX-512 levels: M <= 40, bfloat16 on batch pairs up to 48 at
//   the avx512_bf16 level; avx2: M <= 20, or 3 where the activations are gathered): the transpose
//   of the small-batch forward. Each chunk of 16 kept values
//   fetches its 16 activations per batch row from a panel of x kept in L1 (window permutes or
//   gathers, as in the forward), FMAs them with the row's dy and stores 16 gradients, so the work
//   grows with M instead of being padded to 16 (or 32) batch lanes.
//
// * grad_input (dX = dY W) is decompress-and-multiply: each task owns a panel of input columns,
//   expands the kept weights of a block of output rows into a dense [rows x 128] fp32 tile and
//   runs a register-blocked GEMM micro-kernel (12 batch rows x 32 columns) over it. At the AVX-512
//   levels the patterns 1:2, 1:4, 2:4, 1:8, 2:8 and 4:8 expand through kept-column masks (a few
//   byte shuffles per 64 columns, then VEXPANDPS / VPEXPANDW) instead of scattering each value;
//   for M <= 2 there is no tile at all, the expanded rows feed register accumulators of dx.
//   A dropped weight is a zero in that tile, so a NaN or Inf in grad_out would reach every input
//   column through 0 * NaN. grad_out is therefore scanned first (a cheap O(M * out) pass); when it
//   is not all finite (e.g. an fp16 loss-scale overflow), the tiles run on a copy with the
//   non-finite entries zeroed and those entries' products with the kept weights are added
//   afterwards (add_non_finite_terms). A dropped weight is then absent, exactly as in the forward
//   and weight-gradient kernels, and the cost stays that of the fast path plus O(#non-finite * kept).
//
// Parallelism: forward and grad_values split the output rows, grad_input the input columns, so
// every task writes a disjoint region, and each output element is reduced over all of M by one
// task in a fixed order (results are deterministic and independent of the thread count). Scratch
// is allocated inside the task body; the activation copies are built by a separate parallel pass
// first and only read afterwards.
//
// ISA: the inner loops exist as portable C++, as AVX2 + FMA code (8-float ymm, for CPUs without
// AVX-512) and as AVX-512 code, the vector sets compiled through target attributes (the library
// itself is built without -march). The highest set the CPU supports runs, unless
// SPARSEKERNELS_CPU_ISA caps it lower (isa.h). At the avx512_bf16 level (AVX512-BF16 without AMX)
// bfloat16 also has VDPBF16PS kernels, which multiply pairs of bfloat16 at once: the 2:4 forward
// (pair rows of the activations), grad_values for every n:m (pairs of batch rows) and grad_input
// for even out_features (pair tiles of the weight); see the avx512_bf16 namespace.
#include "nm.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
// GCC 12 reports the self-initialised placeholders of _mm512_undefined_*() inside the intrinsic
// headers as maybe-uninitialized (GCC bug 105593); the state at the header's lines decides.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#include "avx2.h"
#include "avx512.h"

namespace sparsekernels::cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// Tuning constants and blocking geometry.

constexpr int64_t kLanes = 16;                                // floats per AVX-512 vector
constexpr int kMaxBlockVectors = 8;                           // batch block: up to 8 vectors ...
constexpr int64_t kMaxBlockRows = kLanes * kMaxBlockVectors;  // ... = 128 batch rows
constexpr int64_t kTileFloats = 8192;                         // 32 KiB of L1 per activation panel
constexpr int64_t kUnpackFloats = int64_t{1} << 16;           // 256 KiB of unpacked values per row block
constexpr int64_t kSmallBatch = 8;                            // forward: GEMV path below this M
// grad_values: the small-batch kernels (no batch-lane copies) up to these M, at the AVX-512
// levels, float32 lanes and (bfloat16, avx512_bf16) batch pairs. Measured at 4096 x 4096 2:4 on one
// Zen 5 core, against the batch-lane kernels: float32 0.95 / 4.4 / 9.5 ms at M = 1 / 16 / 40
// (6.6 / 6.8 / 10.4), pairs 2.3 / 6.6 ms at M = 16 / 48 (6.6 / 7.7), even at M = 64.
constexpr int64_t kSmallGradBatch = 40;
constexpr int64_t kSmallGradPairBatch = 48;
// At the avx2 level: up to 20 rows when 8 kept values span a 16-column window (1:2, 2:4, 4:8:
// 2:4 at M = 1 / 16, 1.8 / 8.0 ms against 10.6 / 10.1 for the batch lanes), up to 3 rows for the
// patterns whose activations are gathered (AVX2 gathers: 1:4 at M = 3 / 4, 4.9 / 6.4 against 5.4).
constexpr int64_t kSmallGradBatchAvx2Window = 20;
constexpr int64_t kSmallGradBatchAvx2Gather = 3;
// grad_input: the tile-free kernel up to this M (AVX-512 levels, patterns with kept-column masks).
// Measured at 4096 x 4096 on a 2-core Zen 5 (2 threads), against the tile: float32 2:4 at M = 1 / 2
// 1.18 / 1.64 ms (2.78 / 2.89), even at 8; the avx512_bf16 2:4 pair tiles stay ahead from M = 2.
constexpr int64_t kSmallGradInputBatch = 2;
constexpr int64_t kSmallGradInputColumns = 512;  // input columns per task chunk (a multiple of 256)
constexpr int64_t kSmallGradInputBlockRows = 32;  // weight rows per prefetch step
constexpr int64_t kSmallGradBlockRows = 32;                   // weight rows per panel sweep
// The 2:4 bfloat16 pair-row forward (avx512_bf16) costs the same up to 16 rows; the GEMV grows by
// about 0.38 ms per row at 4096 x 4096 on one Zen 5 core, and the two cross between 6 and 7 rows.
constexpr int64_t kPairForwardMinRows = 7;
constexpr int64_t kActivationPassBytes = int64_t{4} << 20;    // forward: activations per sweep (L3)
// Row-parallel loops hand each thread at least this many multiply-adds, so that small layers
// (say 64x64 at M = 8) run serially instead of paying for a parallel region per call.
constexpr int64_t kMinMultiplyAddsPerTask = int64_t{1} << 20;  // ~60 us of work, > a parallel region's cost
constexpr int64_t kDecodeRows = 32;                           // rows decoded per call (grad_input)
// grad_input: a register-blocked micro-kernel of 12 batch rows x 32 columns (24 zmm accumulators)
// over a dense tile of the weight, [depth rows x span columns] stored as 32-column strips.
constexpr int64_t kStripRows = 12;
constexpr int64_t kStripColumns = 32;
constexpr int64_t kDensePanel = 128;               // parallel work unit: input columns
constexpr int64_t kDenseBatch = 64 * kStripRows;   // batch rows per accumulator pass
constexpr int64_t kDenseAccFloats = int64_t{1} << 17;   // fp32 accumulators per pass, 512 KiB
constexpr int64_t kDenseTileFloats = int64_t{1} << 16;  // dense weight tile, 256 KiB (L2)
// Rows of the dense tile and of the accumulators are padded by one cache line, so that a column
// strip walked down the rows does not keep hitting one L1 set when the row length is a multiple
// of 4 KiB.
constexpr int64_t kRowPadding = 16;

// Batch rows are split into blocks of kMaxBlockRows; block b covers rows [128 b, 128 b + rows(b))
// and occupies width(b) lanes (rows rounded up to whole vectors, padding lanes zero). In a
// transposed copy of a [M x C] matrix, block b starts at b * 128 * C floats (earlier blocks are all
// full width) and holds original column c at offset c * width(b). With rows_per_lane = 2 (the
// batch-pair copies of the avx512_bf16 grad_values) a 32-bit lane holds two batch rows, so a
// vector covers 32 rows and a block 128 / 2 words per column.
struct BatchBlocks {
  int64_t batch;
  int64_t rows_per_lane = 1;
  int64_t count() const { return (batch + kMaxBlockRows - 1) / kMaxBlockRows; }
  int64_t first_row(int64_t block) const { return block * kMaxBlockRows; }
  int64_t rows(int64_t block) const { return std::min(kMaxBlockRows, batch - first_row(block)); }
  int vectors(int64_t block) const {
    const int64_t rows_per_vector = rows_per_lane * kLanes;
    return static_cast<int>((rows(block) + rows_per_vector - 1) / rows_per_vector);
  }
  int64_t width(int64_t block) const { return vectors(block) * kLanes; }
  int64_t offset(int64_t block, int64_t columns) const { return block * (kMaxBlockRows / rows_per_lane) * columns; }
  int64_t packed_size(int64_t columns) const {
    return count() == 0 ? 0 : offset(count() - 1, columns) + width(count() - 1) * columns;
  }
};

// Input columns per panel for a batch block of `vectors` vectors: the [panel x width] fp32 slice
// of the transposed activations fills kTileFloats. A multiple of 32 keeps panels group aligned
// for every m and makes the first kept value of a panel, j = column / m * n, start on a byte of
// the packed positions: j * bits is then a multiple of 8 for every m and n (m = 16 with odd n
// needs the 32).
int64_t panel_columns(int vectors) {
  const int64_t columns = kTileFloats / (kLanes * vectors);
  return std::max<int64_t>(32, columns - columns % 32);
}

// Kept-value range [first, first + count) of the input columns [column_begin, column_end).
struct KeptRange {
  int64_t first;
  int64_t count;
};
KeptRange kept_range(const NMShape& shape, int64_t column_begin, int64_t column_end) {
  const int64_t first = column_begin / shape.m * shape.n;
  return {first, column_end / shape.m * shape.n - first};
}

// Column of the first member of the group that kept value j belongs to, (j / n) * m. It is the
// same for every row, so it is tabulated once per call and turns position decoding into one add.
std::vector<int32_t> make_group_base(const NMShape& shape) {
  std::vector<int32_t> base(static_cast<size_t>(shape.kept_per_row()));
  for (int64_t j = 0; j < shape.kept_per_row(); ++j) base[j] = static_cast<int32_t>(j / shape.n * shape.m);
  return base;
}

// Columns spanned by a chunk of `lanes` consecutive kept values (lanes / n whole groups) when n
// divides lanes, else 0: the small-batch kernels fetch such a chunk's activations from one window
// of that many columns (16 lanes at the AVX-512 levels, 8 at avx2).
inline int64_t chunk_window_columns(const NMShape& shape, int64_t lanes) {
  return lanes % shape.n == 0 ? lanes / shape.n * shape.m : 0;
}

// grad_out [M x out] as float32 [out x M], for the small-batch kernels: the M values of dy that
// one weight row multiplies sit together.
template <typename scalar_t>
std::vector<float> transposed_to_float(const scalar_t* grad_out, int64_t M, int64_t out_features) {
  std::vector<float> transposed(static_cast<size_t>(out_features * M));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t o = 0; o < out_features; ++o) transposed[o * M + r] = to_float(grad_out[r * out_features + o]);
  }
  return transposed;
}

// 64-byte aligned scratch, so full-vector loads never straddle cache lines.
template <typename T>
class AlignedArray {
 public:
  explicit AlignedArray(int64_t size)
      : data_(static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(std::max<int64_t>(size, 1)),
                                             std::align_val_t{64}))) {}
  ~AlignedArray() { ::operator delete(data_, std::align_val_t{64}); }
  AlignedArray(const AlignedArray&) = delete;
  AlignedArray& operator=(const AlignedArray&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }

 private:
  T* data_;
};

// ------------------------------------------------------------------------------------------------
// The kernel table: everything whose best form depends on the ISA.

// columns[r][i] = absolute input column of kept value first_kept + i of row r.
using DecodeRowsFn = void (*)(const uint8_t* positions, int64_t position_stride, int bits, int64_t rows,
                              int64_t first_kept, int64_t count, const int32_t* group_base, int32_t* columns,
                              int64_t columns_stride);
// acc[r][lane] += sum_i values[r][i] * activations[columns[r][i] * width + lane]; values, columns
// are [rows x count], acc [rows x width], width = 16 * vectors.
using ForwardPanelFn = void (*)(const float* values, const int32_t* columns, int64_t count, int64_t rows,
                                const float* activations, float* acc);
// out[r][i] (+)= sum_lane grad[r][lane] * activations[columns[r][i] * width + lane]; grad is
// [rows x width], columns and out [rows x count].
using GradValuesPanelFn = void (*)(const float* grad, const int32_t* columns, int64_t count, int64_t rows,
                                   const float* activations, float* out, bool accumulate);
// c[i][col] (+)= sum_d a[d][i] * b[d * b_stride + col] for i < rows (<= kStripRows) and
// col < 32 * strips: a is one strip of the packed batch ([depth][kStripRows]), b the dense tile.
using DenseStripFn = void (*)(const float* a, int64_t rows, int64_t depth, const float* b, int64_t b_stride,
                              int64_t strips, float* c, int64_t c_stride, bool accumulate);

template <typename scalar_t>
struct KernelSet {
  void (*to_float)(const scalar_t* source, float* destination, int64_t count);
  void (*from_float)(const float* source, scalar_t* destination, int64_t count);
  // Forward for M < kSmallBatch over output rows [row_begin, row_end); x is fp32 [M x in_features].
  void (*forward_small_batch)(const float* x, int64_t M, const scalar_t* values, const uint8_t* positions,
                              const NMShape& shape, const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                              int64_t row_begin, int64_t row_end);
  DecodeRowsFn decode_rows;
  // Output rows [first_row, first_row + rows) regrouped panel-major (see UnpackedRows): panel p
  // holds [rows x count(p)] absolute columns (and fp32 values when values_out is not null) at
  // offset p * rows * panel_kept.
  void (*unpack_rows)(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                      const int32_t* group_base, int64_t first_row, int64_t rows, int64_t panel_kept,
                      float* values_out, int32_t* columns_out);
  // Dense rows of the weight: tile[r * tile_stride + c - origin] for c in [origin, origin + width)
  // gets W[first_row + r][c], i.e. zeros and the kept values [first_kept, first_kept + count).
  void (*expand_rows)(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                      const int32_t* group_base, int64_t first_row, int64_t rows, int64_t first_kept,
                      int64_t count, int64_t origin, int64_t width, float* tile, int64_t tile_stride);
  ForwardPanelFn forward_panel[kMaxBlockVectors + 1];  // indexed by block vectors (1..8)
  GradValuesPanelFn grad_values_panel[kMaxBlockVectors + 1];
  DenseStripFn dense_strip;
};

// Fills the per-vector-count entries of a table from a template over the vector count.
#define SPARSEKERNELS_BY_VECTORS(fn) \
  { nullptr, &fn<1>, &fn<2>, &fn<3>, &fn<4>, &fn<5>, &fn<6>, &fn<7>, &fn<8> }

// Defines `kernels<scalar_t>`, the table of the implementation namespace it is expanded in
// (generic, avx512): every entry names that namespace's own function, in KernelSet's order, so
// the two tables cannot drift apart.
#define SPARSEKERNELS_DEFINE_KERNEL_SET               \
  template <typename scalar_t>                        \
  const KernelSet<scalar_t> kernels = {               \
      &to_float_array<scalar_t>,                      \
      &from_float_array<scalar_t>,                    \
      &forward_small_batch<scalar_t>,                 \
      &decode_rows,                                   \
      &unpack_rows<scalar_t>,                         \
      &expand_rows<scalar_t>,                         \
      SPARSEKERNELS_BY_VECTORS(forward_panel),        \
      SPARSEKERNELS_BY_VECTORS(grad_values_panel),    \
      &dense_strip,                                   \
  };

// ------------------------------------------------------------------------------------------------
// Portable implementation. Loops over a compile-time number of lanes so that the compiler can
// vectorise them with whatever the baseline ISA offers.

namespace generic {

inline int32_t position_at(const uint8_t* row_positions, int bits, int64_t j) {
  const int per_byte = 8 / bits;
  return (row_positions[j / per_byte] >> ((j % per_byte) * bits)) & ((1 << bits) - 1);
}

template <typename scalar_t>
void to_float_array(const scalar_t* source, float* destination, int64_t count) {
  for (int64_t i = 0; i < count; ++i) destination[i] = to_float(source[i]);
}

template <typename scalar_t>
void from_float_array(const float* source, scalar_t* destination, int64_t count) {
  for (int64_t i = 0; i < count; ++i) destination[i] = from_float<scalar_t>(source[i]);
}

template <typename scalar_t>
void forward_small_batch(const float* x, int64_t M, const scalar_t* values, const uint8_t* positions,
                         const NMShape& shape, const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                         int64_t row_begin, int64_t row_end) {
  const int64_t kept = shape.kept_per_row();
  const int bits = bits_per_position(shape.m);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const scalar_t* row_values = values + o * kept;
    const uint8_t* row_positions = positions + o * shape.position_bytes();
    float acc[kSmallBatch] = {};
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t column = group_base[j] + position_at(row_positions, bits, j);
      const float weight = to_float(row_values[j]);
      for (int64_t r = 0; r < M; ++r) acc[r] += weight * x[r * shape.in_features + column];
    }
    const float bias_value = bias ? to_float(bias[o]) : 0.0f;
    for (int64_t r = 0; r < M; ++r) y[r * shape.out_features + o] = from_float<scalar_t>(acc[r] + bias_value);
  }
}

void decode_rows(const uint8_t* positions, int64_t position_stride, int bits, int64_t rows, int64_t first_kept,
                 int64_t count, const int32_t* group_base, int32_t* columns, int64_t columns_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row_positions = positions + r * position_stride;
    int32_t* row_columns = columns + r * columns_stride;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = first_kept + i;
      row_columns[i] = group_base[j] + position_at(row_positions, bits, j);
    }
  }
}

template <typename scalar_t>
void unpack_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape, const int32_t* group_base,
                 int64_t first_row, int64_t rows, int64_t panel_kept, float* values_out, int32_t* columns_out) {
  const int64_t kept = shape.kept_per_row();
  const int bits = bits_per_position(shape.m);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values != nullptr ? values + (first_row + r) * kept : nullptr;
    const uint8_t* row_positions = positions + (first_row + r) * shape.position_bytes();
    for (int64_t first = 0; first < kept; first += panel_kept) {
      const int64_t count = std::min(panel_kept, kept - first);
      const int64_t offset = first * rows + r * count;  // = p * rows * panel_kept + r * count
      for (int64_t i = 0; i < count; ++i) {
        columns_out[offset + i] = group_base[first + i] + position_at(row_positions, bits, first + i);
        if (values_out != nullptr) values_out[offset + i] = to_float(row_values[first + i]);
      }
    }
  }
}

template <typename scalar_t>
void expand_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape, const int32_t* group_base,
                 int64_t first_row, int64_t rows, int64_t first_kept, int64_t count, int64_t origin, int64_t width,
                 float* tile, int64_t tile_stride) {
  const int bits = bits_per_position(shape.m);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values + (first_row + r) * shape.kept_per_row();
    const uint8_t* row_positions = positions + (first_row + r) * shape.position_bytes();
    float* tile_row = tile + r * tile_stride - origin;
    std::fill_n(tile_row + origin, width, 0.0f);
    for (int64_t j = first_kept; j < first_kept + count; ++j) {
      tile_row[group_base[j] + position_at(row_positions, bits, j)] = to_float(row_values[j]);
    }
  }
}

template <int kVectors>
void forward_panel(const float* values, const int32_t* columns, int64_t count, int64_t rows,
                   const float* activations, float* acc) {
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    float sums[kWidth] = {};
    for (int64_t i = 0; i < count; ++i) {
      const float weight = values[r * count + i];
      const float* source = activations + static_cast<int64_t>(columns[r * count + i]) * kWidth;
      for (int64_t lane = 0; lane < kWidth; ++lane) sums[lane] += weight * source[lane];
    }
    for (int64_t lane = 0; lane < kWidth; ++lane) acc[r * kWidth + lane] += sums[lane];
  }
}

template <int kVectors>
void grad_values_panel(const float* grad, const int32_t* columns, int64_t count, int64_t rows,
                       const float* activations, float* out, bool accumulate) {
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* grad_row = grad + r * kWidth;
    for (int64_t i = 0; i < count; ++i) {
      const float* source = activations + static_cast<int64_t>(columns[r * count + i]) * kWidth;
      // Lane-wise partial sums first (vectorisable), then one reduction.
      float partial[kLanes] = {};
      for (int64_t v = 0; v < kVectors; ++v) {
        for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += grad_row[v * kLanes + lane] * source[v * kLanes + lane];
      }
      float sum = 0.0f;
      for (int64_t lane = 0; lane < kLanes; ++lane) sum += partial[lane];
      float& destination = out[r * count + i];
      destination = accumulate ? destination + sum : sum;
    }
  }
}

void dense_strip(const float* a, int64_t rows, int64_t depth, const float* b, int64_t b_stride, int64_t strips,
                 float* c, int64_t c_stride, bool accumulate) {
  for (int64_t strip = 0; strip < strips; ++strip) {
    const float* b_strip = b + strip * kStripColumns;
    for (int64_t i = 0; i < rows; ++i) {
      float sums[kStripColumns] = {};
      for (int64_t d = 0; d < depth; ++d) {
        const float scale = a[d * kStripRows + i];
        for (int64_t col = 0; col < kStripColumns; ++col) sums[col] += scale * b_strip[d * b_stride + col];
      }
      float* c_row = c + i * c_stride + strip * kStripColumns;
      for (int64_t col = 0; col < kStripColumns; ++col) c_row[col] = accumulate ? c_row[col] + sums[col] : sums[col];
    }
  }
}

SPARSEKERNELS_DEFINE_KERNEL_SET  // kernels<scalar_t>: this namespace's table

}  // namespace generic

// ------------------------------------------------------------------------------------------------
// AVX-512 implementation (x86-64 only, selected at run time).

#if defined(__x86_64__)

namespace avx512 {

SPARSEKERNELS_AVX512 inline __mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// Loads up to 16 values of any storage type as fp32 (masked-off lanes read as zero).
SPARSEKERNELS_AVX512 inline __m512 load_as_float(const float* source, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, source);
}
SPARSEKERNELS_AVX512 inline __m512 load_as_float(const bfloat16* source, __mmask16 lanes) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, source);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
SPARSEKERNELS_AVX512 inline __m512 load_as_float(const float16* source, __mmask16 lanes) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, source));
}

// The next min(16, available) values as fp32, zeros past them: a plain load when 16 are there (a
// partially masked load costs much more on Zen 5), a masked one at the end of a row.
template <typename scalar_t>
SPARSEKERNELS_AVX512 inline __m512 load_up_to_16(const scalar_t* source, int64_t available) {
  if (available < kLanes) return load_as_float(source, first_lanes(available));
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_loadu_ps(source);
  } else if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source)));
  }
}

// Stores fp32 lanes rounded to the storage type, bit-identical to from_float() in common.h.
SPARSEKERNELS_AVX512 inline void store_from_float(float* destination, __m512 value, __mmask16 lanes) {
  _mm512_mask_storeu_ps(destination, lanes, value);
}
SPARSEKERNELS_AVX512 inline void store_from_float(bfloat16* destination, __m512 value, __mmask16 lanes) {
  // Integer round-to-nearest-even on the float bits (vcvtneps2bf16 would flush subnormals).
  const __m512i word = _mm512_castps_si512(value);
  const __m512i round_bias =
      _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(word, 16), _mm512_set1_epi32(1)));
  __m512i half = _mm512_srli_epi32(_mm512_add_epi32(word, round_bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  half = _mm512_mask_mov_epi32(half, nan, _mm512_or_si512(_mm512_srli_epi32(word, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(destination, lanes, _mm512_cvtepi32_epi16(half));
}
SPARSEKERNELS_AVX512 inline void store_from_float(float16* destination, __m512 value, __mmask16 lanes) {
  // vcvtps2ph rounds to nearest even with gradual underflow, like from_float(); only NaN payloads
  // differ, so NaNs are replaced by the canonical quiet NaN that from_float() produces.
  __m256i half = _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(value), 16), _mm512_set1_epi32(0x8000));
  const __m256i canonical_nan = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7e00)));
  half = _mm256_mask_mov_epi16(half, nan, canonical_nan);
  _mm256_mask_storeu_epi16(destination, lanes, half);
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void to_float_array(const scalar_t* source, float* destination, int64_t count) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const __mmask16 lanes = first_lanes(count - i);
    _mm512_mask_storeu_ps(destination + i, lanes, load_as_float(source + i, lanes));
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void from_float_array(const float* source, scalar_t* destination, int64_t count) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const __mmask16 lanes = first_lanes(count - i);
    store_from_float(destination + i, _mm512_maskz_loadu_ps(lanes, source + i), lanes);
  }
}

// Decodes the positions of 16 consecutive kept values. A chunk starts on a byte and spans
// 16 * kBits bits (2, 4 or 8 bytes), read as one little-endian word: lane i shifts the 32-bit half
// holding its field down by (i * kBits) % 32 and masks it. Below 4 bits the whole chunk is one
// dword and a broadcast suffices; at 4 bits a permute hands each lane its half of the qword. Only
// bytes that exist are read, so the last chunk of the last row never reads past the array.
template <int kBits>
class PositionDecoder {
 public:
  SPARSEKERNELS_AVX512 PositionDecoder() {
    constexpr int kShift = kBits == 1 ? 0 : (kBits == 2 ? 1 : 2);  // log2(kBits)
    const __m512i bit_offset = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), kShift);
    half_select_ = _mm512_srli_epi32(bit_offset, 5);
    shift_ = _mm512_and_si512(bit_offset, _mm512_set1_epi32(31));
    field_mask_ = _mm512_set1_epi32((1 << kBits) - 1);
  }

  // Offsets inside their groups of kept values [chunk_first, chunk_first + count), count <= 16;
  // chunk_bytes points at the byte holding value chunk_first.
  SPARSEKERNELS_AVX512 __m512i decode(const uint8_t* chunk_bytes, int64_t count) const {
    uint64_t word = 0;
    if (count == kLanes) {
      std::memcpy(&word, chunk_bytes, 2 * kBits);
    } else {
      const int64_t bytes = (count * kBits + 7) / 8;
      for (int64_t b = 0; b < bytes; ++b) word |= static_cast<uint64_t>(chunk_bytes[b]) << (8 * b);
    }
    __m512i halves;
    if constexpr (kBits <= 2) {
      halves = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(word)));
    } else {
      halves = _mm512_permutexvar_epi32(half_select_, _mm512_set1_epi64(static_cast<long long>(word)));
    }
    return _mm512_and_si512(_mm512_srlv_epi32(halves, shift_), field_mask_);
  }

 private:
  __m512i half_select_;
  __m512i shift_;
  __m512i field_mask_;
};

template <int kBits>
SPARSEKERNELS_AVX512 void decode_rows_bits(const uint8_t* positions, int64_t position_stride, int64_t rows,
                                           int64_t first_kept, int64_t count, const int32_t* group_base,
                                           int32_t* columns, int64_t columns_stride) {
  const PositionDecoder<kBits> decoder;
  const int32_t* base = group_base + first_kept;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row_bytes = positions + r * position_stride + first_kept * kBits / 8;
    int32_t* row_columns = columns + r * columns_stride;
    for (int64_t i = 0; i < count; i += kLanes) {
      const int64_t chunk = std::min(kLanes, count - i);
      const __mmask16 lanes = first_lanes(chunk);
      const __m512i offsets = decoder.decode(row_bytes + i * kBits / 8, chunk);
      _mm512_mask_storeu_epi32(row_columns + i, lanes, _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, base + i), offsets));
    }
  }
}

SPARSEKERNELS_AVX512 void decode_rows(const uint8_t* positions, int64_t position_stride, int bits, int64_t rows,
                                      int64_t first_kept, int64_t count, const int32_t* group_base,
                                      int32_t* columns, int64_t columns_stride) {
  switch (bits) {
    case 1:
      return decode_rows_bits<1>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
    case 2:
      return decode_rows_bits<2>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
    default:
      return decode_rows_bits<4>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX512 void unpack_rows_bits(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                           const int32_t* group_base, int64_t first_row, int64_t rows,
                                           int64_t panel_kept, float* values_out, int32_t* columns_out) {
  const PositionDecoder<kBits> decoder;
  const int64_t kept = shape.kept_per_row();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values != nullptr ? values + (first_row + r) * kept : nullptr;
    const uint8_t* row_bytes = positions + (first_row + r) * shape.position_bytes();
    for (int64_t first = 0; first < kept; first += panel_kept) {
      const int64_t count = std::min(panel_kept, kept - first);
      const int64_t offset = first * rows + r * count;  // = p * rows * panel_kept + r * count
      for (int64_t i = 0; i < count; i += kLanes) {
        const __mmask16 lanes = first_lanes(count - i);
        const __m512i offsets = decoder.decode(row_bytes + (first + i) * kBits / 8, std::min(kLanes, count - i));
        const __m512i columns = _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, group_base + first + i), offsets);
        _mm512_mask_storeu_epi32(columns_out + offset + i, lanes, columns);
        if (values_out != nullptr) {
          _mm512_mask_storeu_ps(values_out + offset + i, lanes, load_as_float(row_values + first + i, lanes));
        }
      }
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void unpack_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                      const int32_t* group_base, int64_t first_row, int64_t rows, int64_t panel_kept,
                                      float* values_out, int32_t* columns_out) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return unpack_rows_bits<scalar_t, 1>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
    case 2:
      return unpack_rows_bits<scalar_t, 2>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
    default:
      return unpack_rows_bits<scalar_t, 4>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
  }
}

// Kept-column masks. For the patterns below, the positions of a 64-column window (64 / m groups,
// starting on a byte of the packed positions since windows start at multiples of 64) turn into
// a 64-bit mask of its kept columns with a few byte shuffles, so that the expansions place the
// kept values with VEXPANDPS / VPEXPANDW instead of scattering them one by one (scatters issue
// one store per value, and are slow on AMD cores). Other patterns (odd n above 1, m = 16) scatter.
// The patterns with kept-column masks, as X(n, m) for each: the dispatchers below expand it.
#define SPARSEKERNELS_FOR_EACH_MASKED_PATTERN(X) X(1, 2) X(1, 4) X(2, 4) X(1, 8) X(2, 8) X(4, 8)
constexpr bool has_kept_mask(int64_t n, int64_t m) {
#define SPARSEKERNELS_IS_PATTERN(kN, kM) || (n == kN && m == kM)
  return false SPARSEKERNELS_FOR_EACH_MASKED_PATTERN(SPARSEKERNELS_IS_PATTERN);
#undef SPARSEKERNELS_IS_PATTERN
}

// kOneOfTwoMasks.mask[b]: the kept columns of the eight 1:2 groups of positions byte b, bit 2 g +
// the offset of group g.
struct OneOfTwoMasks {
  uint16_t mask[256];
  constexpr OneOfTwoMasks() : mask() {
    for (int b = 0; b < 256; ++b) {
      for (int g = 0; g < 8; ++g) mask[b] = static_cast<uint16_t>(mask[b] | (1u << (2 * g + ((b >> g) & 1))));
    }
  }
};
constexpr OneOfTwoMasks kOneOfTwoMasks{};

// The kept columns of the first `groups` groups (1 .. 64 / m) of a window whose positions start at
// `bytes`, bit c for column c of the window; reads only the bytes of those groups. A 2:4 code
// whose offsets do not increase counts as offsets (0, 1), as in the 2:4 forward of the
// avx512_bf16 level; an m = 8 code of 8 or more marks no column.
template <int kN, int kM>
SPARSEKERNELS_AVX512 inline uint64_t kept_mask64(const uint8_t* bytes, int64_t groups) {
  static_assert(has_kept_mask(kN, kM), "no kept-column mask for this pattern");
  constexpr int kBits = bits_per_position(kM);
  constexpr int64_t kGroups = 64 / kM;
  constexpr int64_t kBytes = kGroups * kN * kBits / 8;  // 4, 8 or 16
  const int64_t needed = (groups * kN * kBits + 7) / 8;
  uint64_t mask;
  if constexpr (kM == 2) {
    uint32_t word = 0;
    std::memcpy(&word, bytes, static_cast<size_t>(needed));
    mask = 0;
    for (int b = 0; b < 4; ++b) mask |= static_cast<uint64_t>(kOneOfTwoMasks.mask[(word >> (8 * b)) & 0xff]) << (16 * b);
  } else {
    const __m128i loaded = needed == kBytes && kBytes == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))
                           : needed == kBytes && kBytes == 8 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))
                           : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << needed) - 1), bytes);
    const __m128i low_nibbles = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(loaded, low_nibbles);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(loaded, 4), low_nibbles);
    const __m128i nibbles = _mm_unpacklo_epi8(low, high);  // the nibbles of bytes 0-7, in stream order
    __m128i packed;
    if constexpr (kM == 4 && kN == 2) {
      // One nibble per group, code a | b << 2: its 4-bit mask; two groups per byte.
      const __m128i mask_of_code = _mm_setr_epi8(3, 3, 3, 3, 3, 3, 3, 3, 5, 6, 3, 3, 9, 10, 12, 3);
      const __m128i group_masks = _mm_shuffle_epi8(mask_of_code, nibbles);
      packed = _mm_packus_epi16(_mm_maddubs_epi16(group_masks, _mm_set1_epi16(0x1001)), _mm_setzero_si128());
    } else if constexpr (kM == 4) {
      // One nibble per two groups (2-bit offsets a, b): one byte of mask, 1 << a | 16 << b.
      alignas(16) uint8_t table[16];
      for (int code = 0; code < 16; ++code) table[code] = static_cast<uint8_t>((1 << (code & 3)) | (16 << (code >> 2)));
      packed = _mm_shuffle_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(table)), nibbles);
    } else {
      // m = 8: one nibble per kept value, one byte of mask per group: the sum of the one-hot
      // bytes of its n values (distinct offsets, so the sum is their union).
      const __m128i one_hot_table = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0);
      const __m128i one_hot = _mm_shuffle_epi8(one_hot_table, nibbles);
      if constexpr (kN == 1) {
        packed = one_hot;
      } else if constexpr (kN == 2) {
        packed = _mm_packus_epi16(_mm_maddubs_epi16(one_hot, _mm_set1_epi8(1)), _mm_setzero_si128());
      } else {
        const __m128i one_hot_high = _mm_shuffle_epi8(one_hot_table, _mm_unpackhi_epi8(low, high));
        const __m128i ones = _mm_set1_epi16(1);
        const __m128i quads_low = _mm_madd_epi16(_mm_maddubs_epi16(one_hot, _mm_set1_epi8(1)), ones);
        const __m128i quads_high = _mm_madd_epi16(_mm_maddubs_epi16(one_hot_high, _mm_set1_epi8(1)), ones);
        packed = _mm_packus_epi16(_mm_packs_epi32(quads_low, quads_high), _mm_setzero_si128());
      }
    }
    mask = static_cast<uint64_t>(_mm_cvtsi128_si64(packed));
  }
  return groups == kGroups ? mask : mask & ((uint64_t{1} << (groups * kM)) - 1);
}

// Whether at least 16 values follow the end of weight row o in the values tensor, so that a
// 16-value load from anywhere in the row stays inside the tensor (every row but the last few, or
// the last one when rows hold at least 16 values).
inline bool values_follow(const NMShape& shape, int64_t o) {
  return (shape.out_features - 1 - o) * shape.kept_per_row() >= kLanes;
}

// The kept values of one weight row for 16 columns, expanded: `source` points at the first one,
// `lanes` marks the kept columns. kWithinTensor: at least 16 values follow `source` in the values
// tensor (values_follow), so a plain load serves; the lanes past the row are not used.
// A run-time choice between a plain and a masked load would be merged into one masked load by the
// compiler, hence the template parameter.
template <bool kWithinTensor, typename scalar_t>
SPARSEKERNELS_AVX512 inline __m512 expand_16(const scalar_t* source, const scalar_t* row_end, __mmask16 lanes) {
  __m512 loaded = load_up_to_16(source, kWithinTensor ? kLanes : row_end - source);
  // Keeps the compiler from folding the load into the expand: the memory form of VEXPANDPS is
  // several times slower than a load and the register form on Zen 5.
  __asm__("" : "+v"(loaded));
  return _mm512_maskz_expand_ps(lanes, loaded);
}

// Expansion into the grad_input tile with kept-column masks: per 16 columns, VEXPANDPS places the
// next popcount(mask) kept values, zeros elsewhere. Columns past in_features get zeros.
template <typename scalar_t, int kN, int kM>
SPARSEKERNELS_AVX512 void expand_rows_masked(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                             int64_t first_row, int64_t rows, int64_t origin, int64_t width,
                                             float* tile, int64_t tile_stride) {
  constexpr int kBits = bits_per_position(kM);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values + (first_row + r) * shape.kept_per_row();
    const scalar_t* row_end = row_values + shape.kept_per_row();
    const bool within = values_follow(shape, first_row + r);
    const uint8_t* row_bytes = positions + (first_row + r) * shape.position_bytes();
    float* tile_row = tile + r * tile_stride;
    for (int64_t c = 0; c < width; c += 64) {
      const int64_t column = origin + c;
      const int64_t groups = std::clamp<int64_t>((shape.in_features - column) / kM, 0, 64 / kM);
      const int64_t first = column / kM * kN;  // kept index of the window's first value
      uint64_t mask = groups > 0 ? kept_mask64<kN, kM>(row_bytes + first * kBits / 8, groups) : 0;
      const scalar_t* source = row_values + std::min(first, shape.kept_per_row());
      for (int64_t i = c; i < std::min(width, c + 64); i += kLanes, mask >>= kLanes) {
        const __mmask16 lanes = static_cast<__mmask16>(mask);
        const __m512 expanded = lanes == 0 ? _mm512_setzero_ps()
                                : within    ? expand_16<true>(source, row_end, lanes)
                                            : expand_16<false>(source, row_end, lanes);
        _mm512_store_ps(tile_row + i, expanded);
        source += __builtin_popcount(lanes);
      }
    }
  }
}

// expand_rows_masked for the patterns that have kept-column masks; false for the others.
template <typename scalar_t>
SPARSEKERNELS_AVX512 bool expand_rows_by_mask(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                              int64_t first_row, int64_t rows, int64_t origin, int64_t width,
                                              float* tile, int64_t tile_stride) {
#define SPARSEKERNELS_EXPAND_BY_MASK(kN, kM)                                                                 \
  if (shape.n == kN && shape.m == kM) {                                                                     \
    expand_rows_masked<scalar_t, kN, kM>(values, positions, shape, first_row, rows, origin, width, tile,    \
                                         tile_stride);                                                      \
    return true;                                                                                            \
  }
  SPARSEKERNELS_FOR_EACH_MASKED_PATTERN(SPARSEKERNELS_EXPAND_BY_MASK)
#undef SPARSEKERNELS_EXPAND_BY_MASK
  return false;
}

// One weight row's contribution to the register accumulators of grad_input_rows_masked.
template <bool kWithinTensor, typename scalar_t, int kN, int kM, int kRows, int kWindows>
SPARSEKERNELS_AVX512 inline void accumulate_row_masked(const scalar_t* row_values, const uint8_t* row_bytes,
                                                       int64_t kept, int64_t column, const int64_t* groups,
                                                       const __m512* grad, __m512 (*sums)[4 * kWindows]) {
  constexpr int kBits = bits_per_position(kM);
#pragma GCC unroll 4
  for (int w = 0; w < kWindows; ++w) {
    const int64_t first = (column + 64 * w) / kM * kN;
    uint64_t mask = groups[w] > 0 ? kept_mask64<kN, kM>(row_bytes + first * kBits / 8, groups[w]) : 0;
    const scalar_t* source = row_values + std::min(first, kept);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __mmask16 lanes = static_cast<__mmask16>(mask >> (kLanes * q));
      const __m512 weights = lanes == 0 ? _mm512_setzero_ps() : expand_16<kWithinTensor>(source, row_values + kept, lanes);
      source += __builtin_popcount(lanes);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) sums[r][4 * w + q] = _mm512_fmadd_ps(grad[r], weights, sums[r][4 * w + q]);
    }
  }
}

// grad_input for small batches, without a tile: the expanded weight rows go straight into FMAs
// on register accumulators. acc holds kRows batch rows of dx over kWindows windows of 64 columns
// from `column` (4 x kWindows vectors per row, 16 in all); each weight row of [first_row,
// first_row + rows) is expanded once per window and serves all kRows rows. grad_by_row is dy
// transposed, [out x M] fp32 with M = kRows; acc rows are acc_stride floats apart, loaded before
// and stored after the rows.
template <typename scalar_t, int kN, int kM, int kRows, int kWindows>
SPARSEKERNELS_AVX512 void grad_input_rows_masked(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                                 const float* grad_by_row, int64_t M, int64_t first_row,
                                                 int64_t rows, int64_t column, float* acc, int64_t acc_stride) {
  constexpr int kVectors = 4 * kWindows;
  const int64_t kept = shape.kept_per_row();
  __m512 sums[kRows][kVectors];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) sums[r][v] = _mm512_load_ps(acc + r * acc_stride + v * kLanes);
  }
  int64_t groups[kWindows];
  for (int w = 0; w < kWindows; ++w) {
    groups[w] = std::clamp<int64_t>((shape.in_features - column - 64 * w) / kM, 0, 64 / kM);
  }
  for (int64_t o = first_row; o < first_row + rows; ++o) {
    __m512 grad[kRows];
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) grad[r] = _mm512_set1_ps(grad_by_row[o * M + r]);
    const scalar_t* row_values = values + o * kept;
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    if (values_follow(shape, o)) {
      accumulate_row_masked<true, scalar_t, kN, kM, kRows, kWindows>(row_values, row_bytes, kept, column, groups, grad,
                                                                    sums);
    } else {
      accumulate_row_masked<false, scalar_t, kN, kM, kRows, kWindows>(row_values, row_bytes, kept, column, groups,
                                                                     grad, sums);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) _mm512_store_ps(acc + r * acc_stride + v * kLanes, sums[r][v]);
  }
}

// dx accumulators [M x columns] (row stride acc_stride, columns a multiple of 64 from `column`)
// += dy rows x weight rows [first_row, first_row + rows), in register blocks of 1 x 256 or 2 x 128
// (batch rows x columns) and 64-column blocks for the rest. M <= kSmallGradInputBatch (2).
template <typename scalar_t, int kN, int kM>
SPARSEKERNELS_AVX512 void grad_input_small_batch_masked(const scalar_t* values, const uint8_t* positions,
                                                        const NMShape& shape, const float* grad_by_row, int64_t M,
                                                        int64_t first_row, int64_t rows, int64_t column,
                                                        int64_t columns, float* acc, int64_t acc_stride) {
  int64_t c = 0;
  if (M == 2) {
    for (; c + 128 <= columns; c += 128) {
      grad_input_rows_masked<scalar_t, kN, kM, 2, 2>(values, positions, shape, grad_by_row, M, first_row, rows,
                                                     column + c, acc + c, acc_stride);
    }
    for (; c < columns; c += 64) {
      grad_input_rows_masked<scalar_t, kN, kM, 2, 1>(values, positions, shape, grad_by_row, M, first_row, rows,
                                                     column + c, acc + c, acc_stride);
    }
    return;
  }
  for (; c + 256 <= columns; c += 256) {
    grad_input_rows_masked<scalar_t, kN, kM, 1, 4>(values, positions, shape, grad_by_row, M, first_row, rows,
                                                   column + c, acc + c, acc_stride);
  }
  for (; c < columns; c += 64) {
    grad_input_rows_masked<scalar_t, kN, kM, 1, 1>(values, positions, shape, grad_by_row, M, first_row, rows,
                                                   column + c, acc + c, acc_stride);
  }
}

// grad_input_small_batch_masked for the patterns with kept-column masks; false for the others.
template <typename scalar_t>
SPARSEKERNELS_AVX512 bool grad_input_small_batch(const scalar_t* values, const uint8_t* positions,
                                                 const NMShape& shape, const float* grad_by_row, int64_t M,
                                                 int64_t first_row, int64_t rows, int64_t column, int64_t columns,
                                                 float* acc, int64_t acc_stride) {
#define SPARSEKERNELS_GRAD_INPUT_BY_MASK(kN, kM)                                                              \
  if (shape.n == kN && shape.m == kM) {                                                                      \
    grad_input_small_batch_masked<scalar_t, kN, kM>(values, positions, shape, grad_by_row, M, first_row, rows, \
                                                    column, columns, acc, acc_stride);                        \
    return true;                                                                                             \
  }
  SPARSEKERNELS_FOR_EACH_MASKED_PATTERN(SPARSEKERNELS_GRAD_INPUT_BY_MASK)
#undef SPARSEKERNELS_GRAD_INPUT_BY_MASK
  return false;
}

// Expansion into the grad_input tile: clear the row, decode 16 positions, scatter the 16 values
// (the columns of one row are distinct, so lanes never clash). A row's slice of the tile is a
// few KiB written just before, so the scattered stores hit L1.
template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX512 void expand_rows_bits(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                           const int32_t* group_base, int64_t first_row, int64_t rows,
                                           int64_t first_kept, int64_t count, int64_t origin, int64_t width,
                                           float* tile, int64_t tile_stride) {
  const PositionDecoder<kBits> decoder;
  const __m512i origin_vector = _mm512_set1_epi32(static_cast<int32_t>(origin));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values + (first_row + r) * shape.kept_per_row() + first_kept;
    const uint8_t* row_bytes = positions + (first_row + r) * shape.position_bytes() + first_kept * kBits / 8;
    float* tile_row = tile + r * tile_stride;
    for (int64_t c = 0; c < width; c += kLanes) _mm512_mask_storeu_ps(tile_row + c, first_lanes(width - c), _mm512_setzero_ps());
    for (int64_t i = 0; i < count; i += kLanes) {
      const __mmask16 lanes = first_lanes(count - i);
      const __m512i offsets = decoder.decode(row_bytes + i * kBits / 8, std::min(kLanes, count - i));
      const __m512i local = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, group_base + first_kept + i), offsets), origin_vector);
      _mm512_mask_i32scatter_ps(tile_row, lanes, local, load_as_float(row_values + i, lanes), 4);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void expand_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                      const int32_t* group_base, int64_t first_row, int64_t rows, int64_t first_kept,
                                      int64_t count, int64_t origin, int64_t width, float* tile,
                                      int64_t tile_stride) {
  // Windows must start on a multiple of 64 columns; grad_input's spans start at multiples of
  // kDensePanel.
  if (origin % 64 == 0 && expand_rows_by_mask(values, positions, shape, first_row, rows, origin, width, tile,
                                              tile_stride)) {
    return;
  }
  switch (bits_per_position(shape.m)) {
    case 1:
      return expand_rows_bits<scalar_t, 1>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
    case 2:
      return expand_rows_bits<scalar_t, 2>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
    default:
      return expand_rows_bits<scalar_t, 4>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
  }
}

// How the small-batch forward fetches the 16 activations that a chunk of 16 kept values needs.
// When n divides 16 a chunk covers 16 / n whole groups, i.e. a window of 16 / n * m consecutive
// columns; windows of 32 or 64 columns are loaded whole and permuted into place (vpermt2ps picks
// from 32 floats; a 64-column window takes two and a blend on bit 5 of the index). Other patterns
// gather. Permutes cost one shuffle per 16 values where a gather issues 16 loads.
enum class Fetch { kWindow32, kWindow64, kGather };

// For each lane of a chunk of 16 kept values, the first column of its group relative to the
// chunk's window (lane / n * m).
SPARSEKERNELS_AVX512 inline __m512i window_group_columns(const NMShape& shape) {
  alignas(64) int32_t columns[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) columns[lane] = static_cast<int32_t>(lane / shape.n * shape.m);
  return _mm512_load_si512(columns);
}

// The 16 activations of a full chunk from its window of 32 or 64 columns of one x row: index
// holds each lane's column inside the window, upper the lanes whose column is 32 or more.
template <Fetch kFetch>
SPARSEKERNELS_AVX512 inline __m512 fetch_window(const float* window, __m512i index, __mmask16 upper) {
  __m512 fetched = _mm512_permutex2var_ps(_mm512_loadu_ps(window), index, _mm512_loadu_ps(window + 16));
  if constexpr (kFetch == Fetch::kWindow64) {
    const __m512 high = _mm512_permutex2var_ps(_mm512_loadu_ps(window + 32), index, _mm512_loadu_ps(window + 48));
    fetched = _mm512_mask_blend_ps(upper, fetched, high);
  }
  return fetched;
}

// Dot products of one output row with kRows rows of x (fp32, row stride in_features), added to
// sums[0 .. kRows). Two accumulator sets (even / odd chunks) hide the FMA latency.
template <typename scalar_t, int kBits, Fetch kFetch, int kRows>
SPARSEKERNELS_AVX512 inline void small_batch_dots(const float* x, int64_t in_features, const scalar_t* row_values,
                                                  const uint8_t* row_bytes, int64_t kept, const int32_t* group_base,
                                                  const PositionDecoder<kBits>& decoder, __m512i window_base,
                                                  float* sums) {
  constexpr int64_t kSpan = kFetch == Fetch::kWindow32 ? 32 : 64;  // window columns
  __m512 acc[2][kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
  const int64_t full_chunks = kept / kLanes;
  for (int64_t pair = 0; pair + 2 <= full_chunks; pair += 2) {
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const int64_t chunk = pair + half;
      const __m512i offsets = decoder.decode(row_bytes + chunk * 2 * kBits, kLanes);
      const __m512 weights = load_as_float(row_values + chunk * kLanes, first_lanes(kLanes));
      if constexpr (kFetch == Fetch::kGather) {
        const __m512i columns = _mm512_add_epi32(_mm512_loadu_si512(group_base + chunk * kLanes), offsets);
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          acc[half][r] = _mm512_fmadd_ps(weights, _mm512_i32gather_ps(columns, x + r * in_features, 4), acc[half][r]);
        }
      } else {
        const __m512i index = _mm512_add_epi32(window_base, offsets);
        const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
#pragma GCC unroll 4
        for (int r = 0; r < kRows; ++r) {
          const __m512 fetched = fetch_window<kFetch>(x + r * in_features + chunk * kSpan, index, upper);
          acc[half][r] = _mm512_fmadd_ps(weights, fetched, acc[half][r]);
        }
      }
    }
  }
  // The odd full chunk and the partial last chunk: masked gathers.
  for (int64_t first = full_chunks / 2 * 2 * kLanes; first < kept; first += kLanes) {
    const int64_t count = std::min(kLanes, kept - first);
    const __mmask16 lanes = first_lanes(count);
    const __m512i columns = _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, group_base + first),
                                             decoder.decode(row_bytes + first * kBits / 8, count));
    const __m512 weights = load_as_float(row_values + first, lanes);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m512 gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, columns, x + r * in_features, 4);
      acc[0][r] = _mm512_fmadd_ps(weights, gathered, acc[0][r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sums[r] += _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
}

// Output rows [row_begin, row_end) for M < kSmallBatch. Batch rows go four at a time, so the
// decode and conversion of a chunk serve four rows, and the weight row stays in L1 between passes.
template <typename scalar_t, int kBits, Fetch kFetch>
SPARSEKERNELS_AVX512 void small_batch_rows(const float* x, int64_t M, const scalar_t* values,
                                           const uint8_t* positions, const NMShape& shape,
                                           const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                                           int64_t row_begin, int64_t row_end) {
  const PositionDecoder<kBits> decoder;
  const int64_t kept = shape.kept_per_row();
  const int64_t in_features = shape.in_features;
  const __m512i window_base = avx512::window_group_columns(shape);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const scalar_t* row_values = values + o * kept;
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    float sums[kSmallBatch] = {};
    for (int64_t r = 0; r < M; r += 4) {
      const float* x_rows = x + r * in_features;
      switch (std::min<int64_t>(4, M - r)) {
        case 1:
          small_batch_dots<scalar_t, kBits, kFetch, 1>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       decoder, window_base, sums + r);
          break;
        case 2:
          small_batch_dots<scalar_t, kBits, kFetch, 2>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       decoder, window_base, sums + r);
          break;
        case 3:
          small_batch_dots<scalar_t, kBits, kFetch, 3>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       decoder, window_base, sums + r);
          break;
        default:
          small_batch_dots<scalar_t, kBits, kFetch, 4>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       decoder, window_base, sums + r);
          break;
      }
    }
    const float bias_value = bias ? to_float(bias[o]) : 0.0f;
    for (int64_t r = 0; r < M; ++r) y[r * shape.out_features + o] = from_float<scalar_t>(sums[r] + bias_value);
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX512 void forward_small_batch_bits(const float* x, int64_t M, const scalar_t* values,
                                                   const uint8_t* positions, const NMShape& shape,
                                                   const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                                                   int64_t row_begin, int64_t row_end) {
  const int64_t window = chunk_window_columns(shape, kLanes);
  if (window == 32) {
    small_batch_rows<scalar_t, kBits, Fetch::kWindow32>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  } else if (window == 64) {
    small_batch_rows<scalar_t, kBits, Fetch::kWindow64>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  } else {
    small_batch_rows<scalar_t, kBits, Fetch::kGather>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void forward_small_batch(const float* x, int64_t M, const scalar_t* values,
                                              const uint8_t* positions, const NMShape& shape,
                                              const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                                              int64_t row_begin, int64_t row_end) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return forward_small_batch_bits<scalar_t, 1>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
    case 2:
      return forward_small_batch_bits<scalar_t, 2>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
    default:
      return forward_small_batch_bits<scalar_t, 4>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  }
}

// grad_values for small batches, the transpose of the small-batch forward: for a chunk of 16 kept
// values of row o, g[o][j] = sum_r dy[r][o] * x[r][column of j]. The chunk's positions are decoded
// once, the activations fetched as in the forward (window permutes, or gathers for the last
// partial chunk and for n not dividing 16), one FMA per batch row, and the 16 gradients stored:
// no transposed copies, no padding lanes, no horizontal sums, which at M = 1 cost the batch-lane
// kernels 16 times the multiply-adds. Covers the kept values [first_kept, first_kept + count) of
// rows [first_row, first_row + rows), a panel of input columns whose x rows stay in L1 while the
// rows read them; first_kept is a multiple of 16. x_panel holds the panel's columns from `origin`
// of the M rows of x, fp32, row stride x_stride. grad_by_row is dy transposed, [out x M] fp32.
template <typename scalar_t, int kBits, Fetch kFetch>
SPARSEKERNELS_AVX512 void grad_values_small_batch_panel(const float* x_panel, int64_t x_stride, int64_t origin,
                                                        int64_t M, const float* grad_by_row, const uint8_t* positions,
                                                        const NMShape& shape, const int32_t* group_base,
                                                        int64_t first_row, int64_t rows, int64_t first_kept,
                                                        int64_t count, scalar_t* grad_values) {
  constexpr int64_t kSpan = kFetch == Fetch::kWindow32 ? 32 : 64;  // window columns
  const PositionDecoder<kBits> decoder;
  const int64_t kept = shape.kept_per_row();
  const __m512i origin_vector = _mm512_set1_epi32(static_cast<int32_t>(origin));
  const __m512i window_base = avx512::window_group_columns(shape);
  const int64_t end = first_kept + count;
  const int64_t windowed_end = kFetch == Fetch::kGather ? first_kept : first_kept + count / kLanes * kLanes;
  for (int64_t o = first_row; o < first_row + rows; ++o) {
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    const float* grad = grad_by_row + o * M;
    scalar_t* row_out = grad_values + o * kept;
    int64_t first = first_kept;
    for (; first < windowed_end; first += kLanes) {
      const __m512i index = _mm512_add_epi32(window_base, decoder.decode(row_bytes + first * kBits / 8, kLanes));
      const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
      const float* window = x_panel + (first / kLanes * kSpan - origin);
      // Two accumulators, so that consecutive batch rows do not wait on one FMA chain.
      __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
      int64_t r = 0;
      for (; r + 2 <= M; r += 2) {
        even = _mm512_fmadd_ps(_mm512_set1_ps(grad[r]), fetch_window<kFetch>(window + r * x_stride, index, upper), even);
        odd = _mm512_fmadd_ps(_mm512_set1_ps(grad[r + 1]),
                              fetch_window<kFetch>(window + (r + 1) * x_stride, index, upper), odd);
      }
      if (r < M) {
        even = _mm512_fmadd_ps(_mm512_set1_ps(grad[r]), fetch_window<kFetch>(window + r * x_stride, index, upper), even);
      }
      store_from_float(row_out + first, _mm512_add_ps(even, odd), first_lanes(kLanes));
    }
    for (; first < end; first += kLanes) {
      const int64_t chunk = std::min(kLanes, end - first);
      const __mmask16 lanes = first_lanes(chunk);
      const __m512i columns = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, group_base + first),
                           decoder.decode(row_bytes + first * kBits / 8, chunk)),
          origin_vector);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t r = 0; r < M; ++r) {
        const __m512 gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, columns, x_panel + r * x_stride, 4);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(grad[r]), gathered, acc);
      }
      store_from_float(row_out + first, acc, lanes);
    }
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX512 void grad_values_small_batch_bits(const float* x_panel, int64_t x_stride, int64_t origin,
                                                       int64_t M, const float* grad_by_row, const uint8_t* positions,
                                                       const NMShape& shape, const int32_t* group_base,
                                                       int64_t first_row, int64_t rows, int64_t first_kept,
                                                       int64_t count, scalar_t* grad_values) {
  const int64_t window = chunk_window_columns(shape, kLanes);
  if (window == 32) {
    grad_values_small_batch_panel<scalar_t, kBits, Fetch::kWindow32>(x_panel, x_stride, origin, M, grad_by_row, positions,
                                                                     shape, group_base, first_row, rows, first_kept,
                                                                     count, grad_values);
  } else if (window == 64) {
    grad_values_small_batch_panel<scalar_t, kBits, Fetch::kWindow64>(x_panel, x_stride, origin, M, grad_by_row, positions,
                                                                     shape, group_base, first_row, rows, first_kept,
                                                                     count, grad_values);
  } else {
    grad_values_small_batch_panel<scalar_t, kBits, Fetch::kGather>(x_panel, x_stride, origin, M, grad_by_row, positions,
                                                                   shape, group_base, first_row, rows, first_kept,
                                                                   count, grad_values);
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void grad_values_small_batch(const float* x_panel, int64_t x_stride, int64_t origin, int64_t M,
                                                  const float* grad_by_row, const uint8_t* positions,
                                                  const NMShape& shape, const int32_t* group_base, int64_t first_row,
                                                  int64_t rows, int64_t first_kept, int64_t count,
                                                  scalar_t* grad_values) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return grad_values_small_batch_bits<scalar_t, 1>(x_panel, x_stride, origin, M, grad_by_row, positions, shape,
                                                       group_base, first_row, rows, first_kept, count, grad_values);
    case 2:
      return grad_values_small_batch_bits<scalar_t, 2>(x_panel, x_stride, origin, M, grad_by_row, positions, shape,
                                                       group_base, first_row, rows, first_kept, count, grad_values);
    default:
      return grad_values_small_batch_bits<scalar_t, 4>(x_panel, x_stride, origin, M, grad_by_row, positions, shape,
                                                       group_base, first_row, rows, first_kept, count, grad_values);
  }
}

// Forward panel: broadcast each kept weight and FMA it with the activation row of its column.
// Each accumulator set takes one kept value; kSets independent sets keep at least 8 FMAs in
// flight (two FMA ports x 4 cycles latency) whatever the block width.
template <int kVectors>
SPARSEKERNELS_AVX512 void forward_panel(const float* values, const int32_t* columns, int64_t count, int64_t rows,
                                        const float* activations, float* acc) {
  constexpr int kSets = kVectors >= 8 ? 2 : (8 + kVectors - 1) / kVectors;
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row_values = values + r * count;
    const int32_t* row_columns = columns + r * count;
    __m512 sums[kSets][kVectors];
#pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) sums[s][v] = _mm512_setzero_ps();
    }
    int64_t i = 0;
    for (; i + kSets <= count; i += kSets) {
#pragma GCC unroll 8
      for (int s = 0; s < kSets; ++s) {
        const __m512 weight = _mm512_set1_ps(row_values[i + s]);
        const float* source = activations + static_cast<int64_t>(row_columns[i + s]) * kWidth;
#pragma GCC unroll 8
        for (int v = 0; v < kVectors; ++v) sums[s][v] = _mm512_fmadd_ps(weight, _mm512_load_ps(source + v * kLanes), sums[s][v]);
      }
    }
    for (; i < count; ++i) {
      const __m512 weight = _mm512_set1_ps(row_values[i]);
      const float* source = activations + static_cast<int64_t>(row_columns[i]) * kWidth;
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) sums[0][v] = _mm512_fmadd_ps(weight, _mm512_load_ps(source + v * kLanes), sums[0][v]);
    }
    float* row_acc = acc + r * kWidth;
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      __m512 total = _mm512_load_ps(row_acc + v * kLanes);
#pragma GCC unroll 8
      for (int s = 0; s < kSets; ++s) total = _mm512_add_ps(total, sums[s][v]);
      _mm512_store_ps(row_acc + v * kLanes, total);
    }
  }
}

// Horizontal sums of 16 vectors at once: lane i of the result is the sum of the lanes of sums[i].
// Halving steps (256-bit halves, 128-bit quarters, pairs, single lanes) each fold two vectors into
// one, 15 adds in all instead of 16 separate reductions; a final permute restores lane order.
SPARSEKERNELS_AVX512 inline __m512 sum_each_of_16(const __m512 sums[16]) {
  __m512 halves[8];  // 128-bit chunk q: 4 partials of sums[2i] (q < 2) or sums[2i + 1] (q >= 2)
  for (int i = 0; i < 8; ++i) {
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0xee));
  }
  __m512 quarters[4];  // chunk q: 4 partials of sums[4i + q]
  for (int i = 0; i < 4; ++i) {
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xdd));
  }
  __m512 pairs[2];  // chunk q: [a, b, a, b] with a from sums[8i + q], b from sums[8i + 4 + q]
  for (int i = 0; i < 2; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(quarters[2 * i], quarters[2 * i + 1]),
                             _mm512_unpackhi_ps(quarters[2 * i], quarters[2 * i + 1]));
  }
  // chunk q, lane l: total of sums[4 l + q]
  const __m512 totals = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, totals);
}

// grad_values panel: 16 kept values at a time, each a dot product of the register-resident
// gradient row with its activation row; the 16 independent FMA chains are then reduced together.
template <int kVectors>
SPARSEKERNELS_AVX512 void grad_values_panel(const float* grad, const int32_t* columns, int64_t count, int64_t rows,
                                            const float* activations, float* out, bool accumulate) {
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row_columns = columns + r * count;
    float* row_out = out + r * count;
    __m512 grad_row[kVectors];
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) grad_row[v] = _mm512_load_ps(grad + r * kWidth + v * kLanes);
    for (int64_t i = 0; i < count; i += kLanes) {
      const int64_t chunk = std::min(kLanes, count - i);
      const __mmask16 lanes = first_lanes(chunk);
      int32_t padded[kLanes] = {};  // a partial chunk reuses column 0 for its unused lanes
      const int32_t* chunk_columns = row_columns + i;
      if (chunk < kLanes) {
        std::memcpy(padded, chunk_columns, sizeof(int32_t) * chunk);
        chunk_columns = padded;
      }
      __m512 dots[kLanes];
#pragma GCC unroll 16
      for (int q = 0; q < kLanes; ++q) {
        const float* source = activations + static_cast<int64_t>(chunk_columns[q]) * kWidth;
        dots[q] = _mm512_mul_ps(grad_row[0], _mm512_load_ps(source));
#pragma GCC unroll 8
        for (int v = 1; v < kVectors; ++v) dots[q] = _mm512_fmadd_ps(grad_row[v], _mm512_load_ps(source + v * kLanes), dots[q]);
      }
      __m512 totals = sum_each_of_16(dots);
      if (accumulate) totals = _mm512_add_ps(totals, _mm512_maskz_loadu_ps(lanes, row_out + i));
      _mm512_mask_storeu_ps(row_out + i, lanes, totals);
    }
  }
}

// grad_input micro-kernel: kRows x 32 accumulators in registers over the whole depth; per depth
// step two vector loads of the dense tile row and kRows broadcasts from the packed batch strip.
template <int kRows>
SPARSEKERNELS_AVX512 inline void dense_block(const float* a, int64_t depth, const float* b, int64_t b_stride,
                                             float* c, int64_t c_stride, bool accumulate) {
  __m512 acc[kRows][2];
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < depth; ++d) {
    const __m512 low = _mm512_load_ps(b + d * b_stride);
    const __m512 high = _mm512_load_ps(b + d * b_stride + kLanes);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512 scale = _mm512_set1_ps(a[d * kStripRows + i]);
      acc[i][0] = _mm512_fmadd_ps(scale, low, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(scale, high, acc[i][1]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    float* c_row = c + i * c_stride;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(c_row));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(c_row + kLanes));
    }
    _mm512_storeu_ps(c_row, acc[i][0]);
    _mm512_storeu_ps(c_row + kLanes, acc[i][1]);
  }
}

template <int kRows>
SPARSEKERNELS_AVX512 void dense_strip_rows(const float* a, int64_t depth, const float* b, int64_t b_stride,
                                           int64_t strips, float* c, int64_t c_stride, bool accumulate) {
  for (int64_t strip = 0; strip < strips; ++strip) {
    dense_block<kRows>(a, depth, b + strip * kStripColumns, b_stride, c + strip * kStripColumns, c_stride, accumulate);
  }
}

SPARSEKERNELS_AVX512 void dense_strip(const float* a, int64_t rows, int64_t depth, const float* b, int64_t b_stride,
                                      int64_t strips, float* c, int64_t c_stride, bool accumulate) {
  static_assert(kStripRows == 12, "one instantiation per row count");
  using StripFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);
  static constexpr StripFn by_rows[kStripRows + 1] = {
      nullptr,
      &dense_strip_rows<1>,
      &dense_strip_rows<2>,
      &dense_strip_rows<3>,
      &dense_strip_rows<4>,
      &dense_strip_rows<5>,
      &dense_strip_rows<6>,
      &dense_strip_rows<7>,
      &dense_strip_rows<8>,
      &dense_strip_rows<9>,
      &dense_strip_rows<10>,
      &dense_strip_rows<11>,
      &dense_strip_rows<12>,
  };
  by_rows[rows](a, depth, b, b_stride, strips, c, c_stride, accumulate);
}

SPARSEKERNELS_DEFINE_KERNEL_SET  // kernels<scalar_t>: this namespace's table

}  // namespace avx512

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA implementation (x86-64 CPUs without AVX-512: AMD Zen 1-3, Intel client cores).
//
// The batch-lane layout keeps its 16-lane vectors; a kernel here handles each as two ymm. Written
// for ymm: the small-batch GEMV, the forward panel, the grad_values dot products, the grad_input
// micro-kernel, position decoding (8 fields per word), the expansion into grad_input tiles (built
// in registers where n divides 8; AVX2 has no scatter) and the conversions (avx2.h).

namespace avx2 {

using avx2_simd::from_float_array;
using avx2_simd::sum_lanes;
using avx2_simd::to_float_array;

constexpr int64_t kYmmLanes = avx2_simd::kLanes;

// In-group offsets of 8 consecutive kept values whose fields start on the byte chunk_bytes: their
// 8 * kBits <= 32 bits are one little-endian word, shifted per lane and masked. Only the kBits
// bytes that exist are read.
template <int kBits>
SPARSEKERNELS_AVX2 inline __m256i decode8(const uint8_t* chunk_bytes) {
  uint32_t word = 0;
  std::memcpy(&word, chunk_bytes, kBits);
  const __m256i shifts = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits, 6 * kBits, 7 * kBits);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                          _mm256_set1_epi32((1 << kBits) - 1));
}

// Columns of kept values [first, first + count) of one row: 8 at a time where the chunk starts
// on a byte (every chunk does when first does, as 8 * kBits bits are whole bytes), the rest
// one by one.
template <int kBits>
SPARSEKERNELS_AVX2 inline void decode_columns(const uint8_t* row_bytes, int64_t first, int64_t count,
                                                 const int32_t* group_base, int32_t* columns) {
  int64_t i = 0;
  if (first * kBits % 8 == 0) {
    for (; i + kYmmLanes <= count; i += kYmmLanes) {
      const __m256i base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_base + first + i));
      const __m256i offsets = decode8<kBits>(row_bytes + (first + i) * kBits / 8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(columns + i), _mm256_add_epi32(base, offsets));
    }
  }
  for (; i < count; ++i) columns[i] = group_base[first + i] + generic::position_at(row_bytes, kBits, first + i);
}

template <int kBits>
SPARSEKERNELS_AVX2 void decode_rows_bits(const uint8_t* positions, int64_t position_stride, int64_t rows,
                                         int64_t first_kept, int64_t count, const int32_t* group_base,
                                         int32_t* columns, int64_t columns_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    decode_columns<kBits>(positions + r * position_stride, first_kept, count, group_base, columns + r * columns_stride);
  }
}

SPARSEKERNELS_AVX2 void decode_rows(const uint8_t* positions, int64_t position_stride, int bits, int64_t rows,
                                    int64_t first_kept, int64_t count, const int32_t* group_base, int32_t* columns,
                                    int64_t columns_stride) {
  switch (bits) {
    case 1:
      return decode_rows_bits<1>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
    case 2:
      return decode_rows_bits<2>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
    default:
      return decode_rows_bits<4>(positions, position_stride, rows, first_kept, count, group_base, columns, columns_stride);
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX2 void unpack_rows_bits(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                         const int32_t* group_base, int64_t first_row, int64_t rows,
                                         int64_t panel_kept, float* values_out, int32_t* columns_out) {
  const int64_t kept = shape.kept_per_row();
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values != nullptr ? values + (first_row + r) * kept : nullptr;
    const uint8_t* row_bytes = positions + (first_row + r) * shape.position_bytes();
    for (int64_t first = 0; first < kept; first += panel_kept) {
      const int64_t count = std::min(panel_kept, kept - first);
      const int64_t offset = first * rows + r * count;  // = p * rows * panel_kept + r * count
      decode_columns<kBits>(row_bytes, first, count, group_base, columns_out + offset);
      if (values_out != nullptr) to_float_array(row_values + first, values_out + offset, count);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void unpack_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                    const int32_t* group_base, int64_t first_row, int64_t rows, int64_t panel_kept,
                                    float* values_out, int32_t* columns_out) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return unpack_rows_bits<scalar_t, 1>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
    case 2:
      return unpack_rows_bits<scalar_t, 2>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
    default:
      return unpack_rows_bits<scalar_t, 4>(values, positions, shape, group_base, first_row, rows, panel_kept, values_out, columns_out);
  }
}

// Expansion into the grad_input tile, built in registers. When n divides 8, a chunk of 8 kept
// values (starting on a group) covers 8 / n whole groups, i.e. m / n ymm of dense columns. Lane l
// of dense vector h holds column c = 8 h + l of the chunk, in group g = c / m at offset c % m;
// of the n kept values of that group (chunk indices g n + t), at most one has that offset, so
//   dense = OR over t < n of (offset[g n + t] == c % m) AND value[g n + t],
// two vpermd/vpermps, a compare, an AND and an OR per candidate, and every dense column is
// written once by a full store (no clearing pass, no scatter). The AND/OR moves bits, so values
// (signed zeros and NaNs included) land unchanged. Other n, and a partial last chunk, take the
// clear-then-store path one value at a time.
struct ExpandSelectors {
  // For dense vector h and candidate t (h * n + t): the chunk index of the candidate per lane,
  // and per h the in-group offset of each lane's column. m / n * n = m <= 16 vectors each.
  alignas(32) int32_t candidate[16][kYmmLanes];
  alignas(32) int32_t offset[16][kYmmLanes];
  ExpandSelectors(int64_t n, int64_t m) {
    for (int64_t h = 0; h < m / n; ++h) {
      for (int64_t lane = 0; lane < kYmmLanes; ++lane) {
        const int64_t column = h * kYmmLanes + lane;
        offset[h][lane] = static_cast<int32_t>(column % m);
        for (int64_t t = 0; t < n; ++t) candidate[h * n + t][lane] = static_cast<int32_t>(column / m * n + t);
      }
    }
  }
};

template <typename scalar_t, int kBits, int kN>
SPARSEKERNELS_AVX2 void expand_rows_selected(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                             const int32_t* group_base, int64_t first_row, int64_t rows,
                                             int64_t first_kept, int64_t count, int64_t origin, int64_t width,
                                             float* tile, int64_t tile_stride) {
  static_assert(kYmmLanes % kN == 0, "a chunk of 8 kept values must hold whole groups");
  const ExpandSelectors selectors(kN, shape.m);
  const int64_t vectors_per_chunk = shape.m / kN;
  const int64_t chunk_columns = vectors_per_chunk * kYmmLanes;
  const int64_t full_chunks = count / kYmmLanes;
  const int64_t start_column = first_kept / kN * shape.m;  // first_kept starts a group
  const auto* candidate = reinterpret_cast<const __m256i*>(selectors.candidate);
  const auto* offset = reinterpret_cast<const __m256i*>(selectors.offset);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row_values = values + (first_row + r) * shape.kept_per_row() + first_kept;
    const uint8_t* row_bytes = positions + (first_row + r) * shape.position_bytes() + first_kept * kBits / 8;
    float* tile_row = tile + r * tile_stride - origin;  // indexed by absolute column
    std::fill(tile_row + origin, tile_row + start_column, 0.0f);
    for (int64_t chunk = 0; chunk < full_chunks; ++chunk) {
      const int64_t i = chunk * kYmmLanes;
      const __m256 chunk_values = avx2_simd::load8(row_values + i);
      const __m256i chunk_offsets = decode8<kBits>(row_bytes + i * kBits / 8);
      float* dense = tile_row + start_column + chunk * chunk_columns;
      for (int64_t h = 0; h < vectors_per_chunk; ++h) {
        __m256 column_values = _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int t = 0; t < kN; ++t) {
          const __m256i source = _mm256_load_si256(candidate + h * kN + t);
          const __m256i hit = _mm256_cmpeq_epi32(_mm256_permutevar8x32_epi32(chunk_offsets, source),
                                                 _mm256_load_si256(offset + h));
          column_values = _mm256_or_ps(
              column_values, _mm256_and_ps(_mm256_castsi256_ps(hit), _mm256_permutevar8x32_ps(chunk_values, source)));
        }
        _mm256_storeu_ps(dense + h * kYmmLanes, column_values);
      }
    }
    // The rest of the row: the columns after the full chunks (a partial chunk, then the padding
    // up to whole strips) are cleared, and the last count % 8 kept values stored one by one.
    const int64_t done = full_chunks * kYmmLanes;
    std::fill(tile_row + start_column + full_chunks * chunk_columns, tile_row + origin + width, 0.0f);
    for (int64_t i = done; i < count; ++i) {
      tile_row[group_base[first_kept + i] + generic::position_at(row_bytes, kBits, i)] = to_float(row_values[i]);
    }
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX2 void expand_rows_bits(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                         const int32_t* group_base, int64_t first_row, int64_t rows,
                                         int64_t first_kept, int64_t count, int64_t origin, int64_t width,
                                         float* tile, int64_t tile_stride) {
  // The register path needs chunks that start on a byte of the positions and on a group.
  const bool chunks_aligned = first_kept * kBits % 8 == 0 && first_kept % shape.n == 0;
  switch (chunks_aligned ? shape.n : 0) {
    case 1:
      return expand_rows_selected<scalar_t, kBits, 1>(values, positions, shape, group_base, first_row, rows,
                                                      first_kept, count, origin, width, tile, tile_stride);
    case 2:
      return expand_rows_selected<scalar_t, kBits, 2>(values, positions, shape, group_base, first_row, rows,
                                                      first_kept, count, origin, width, tile, tile_stride);
    case 4:
      return expand_rows_selected<scalar_t, kBits, 4>(values, positions, shape, group_base, first_row, rows,
                                                      first_kept, count, origin, width, tile, tile_stride);
    case 8:
      return expand_rows_selected<scalar_t, kBits, 8>(values, positions, shape, group_base, first_row, rows,
                                                      first_kept, count, origin, width, tile, tile_stride);
    default:  // n = 3, 5, 6, 7, 9..15: groups straddle chunks of 8
      return generic::expand_rows(values, positions, shape, group_base, first_row, rows, first_kept, count, origin,
                                  width, tile, tile_stride);
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void expand_rows(const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                                    const int32_t* group_base, int64_t first_row, int64_t rows, int64_t first_kept,
                                    int64_t count, int64_t origin, int64_t width, float* tile, int64_t tile_stride) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return expand_rows_bits<scalar_t, 1>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
    case 2:
      return expand_rows_bits<scalar_t, 2>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
    default:
      return expand_rows_bits<scalar_t, 4>(values, positions, shape, group_base, first_row, rows, first_kept, count,
                                           origin, width, tile, tile_stride);
  }
}

// How the small-batch forward fetches the 8 activations of a chunk of 8 kept values. When n
// divides 8 and the chunk's groups span 16 consecutive columns (2:4, 1:2, 4:8, 8:16), the window
// is loaded as two ymm and each lane picks its column with vpermps from both halves and a blend on
// bit 3 of its index; other patterns gather (one load per lane).
enum class Fetch8 { kWindow16, kGather };

// Dot products of one output row with kRows rows of x (fp32, row stride in_features), added to
// sums[0 .. kRows). At one row, two accumulator sets (even / odd chunks) hide the FMA latency.
template <typename scalar_t, int kBits, Fetch8 kFetch, int kRows>
SPARSEKERNELS_AVX2 inline void small_batch_dots(const float* x, int64_t in_features, const scalar_t* row_values,
                                                const uint8_t* row_bytes, int64_t kept, const int32_t* group_base,
                                                __m256i window_base, float* sums) {
  __m256 acc[2][kRows];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  // One chunk of 8 kept values into an accumulator set. The chunk loop goes in pairs so that the
  // set is a constant and the sets stay in registers (a run-time index spills them to the stack,
  // and the FMA chain then runs through store-to-load forwarding). From two rows on, the rows'
  // chains already hide the FMA latency, and one set leaves registers for the fetch.
  const auto chunk_dots = [&](int64_t chunk, __m256* half_acc) SPARSEKERNELS_AVX2 {
    const __m256i offsets = decode8<kBits>(row_bytes + chunk * kBits);  // 8 fields = kBits bytes
    const __m256 weights = avx2_simd::load8(row_values + chunk * kYmmLanes);
    if constexpr (kFetch == Fetch8::kGather) {
      const __m256i columns = _mm256_add_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_base + chunk * kYmmLanes)), offsets);
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        half_acc[r] = _mm256_fmadd_ps(weights, _mm256_i32gather_ps(x + r * in_features, columns, 4), half_acc[r]);
      }
    } else {
      const __m256i index = _mm256_add_epi32(window_base, offsets);  // 0 .. 15 inside the window
      const __m256 from_upper = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 -> sign
#pragma GCC unroll 4
      for (int r = 0; r < kRows; ++r) {
        const float* window = x + r * in_features + chunk * 16;
        const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(window), index);
        const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(window + 8), index);
        half_acc[r] = _mm256_fmadd_ps(weights, _mm256_blendv_ps(low, high, from_upper), half_acc[r]);
      }
    }
  };
  const int64_t full_chunks = kept / kYmmLanes;
  int64_t chunk = 0;
  for (; chunk + 2 <= full_chunks; chunk += 2) {
    chunk_dots(chunk, acc[0]);
    chunk_dots(chunk + 1, acc[kRows >= 2 ? 0 : 1]);
  }
  if (chunk < full_chunks) chunk_dots(chunk, acc[0]);
  float tail[kRows] = {};
  for (int64_t j = full_chunks * kYmmLanes; j < kept; ++j) {  // the last kept % 8 values
    const int64_t column = group_base[j] + generic::position_at(row_bytes, kBits, j);
    const float weight = to_float(row_values[j]);
    for (int r = 0; r < kRows; ++r) tail[r] += weight * x[r * in_features + column];
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) sums[r] += sum_lanes(_mm256_add_ps(acc[0][r], acc[1][r])) + tail[r];
}

// Output rows [row_begin, row_end) for M < kSmallBatch, batch rows four at a time (as in the
// AVX-512 kernel: one decode and conversion of a chunk serves four rows).
template <typename scalar_t, int kBits, Fetch8 kFetch>
SPARSEKERNELS_AVX2 void small_batch_rows(const float* x, int64_t M, const scalar_t* values, const uint8_t* positions,
                                         const NMShape& shape, const int32_t* group_base, const scalar_t* bias,
                                         scalar_t* y, int64_t row_begin, int64_t row_end) {
  const int64_t kept = shape.kept_per_row();
  const int64_t in_features = shape.in_features;
  int32_t window_columns[kYmmLanes];  // first column of each lane's group, relative to the window
  for (int64_t lane = 0; lane < kYmmLanes; ++lane) window_columns[lane] = static_cast<int32_t>(lane / shape.n * shape.m);
  const __m256i window_base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(window_columns));
  for (int64_t o = row_begin; o < row_end; ++o) {
    const scalar_t* row_values = values + o * kept;
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    float sums[kSmallBatch] = {};
    for (int64_t r = 0; r < M; r += 4) {
      const float* x_rows = x + r * in_features;
      switch (std::min<int64_t>(4, M - r)) {
        case 1:
          small_batch_dots<scalar_t, kBits, kFetch, 1>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       window_base, sums + r);
          break;
        case 2:
          small_batch_dots<scalar_t, kBits, kFetch, 2>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       window_base, sums + r);
          break;
        case 3:
          small_batch_dots<scalar_t, kBits, kFetch, 3>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       window_base, sums + r);
          break;
        default:
          small_batch_dots<scalar_t, kBits, kFetch, 4>(x_rows, in_features, row_values, row_bytes, kept, group_base,
                                                       window_base, sums + r);
          break;
      }
    }
    const float bias_value = bias ? to_float(bias[o]) : 0.0f;
    for (int64_t r = 0; r < M; ++r) y[r * shape.out_features + o] = from_float<scalar_t>(sums[r] + bias_value);
  }
}

template <typename scalar_t, int kBits>
SPARSEKERNELS_AVX2 void forward_small_batch_bits(const float* x, int64_t M, const scalar_t* values,
                                                 const uint8_t* positions, const NMShape& shape,
                                                 const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                                                 int64_t row_begin, int64_t row_end) {
  const bool window16 = chunk_window_columns(shape, kYmmLanes) == 16;
  if (window16) {
    small_batch_rows<scalar_t, kBits, Fetch8::kWindow16>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  } else {
    small_batch_rows<scalar_t, kBits, Fetch8::kGather>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void forward_small_batch(const float* x, int64_t M, const scalar_t* values,
                                            const uint8_t* positions, const NMShape& shape,
                                            const int32_t* group_base, const scalar_t* bias, scalar_t* y,
                                            int64_t row_begin, int64_t row_end) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return forward_small_batch_bits<scalar_t, 1>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
    case 2:
      return forward_small_batch_bits<scalar_t, 2>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
    default:
      return forward_small_batch_bits<scalar_t, 4>(x, M, values, positions, shape, group_base, bias, y, row_begin, row_end);
  }
}

// grad_values for small batches (avx512::grad_values_small_batch_panel with 8 lanes): chunks of 8
// kept values, activations fetched from a 16-column window with two permutes and a blend when 8
// kept values span 16 columns (1:2, 2:4, 4:8), gathered otherwise; the last partial chunk scalar.
template <typename scalar_t, int kBits, Fetch8 kFetch>
SPARSEKERNELS_AVX2 void grad_values_small_batch_panel(const float* x_panel, int64_t x_stride, int64_t origin,
                                                      int64_t M, const float* grad_by_row, const uint8_t* positions,
                                                      const NMShape& shape, const int32_t* group_base,
                                                      int64_t first_row, int64_t rows, int64_t first_kept,
                                                      int64_t count, scalar_t* grad_values) {
  const int64_t kept = shape.kept_per_row();
  int32_t window_columns[kYmmLanes];  // first column of each lane's group, relative to the window
  for (int64_t lane = 0; lane < kYmmLanes; ++lane) window_columns[lane] = static_cast<int32_t>(lane / shape.n * shape.m);
  const __m256i window_base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(window_columns));
  const __m256i origin_vector = _mm256_set1_epi32(static_cast<int32_t>(origin));
  const int64_t end = first_kept + count;
  const int64_t full_end = first_kept + count / kYmmLanes * kYmmLanes;
  for (int64_t o = first_row; o < first_row + rows; ++o) {
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    const float* grad = grad_by_row + o * M;
    scalar_t* row_out = grad_values + o * kept;
    int64_t first = first_kept;
    for (; first < full_end; first += kYmmLanes) {
      const __m256i offsets = decode8<kBits>(row_bytes + first * kBits / 8);
      __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
      if constexpr (kFetch == Fetch8::kGather) {
        const __m256i columns = _mm256_sub_epi32(
            _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_base + first)), offsets),
            origin_vector);
        for (int64_t r = 0; r < M; ++r) {
          even = _mm256_fmadd_ps(_mm256_set1_ps(grad[r]), _mm256_i32gather_ps(x_panel + r * x_stride, columns, 4), even);
        }
      } else {
        const __m256i index = _mm256_add_epi32(window_base, offsets);  // 0 .. 15 inside the window
        const __m256 from_upper = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3 -> sign
        const float* window = x_panel + (first / kYmmLanes * 16 - origin);
        const auto fetch = [&](int64_t r) SPARSEKERNELS_AVX2 {
          const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(window + r * x_stride), index);
          const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(window + r * x_stride + 8), index);
          return _mm256_blendv_ps(low, high, from_upper);
        };
        int64_t r = 0;
        for (; r + 2 <= M; r += 2) {
          even = _mm256_fmadd_ps(_mm256_set1_ps(grad[r]), fetch(r), even);
          odd = _mm256_fmadd_ps(_mm256_set1_ps(grad[r + 1]), fetch(r + 1), odd);
        }
        if (r < M) even = _mm256_fmadd_ps(_mm256_set1_ps(grad[r]), fetch(r), even);
      }
      avx2_simd::store8(row_out + first, _mm256_add_ps(even, odd));
    }
    for (; first < end; ++first) {  // the last count % 8 values
      const int64_t column = group_base[first] + generic::position_at(row_bytes, kBits, first) - origin;
      float sum = 0.0f;
      for (int64_t r = 0; r < M; ++r) sum += grad[r] * x_panel[r * x_stride + column];
      row_out[first] = from_float<scalar_t>(sum);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void grad_values_small_batch(const float* x_panel, int64_t x_stride, int64_t origin, int64_t M,
                                                const float* grad_by_row, const uint8_t* positions,
                                                const NMShape& shape, const int32_t* group_base, int64_t first_row,
                                                int64_t rows, int64_t first_kept, int64_t count,
                                                scalar_t* grad_values) {
  const bool window16 = chunk_window_columns(shape, kYmmLanes) == 16;
#define SPARSEKERNELS_SMALL_GRAD_VALUES(kBits)                                                                      \
  if (window16) {                                                                                                   \
    grad_values_small_batch_panel<scalar_t, kBits, Fetch8::kWindow16>(x_panel, x_stride, origin, M, grad_by_row,    \
                                                                      positions, shape, group_base, first_row, rows, \
                                                                      first_kept, count, grad_values);               \
  } else {                                                                                                          \
    grad_values_small_batch_panel<scalar_t, kBits, Fetch8::kGather>(x_panel, x_stride, origin, M, grad_by_row,      \
                                                                    positions, shape, group_base, first_row, rows,   \
                                                                    first_kept, count, grad_values);                 \
  }
  switch (bits_per_position(shape.m)) {
    case 1:
      SPARSEKERNELS_SMALL_GRAD_VALUES(1)
      return;
    case 2:
      SPARSEKERNELS_SMALL_GRAD_VALUES(2)
      return;
    default:
      SPARSEKERNELS_SMALL_GRAD_VALUES(4)
      return;
  }
#undef SPARSEKERNELS_SMALL_GRAD_VALUES
}

// Forward panel over kChunk (1, 2 or 4) 16-lane vectors of the block: kSets accumulator sets of
// 2 * kChunk ymm, one kept value each, keep 8 FMAs in flight (two FMA ports x 4 cycles). At
// kChunk = 4 a single set of 8 ymm does it, so each kept value's broadcast and column load serve
// 8 FMAs instead of 4 (the loop is load-bound: one activation load per FMA).
template <int kChunk>
SPARSEKERNELS_AVX2 inline void forward_panel_chunk(const float* row_values, const int32_t* row_columns, int64_t count,
                                                   const float* activations, int64_t width, float* row_acc) {
  constexpr int kYmm = 2 * kChunk;
  constexpr int kSets = 8 / kYmm;
  __m256 sums[kSets][kYmm];
#pragma GCC unroll 8
  for (int s = 0; s < kSets; ++s) {
#pragma GCC unroll 8
    for (int v = 0; v < kYmm; ++v) sums[s][v] = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + kSets <= count; i += kSets) {
#pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const __m256 weight = _mm256_set1_ps(row_values[i + s]);
      const float* source = activations + static_cast<int64_t>(row_columns[i + s]) * width;
#pragma GCC unroll 8
      for (int v = 0; v < kYmm; ++v) sums[s][v] = _mm256_fmadd_ps(weight, _mm256_load_ps(source + v * kYmmLanes), sums[s][v]);
    }
  }
  for (; i < count; ++i) {
    const __m256 weight = _mm256_set1_ps(row_values[i]);
    const float* source = activations + static_cast<int64_t>(row_columns[i]) * width;
#pragma GCC unroll 8
    for (int v = 0; v < kYmm; ++v) sums[0][v] = _mm256_fmadd_ps(weight, _mm256_load_ps(source + v * kYmmLanes), sums[0][v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < kYmm; ++v) {
    __m256 total = _mm256_load_ps(row_acc + v * kYmmLanes);
#pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) total = _mm256_add_ps(total, sums[s][v]);
    _mm256_store_ps(row_acc + v * kYmmLanes, total);
  }
}

// Forward panel: the block's kVectors 16-lane vectors in chunks of four, then two and one, each
// chunk a pass over the row's kept values (their values and columns stay in L1 between passes).
template <int kVectors>
SPARSEKERNELS_AVX2 void forward_panel(const float* values, const int32_t* columns, int64_t count, int64_t rows,
                                      const float* activations, float* acc) {
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row_values = values + r * count;
    const int32_t* row_columns = columns + r * count;
    float* row_acc = acc + r * kWidth;
    int v = 0;
    for (; v + 4 <= kVectors; v += 4) {
      forward_panel_chunk<4>(row_values, row_columns, count, activations + v * kLanes, kWidth, row_acc + v * kLanes);
    }
    for (; v + 2 <= kVectors; v += 2) {
      forward_panel_chunk<2>(row_values, row_columns, count, activations + v * kLanes, kWidth, row_acc + v * kLanes);
    }
    if (v < kVectors) {
      forward_panel_chunk<1>(row_values, row_columns, count, activations + v * kLanes, kWidth, row_acc + v * kLanes);
    }
  }
}

// Lane i of the result: the sum of the lanes of dots[i].
SPARSEKERNELS_AVX2 inline __m256 sum_each_of_8(const __m256 dots[8]) {
  const __m256 pairs01 = _mm256_hadd_ps(dots[0], dots[1]);
  const __m256 pairs23 = _mm256_hadd_ps(dots[2], dots[3]);
  const __m256 pairs45 = _mm256_hadd_ps(dots[4], dots[5]);
  const __m256 pairs67 = _mm256_hadd_ps(dots[6], dots[7]);
  // Per 128-bit half: the half's partial sums of dots 0..3 (resp. 4..7).
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23);
  const __m256 quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31));
}

// grad_values panel: 8 kept values at a time, each a dot product of the gradient row (in L1) with
// its activation row; the 8 independent FMA chains are then reduced together.
template <int kVectors>
SPARSEKERNELS_AVX2 void grad_values_panel(const float* grad, const int32_t* columns, int64_t count, int64_t rows,
                                          const float* activations, float* out, bool accumulate) {
  constexpr int64_t kWidth = kVectors * kLanes;
  constexpr int kYmm = 2 * kVectors;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row_columns = columns + r * count;
    const float* grad_row = grad + r * kWidth;
    float* row_out = out + r * count;
    for (int64_t i = 0; i < count; i += kYmmLanes) {
      const int64_t chunk = std::min(kYmmLanes, count - i);
      int32_t padded[kYmmLanes] = {};  // a partial chunk reuses column 0 for its unused lanes
      const int32_t* chunk_columns = row_columns + i;
      if (chunk < kYmmLanes) {
        std::memcpy(padded, chunk_columns, sizeof(int32_t) * chunk);
        chunk_columns = padded;
      }
      __m256 dots[kYmmLanes];
#pragma GCC unroll 8
      for (int q = 0; q < kYmmLanes; ++q) dots[q] = _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int v = 0; v < kYmm; ++v) {
        const __m256 grad_vector = _mm256_load_ps(grad_row + v * kYmmLanes);
#pragma GCC unroll 8
        for (int q = 0; q < kYmmLanes; ++q) {
          const float* source = activations + static_cast<int64_t>(chunk_columns[q]) * kWidth + v * kYmmLanes;
          dots[q] = _mm256_fmadd_ps(grad_vector, _mm256_load_ps(source), dots[q]);
        }
      }
      const __m256 totals = sum_each_of_8(dots);
      alignas(32) float lanes[kYmmLanes];
      _mm256_store_ps(lanes, totals);
      for (int64_t q = 0; q < chunk; ++q) row_out[i + q] = accumulate ? row_out[i + q] + lanes[q] : lanes[q];
    }
  }
}

// grad_input micro-kernel: kRows rows x 16 columns (two ymm) over the whole depth, 12 accumulators
// at 6 rows; a 32-column strip of the dense tile is two such column halves.
template <int kRows>
SPARSEKERNELS_AVX2 inline void dense_block(const float* a, int64_t depth, const float* b, int64_t b_stride, float* c,
                                           int64_t c_stride, bool accumulate) {
  __m256 acc[kRows][2];
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < depth; ++d) {
    const __m256 low = _mm256_loadu_ps(b + d * b_stride);
    const __m256 high = _mm256_loadu_ps(b + d * b_stride + kYmmLanes);
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      const __m256 scale = _mm256_broadcast_ss(a + d * kStripRows + i);
      acc[i][0] = _mm256_fmadd_ps(scale, low, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(scale, high, acc[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i) {
    float* c_row = c + i * c_stride;
    if (accumulate) {
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(c_row));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(c_row + kYmmLanes));
    }
    _mm256_storeu_ps(c_row, acc[i][0]);
    _mm256_storeu_ps(c_row + kYmmLanes, acc[i][1]);
  }
}

// Rows [row0, row0 + kRows) of the strip (a's rows start at a + row0; depth stride kStripRows).
template <int kRows>
SPARSEKERNELS_AVX2 void dense_strip_rows(const float* a, int64_t depth, const float* b, int64_t b_stride,
                                         int64_t strips, float* c, int64_t c_stride, bool accumulate) {
  for (int64_t column = 0; column < strips * kStripColumns; column += 16) {
    dense_block<kRows>(a, depth, b + column, b_stride, c + column, c_stride, accumulate);
  }
}

SPARSEKERNELS_AVX2 void dense_strip(const float* a, int64_t rows, int64_t depth, const float* b, int64_t b_stride,
                                    int64_t strips, float* c, int64_t c_stride, bool accumulate) {
  static_assert(kStripColumns % 16 == 0, "strips are whole 16-column halves");
  using StripFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);
  static constexpr StripFn by_rows[7] = {nullptr,
                                         &dense_strip_rows<1>,
                                         &dense_strip_rows<2>,
                                         &dense_strip_rows<3>,
                                         &dense_strip_rows<4>,
                                         &dense_strip_rows<5>,
                                         &dense_strip_rows<6>};
  // Six batch rows per pass keep 12 of the 16 ymm registers as accumulators.
  for (int64_t row0 = 0; row0 < rows; row0 += 6) {
    by_rows[std::min<int64_t>(6, rows - row0)](a + row0, depth, b, b_stride, strips, c + row0 * c_stride, c_stride,
                                               accumulate);
  }
}

SPARSEKERNELS_DEFINE_KERNEL_SET  // kernels<scalar_t>: this namespace's table

}  // namespace avx2
// ------------------------------------------------------------------------------------------------
// 2:4 bfloat16 forward with VDPBF16PS (the avx512_bf16 level: AVX512-BF16 without AMX).
//
// The two kept values of a 2:4 group are adjacent in `values`: one 32-bit pair (w0, w1), read in
// place. They multiply the activations at the group's offsets (a, b), a < b, and one VDPBF16PS
// adds w0 * x[a] + w1 * x[b] for 16 batch rows at once: 32 multiply-adds per instruction where
// the float32 path does 16, at the same issue rate. For that the activations are copied, per
// batch block (BatchBlocks), into "pair rows": for group g and each of the 6 offset pairs t of a
// 4-column group, a row of `width` 32-bit words whose lane l holds (x[l][4g + a_t], x[l][4g + b_t]),
// at word (6 g + t) * width of the block. The copy is 1.5 times the size of the bfloat16
// activations. A weight row then reads, per group, the pair row that its 4-bit position code
// names, so output rows go in blocks (256 rows from 17 batch rows on) whose pair-row indices
// 6 g + t are decoded panel-major, as UnpackedRows, and reused for every batch block; a block
// sweeps the groups in spans whose pair rows stay in L2 (forward_pairs24).
//
// A code whose offsets do not increase (not a valid 2:4 group; the formats reject it, the raw
// ops do not check) reads pair (0, 1): wrong numbers, never an access outside the copy, as the
// CUDA 2:4 metadata does.

namespace avx512_bf16 {

using avx512_simd::broadcast_pair;
using avx512_simd::dpbf16_tile;
using avx512_simd::transpose16x16_epi32;

constexpr int64_t kPairsPerGroup = 6;
// Offsets (a_t, b_t) of pair t, and the pair of each 4-bit code a | b << 2 (0 when a >= b).
constexpr int kPairFirst[kPairsPerGroup] = {0, 0, 0, 1, 1, 2};
constexpr int kPairSecond[kPairsPerGroup] = {1, 2, 3, 2, 3, 3};
constexpr int32_t kPairOfCode[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0};

// Groups per panel: the panel's pair rows of one batch block, 6 * width words per group, fill
// about 32 KiB of L1 (48 KiB at 128 lanes, where the 16-group minimum applies). Multiples of 16
// groups keep the decode on whole 8-byte runs of positions. Measured on a Zen 5 (48 KiB L1):
// 8 KiB to 128 KiB panels all within the run-to-run noise at M = 16, smaller ones slower at M = 256.
// (Alone and L1-resident the panel kernel is fastest at 24-36 KiB, 150-160 GMAC/s per core against
// 115 at 48 KiB; in the forward, where each row block streams its batch block's pair rows from L3,
// 24 KiB panels did not gain.)
int64_t pair_panel_groups(int vectors) {
  const int64_t groups = kTileFloats / (kPairsPerGroup * kLanes * vectors);
  return std::max<int64_t>(16, groups - groups % 16);
}

// x [M x 4 * groups] bfloat16 -> the pair rows of every batch block, padding lanes zero. Each
// step loads 16 rows x 16 groups (64 columns, two registers per row), forms the 16 words of each
// pair t per row with a two-register 16-bit permute, and transposes them to 16 groups x 16 lanes.
SPARSEKERNELS_AVX512_BF16 void pack_pairs_range(const bfloat16* x, int64_t M, int64_t groups, int64_t chunk_begin,
                                                int64_t chunk_end, uint32_t* packed) {
  const BatchBlocks blocks{M};
  const int64_t in_features = 4 * groups;
  __m512i selectors[kPairsPerGroup];
  for (int t = 0; t < kPairsPerGroup; ++t) {
    alignas(64) uint16_t index[32];
    for (int j = 0; j < 16; ++j) {
      index[2 * j] = static_cast<uint16_t>(4 * j + kPairFirst[t]);
      index[2 * j + 1] = static_cast<uint16_t>(4 * j + kPairSecond[t]);
    }
    selectors[t] = _mm512_load_si512(index);
  }
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t g0 = chunk * 16;
    const int64_t chunk_groups = std::min<int64_t>(16, groups - g0);
    // 64 columns: two registers of 32 bfloat16, masked at the end of the row.
    const int64_t columns = 4 * chunk_groups;
    const __mmask32 low_mask = columns >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << columns) - 1);
    const __mmask32 high_mask =
        columns >= 64 ? ~__mmask32{0} : (columns <= 32 ? __mmask32{0} : static_cast<__mmask32>((1u << (columns - 32)) - 1));
    for (int64_t block = 0; block < blocks.count(); ++block) {
      const int64_t first_row = blocks.first_row(block);
      const int64_t block_rows = blocks.rows(block);
      const int64_t width = blocks.width(block);
      uint32_t* base = packed + blocks.offset(block, kPairsPerGroup * groups);
      for (int64_t lane0 = 0; lane0 < width; lane0 += 16) {
        __m512i low[16], high[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t lane = lane0 + i;
          if (lane < block_rows) {
            const bfloat16* row = x + (first_row + lane) * in_features + 4 * g0;
            low[i] = _mm512_maskz_loadu_epi16(low_mask, row);
            high[i] = _mm512_maskz_loadu_epi16(high_mask, row + 32);
          } else {
            low[i] = high[i] = _mm512_setzero_si512();
          }
        }
        for (int t = 0; t < kPairsPerGroup; ++t) {
          __m512i words[16];
          for (int i = 0; i < 16; ++i) words[i] = _mm512_permutex2var_epi16(low[i], selectors[t], high[i]);
          transpose16x16_epi32(words);
          for (int64_t j = 0; j < chunk_groups; ++j) {
            _mm512_store_si512(base + ((g0 + j) * kPairsPerGroup + t) * width + lane0, words[j]);
          }
        }
      }
    }
  }
}

// Pair-row indices 6 g + t of output rows [first_row, first_row + rows) for the groups
// [group_begin, group_end), panel-major: panel p of the range holds [rows x count(p)] at
// p * rows * panel_groups. group_begin is a multiple of panel_groups. 16 groups are 8 bytes of positions: each
// byte holds the codes of two groups (low nibble first), a code is a | b << 2.
SPARSEKERNELS_AVX512_BF16 void decode_pair_rows(const uint8_t* positions, int64_t position_bytes, int64_t group_begin,
                                                int64_t group_end, int64_t first_row, int64_t rows,
                                                int64_t panel_groups, int32_t* pair_rows) {
  const __m512i pair_of_code = _mm512_loadu_si512(kPairOfCode);
  const __m128i duplicate_bytes = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i nibble_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i lane_times_pairs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                      _mm512_set1_epi32(kPairsPerGroup));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row_bytes = positions + (first_row + r) * position_bytes;
    for (int64_t first = group_begin; first < group_end; first += panel_groups) {
      const int64_t count = std::min(panel_groups, group_end - first);
      int32_t* dst = pair_rows + (first - group_begin) * rows + r * count;
      for (int64_t i = 0; i < count; i += 16) {
        const int64_t g = first + i;
        const int64_t here = std::min<int64_t>(16, count - i);
        const __m128i bytes =
            here == 16 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_bytes + g / 2))
                       : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((here + 1) / 2)) - 1), row_bytes + g / 2);
        const __m512i codes = _mm512_and_si512(
            _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(bytes, duplicate_bytes)), nibble_shift),
            _mm512_set1_epi32(15));
        const __m512i pair = _mm512_permutexvar_epi32(codes, pair_of_code);
        const __m512i index = _mm512_add_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g * kPairsPerGroup)),
                                                                lane_times_pairs),
                                               pair);
        _mm512_mask_storeu_epi32(dst + i, avx512::first_lanes(here), index);
      }
    }
  }
}

// acc[r][lane] += sum over the panel's groups i of the pair dot product of row r's kept pair i
// (values + r * values_stride + 2 i) with pair row pair_rows[r][i] of the batch block. kSets
// independent accumulator sets keep enough VDPBF16PS in flight for narrow blocks.
template <int kVectors>
SPARSEKERNELS_AVX512_BF16 void forward_pairs_panel(const bfloat16* values, int64_t values_stride,
                                                   const int32_t* pair_rows, int64_t count, int64_t rows,
                                                   const uint32_t* activations, float* acc) {
  constexpr int kSets = kVectors >= 6 ? 2 : (12 + kVectors - 1) / kVectors;
  constexpr int64_t kWidth = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const bfloat16* row_values = values + r * values_stride;
    const int32_t* row_pairs = pair_rows + r * count;
    __m512 sums[kSets][kVectors];
#pragma GCC unroll 12
    for (int s = 0; s < kSets; ++s) {
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) sums[s][v] = _mm512_setzero_ps();
    }
    int64_t i = 0;
    for (; i + kSets <= count; i += kSets) {
#pragma GCC unroll 12
      for (int s = 0; s < kSets; ++s) {
        const __m512i weights = broadcast_pair(row_values + 2 * (i + s));
        const uint32_t* source = activations + static_cast<int64_t>(row_pairs[i + s]) * kWidth;
#pragma GCC unroll 8
        for (int v = 0; v < kVectors; ++v) {
          sums[s][v] = _mm512_dpbf16_ps(sums[s][v], (__m512bh)weights, (__m512bh)_mm512_load_si512(source + v * kLanes));
        }
      }
    }
    for (; i < count; ++i) {
      const __m512i weights = broadcast_pair(row_values + 2 * i);
      const uint32_t* source = activations + static_cast<int64_t>(row_pairs[i]) * kWidth;
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) {
        sums[0][v] = _mm512_dpbf16_ps(sums[0][v], (__m512bh)weights, (__m512bh)_mm512_load_si512(source + v * kLanes));
      }
    }
    float* row_acc = acc + r * kWidth;
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      __m512 total = _mm512_load_ps(row_acc + v * kLanes);
#pragma GCC unroll 12
      for (int s = 0; s < kSets; ++s) total = _mm512_add_ps(total, sums[s][v]);
      _mm512_store_ps(row_acc + v * kLanes, total);
    }
  }
}

using ForwardPairsPanelFn = void (*)(const bfloat16*, int64_t, const int32_t*, int64_t, int64_t, const uint32_t*,
                                     float*);
constexpr ForwardPairsPanelFn kForwardPairsPanel[kMaxBlockVectors + 1] = SPARSEKERNELS_BY_VECTORS(forward_pairs_panel);


// grad_values on batch pairs, for every n:m (bfloat16 at the avx512_bf16 level): the dot products
// along the batch of grad_values_panel, with both operands copied as pairs of batch rows. Lane l
// of a pair vector holds the 32-bit pair (v[2l][c], v[2l + 1][c]), so one VDPBF16PS multiplies 32
// batch rows: batch blocks of 128 rows are 4 pair vectors (BatchBlocks with rows_per_lane = 2).
constexpr int64_t kPairRowsPerLane = 2;
constexpr int kMaxPairVectors = kMaxBlockVectors / 2;

// Columns [column_begin, column_end) of source [rows x columns] into the batch-pair layout,
// padding with zeros: per 16 columns and 32 rows, the 16 x 16 words (pair l, column c) are formed
// from two rows at a time and transposed into column order.
SPARSEKERNELS_AVX512_BF16 void pack_batch_pairs_range(const bfloat16* source, int64_t rows, int64_t columns,
                                                      int64_t column_begin, int64_t column_end, uint32_t* packed) {
  const BatchBlocks blocks{rows, kPairRowsPerLane};
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t c0 = column_begin; c0 < column_end; c0 += kLanes) {
    const int64_t width_here = std::min(kLanes, column_end - c0);
    const __mmask16 column_mask = avx512::first_lanes(width_here);
    for (int64_t block = 0; block < blocks.count(); ++block) {
      const int64_t first_row = blocks.first_row(block);
      const int64_t block_rows = blocks.rows(block);
      const int64_t words = blocks.width(block);
      uint32_t* destination = packed + blocks.offset(block, columns) + c0 * words;
      for (int64_t l0 = 0; l0 < words; l0 += kLanes) {
        __m512i pairs[16];
        for (int l = 0; l < 16; ++l) {
          const int64_t even_row = 2 * (l0 + l), odd_row = even_row + 1;
          const __m256i even = even_row < block_rows
                                   ? _mm256_maskz_loadu_epi16(column_mask, source + (first_row + even_row) * columns + c0)
                                   : zero;
          const __m256i odd = odd_row < block_rows
                                  ? _mm256_maskz_loadu_epi16(column_mask, source + (first_row + odd_row) * columns + c0)
                                  : zero;
          pairs[l] = _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
        }
        transpose16x16_epi32(pairs);
        for (int64_t c = 0; c < width_here; ++c) _mm512_store_si512(destination + c * words + l0, pairs[c]);
      }
    }
  }
}

// out[r][i] (+)= sum over the batch of grad[r] . activations[columns[r][i]], 16 kept values at a
// time, reduced together (sum_each_of_16) as in grad_values_panel.
template <int kVectors>
SPARSEKERNELS_AVX512_BF16 void grad_values_pairs_panel(const uint32_t* grad, const int32_t* columns, int64_t count,
                                                       int64_t rows, const uint32_t* activations, float* out,
                                                       bool accumulate) {
  constexpr int64_t kWords = kVectors * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* row_columns = columns + r * count;
    float* row_out = out + r * count;
    __m512i grad_row[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) grad_row[v] = _mm512_load_si512(grad + r * kWords + v * kLanes);
    for (int64_t i = 0; i < count; i += kLanes) {
      const int64_t chunk = std::min(kLanes, count - i);
      const __mmask16 lanes = avx512::first_lanes(chunk);
      int32_t padded[kLanes] = {};  // a partial chunk reuses column 0 for its unused lanes
      const int32_t* chunk_columns = row_columns + i;
      if (chunk < kLanes) {
        std::memcpy(padded, chunk_columns, sizeof(int32_t) * chunk);
        chunk_columns = padded;
      }
      __m512 dots[kLanes];
#pragma GCC unroll 16
      for (int q = 0; q < kLanes; ++q) {
        const uint32_t* source = activations + static_cast<int64_t>(chunk_columns[q]) * kWords;
        dots[q] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) {
          dots[q] = _mm512_dpbf16_ps(dots[q], (__m512bh)grad_row[v], (__m512bh)_mm512_load_si512(source + v * kLanes));
        }
      }
      __m512 totals = avx512::sum_each_of_16(dots);
      if (accumulate) totals = _mm512_add_ps(totals, _mm512_maskz_loadu_ps(lanes, row_out + i));
      _mm512_mask_storeu_ps(row_out + i, lanes, totals);
    }
  }
}

using GradValuesPairsPanelFn = void (*)(const uint32_t*, const int32_t*, int64_t, int64_t, const uint32_t*, float*,
                                        bool);
constexpr GradValuesPairsPanelFn kGradValuesPairsPanel[kMaxPairVectors + 1] = {
    nullptr, &grad_values_pairs_panel<1>, &grad_values_pairs_panel<2>, &grad_values_pairs_panel<3>,
    &grad_values_pairs_panel<4>};

// The small-batch grad_values (avx512::grad_values_small_batch_panel) on pairs of batch rows:
// x_pairs holds word (x[2q][c], x[2q + 1][c]) at row q, column c - origin (row stride x_stride),
// grad_pairs the words (dy[2q][o], dy[2q + 1][o]) at o * pairs + q, so one VDPBF16PS takes two
// batch rows of a chunk and the fetch of a window serves both.
template <int kBits, avx512::Fetch kFetch>
SPARSEKERNELS_AVX512_BF16 void grad_values_small_batch_pairs_panel(const uint32_t* x_pairs, int64_t x_stride,
                                                                   int64_t origin, int64_t pairs,
                                                                   const uint32_t* grad_pairs, const uint8_t* positions,
                                                                   const NMShape& shape, const int32_t* group_base,
                                                                   int64_t first_row, int64_t rows, int64_t first_kept,
                                                                   int64_t count, bfloat16* grad_values) {
  using avx512::Fetch;
  constexpr int64_t kSpan = kFetch == Fetch::kWindow32 ? 32 : 64;  // window columns
  const avx512::PositionDecoder<kBits> decoder;
  const int64_t kept = shape.kept_per_row();
  const __m512i origin_vector = _mm512_set1_epi32(static_cast<int32_t>(origin));
  const __m512i window_base = avx512::window_group_columns(shape);
  const int64_t end = first_kept + count;
  const int64_t windowed_end = kFetch == Fetch::kGather ? first_kept : first_kept + count / kLanes * kLanes;
  for (int64_t o = first_row; o < first_row + rows; ++o) {
    const uint8_t* row_bytes = positions + o * shape.position_bytes();
    const uint32_t* grad = grad_pairs + o * pairs;
    bfloat16* row_out = grad_values + o * kept;
    int64_t first = first_kept;
    for (; first < windowed_end; first += kLanes) {
      const __m512i index = _mm512_add_epi32(window_base, decoder.decode(row_bytes + first * kBits / 8, kLanes));
      const __mmask16 upper = _mm512_test_epi32_mask(index, _mm512_set1_epi32(32));
      // Words move through the float permutes unchanged (no arithmetic touches them).
      const float* window = reinterpret_cast<const float*>(x_pairs) + (first / kLanes * kSpan - origin);
      __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
      int64_t q = 0;
      for (; q + 2 <= pairs; q += 2) {
        const __m512 fetched_even = avx512::fetch_window<kFetch>(window + q * x_stride, index, upper);
        const __m512 fetched_odd = avx512::fetch_window<kFetch>(window + (q + 1) * x_stride, index, upper);
        even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_castps_si512(fetched_even), (__m512bh)_mm512_set1_epi32(grad[q]));
        odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_castps_si512(fetched_odd), (__m512bh)_mm512_set1_epi32(grad[q + 1]));
      }
      if (q < pairs) {
        const __m512 fetched = avx512::fetch_window<kFetch>(window + q * x_stride, index, upper);
        even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_castps_si512(fetched), (__m512bh)_mm512_set1_epi32(grad[q]));
      }
      avx512::store_from_float(row_out + first, _mm512_add_ps(even, odd), avx512::first_lanes(kLanes));
    }
    for (; first < end; first += kLanes) {
      const int64_t chunk = std::min(kLanes, end - first);
      const __mmask16 lanes = avx512::first_lanes(chunk);
      const __m512i columns = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, group_base + first),
                           decoder.decode(row_bytes + first * kBits / 8, chunk)),
          origin_vector);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t q = 0; q < pairs; ++q) {
        const __m512i gathered =
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, columns, x_pairs + q * x_stride, 4);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)gathered, (__m512bh)_mm512_set1_epi32(grad[q]));
      }
      avx512::store_from_float(row_out + first, acc, lanes);
    }
  }
}

template <int kBits>
SPARSEKERNELS_AVX512_BF16 void grad_values_small_batch_pairs_bits(const uint32_t* x_pairs, int64_t x_stride,
                                                                  int64_t origin, int64_t pairs,
                                                                  const uint32_t* grad_pairs, const uint8_t* positions,
                                                                  const NMShape& shape, const int32_t* group_base,
                                                                  int64_t first_row, int64_t rows, int64_t first_kept,
                                                                  int64_t count, bfloat16* grad_values) {
  using avx512::Fetch;
  const int64_t window = chunk_window_columns(shape, kLanes);
  if (window == 32) {
    grad_values_small_batch_pairs_panel<kBits, Fetch::kWindow32>(x_pairs, x_stride, origin, pairs, grad_pairs, positions,
                                                                 shape, group_base, first_row, rows, first_kept, count,
                                                                 grad_values);
  } else if (window == 64) {
    grad_values_small_batch_pairs_panel<kBits, Fetch::kWindow64>(x_pairs, x_stride, origin, pairs, grad_pairs, positions,
                                                                 shape, group_base, first_row, rows, first_kept, count,
                                                                 grad_values);
  } else {
    grad_values_small_batch_pairs_panel<kBits, Fetch::kGather>(x_pairs, x_stride, origin, pairs, grad_pairs, positions,
                                                               shape, group_base, first_row, rows, first_kept, count,
                                                               grad_values);
  }
}

SPARSEKERNELS_AVX512_BF16 void grad_values_small_batch_pairs(const uint32_t* x_pairs, int64_t x_stride, int64_t origin,
                                                             int64_t pairs, const uint32_t* grad_pairs,
                                                             const uint8_t* positions, const NMShape& shape,
                                                             const int32_t* group_base, int64_t first_row, int64_t rows,
                                                             int64_t first_kept, int64_t count, bfloat16* grad_values) {
  switch (bits_per_position(shape.m)) {
    case 1:
      return grad_values_small_batch_pairs_bits<1>(x_pairs, x_stride, origin, pairs, grad_pairs, positions, shape,
                                                   group_base, first_row, rows, first_kept, count, grad_values);
    case 2:
      return grad_values_small_batch_pairs_bits<2>(x_pairs, x_stride, origin, pairs, grad_pairs, positions, shape,
                                                   group_base, first_row, rows, first_kept, count, grad_values);
    default:
      return grad_values_small_batch_pairs_bits<4>(x_pairs, x_stride, origin, pairs, grad_pairs, positions, shape,
                                                   group_base, first_row, rows, first_kept, count, grad_values);
  }
}


// grad_input on pair tiles (bfloat16 at the avx512_bf16 level, even out_features): the expanded
// weight rows (2p, 2p + 1) of a span become pair words tile[p][c] = (W[2p][c], W[2p + 1][c]), and
// grad_out is read in place as pairs (dy[m][2p], dy[m][2p + 1]), so the decompress-and-multiply of
// grad_input_impl runs on avx512_simd::dpbf16_tile. The tile rows come from expand_rows as float32
// holding bfloat16 values, so taking their high halves is exact.
SPARSEKERNELS_AVX512_BF16 void pair_rows_of_tile(const float* expanded, int64_t expanded_stride, int64_t rows,
                                                 int64_t width, uint32_t* tile, int64_t tile_stride) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const float* even = expanded + 2 * p * expanded_stride;
    const float* odd = 2 * p + 1 < rows ? even + expanded_stride : nullptr;
    for (int64_t c = 0; c < width; c += kLanes) {
      const __m512i even_bits = _mm512_castps_si512(_mm512_load_ps(even + c));
      const __m512i odd_bits = odd != nullptr ? _mm512_castps_si512(_mm512_load_ps(odd + c)) : _mm512_setzero_si512();
      _mm512_store_si512(tile + p * tile_stride + c,
                         _mm512_or_si512(_mm512_srli_epi32(even_bits, 16), _mm512_and_si512(odd_bits, high_half)));
    }
  }
}


// The first `count` of up to kFull (4, 8 or 16) bfloat16 values, zero-extended to a zmm: a plain
// load of the whole run when it is all there (partially masked loads cost much more on Zen 5).
template <int64_t kFull>
SPARSEKERNELS_AVX512_BF16 inline __m512i load_kept_words(const bfloat16* source, int64_t count) {
  if (count == kFull) {
    if constexpr (kFull == 16) return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source)));
    if constexpr (kFull == 8) return _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source)));
    if constexpr (kFull == 4) return _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source)));
  }
  return _mm512_zextsi256_si512(_mm256_maskz_loadu_epi16(avx512::first_lanes(count), source));
}

// Row o of an n:m weight (a pattern with kept-column masks), the 64 columns from c0, as two
// registers of 32 bfloat16 (kept values in place, zeros elsewhere and past in_features): the
// window's kept-column mask (avx512::kept_mask64) and VPEXPANDW, which places the kept values of
// each 32-column half (at most 16, since n / m <= 1/2).
template <int kN, int kM>
SPARSEKERNELS_AVX512_BF16 inline void dense_row(const bfloat16* values, const uint8_t* positions,
                                                const NMShape& shape, int64_t o, int64_t c0, __m512i& low,
                                                __m512i& high) {
  constexpr int kBits = bits_per_position(kM);
  constexpr int64_t kHalfKept = 32 / kM * kN;  // kept values per 32 columns
  const int64_t columns = std::clamp<int64_t>(shape.in_features - c0, 0, 64);
  if (columns == 0) {
    low = high = _mm512_setzero_si512();
    return;
  }
  const int64_t groups = columns / kM;
  const int64_t first = c0 / kM * kN;
  const uint64_t mask =
      avx512::kept_mask64<kN, kM>(positions + o * shape.position_bytes() + first * kBits / 8, groups);
  const bfloat16* row_values = values + o * shape.kept_per_row() + first;
  const int64_t count = groups * kN;
  const __m512i low_values = load_kept_words<kHalfKept>(row_values, std::min(count, kHalfKept));
  const __m512i high_values =
      load_kept_words<kHalfKept>(row_values + kHalfKept, std::clamp<int64_t>(count - kHalfKept, 0, kHalfKept));
  low = _mm512_maskz_expand_epi16(static_cast<__mmask32>(mask), low_values);
  high = _mm512_maskz_expand_epi16(static_cast<__mmask32>(mask >> 32), high_values);
}

// Weight rows [first_row, first_row + rows) straight into a pair tile, without the float32
// expansion: dense_row for rows 2p and 2p + 1 (zeros for a row past `rows`), interleaved into pair
// words. Columns [column_begin, column_begin + width) of the weight, zero past in_features;
// column_begin is a multiple of 64 and width of 32.
template <int kN, int kM>
SPARSEKERNELS_AVX512_BF16 void expand_pairs(const bfloat16* values, const uint8_t* positions, const NMShape& shape,
                                            int64_t first_row, int64_t rows, int64_t column_begin, int64_t width,
                                            uint32_t* tile, int64_t tile_stride) {
  alignas(64) uint16_t first_half[32], second_half[32];
  for (int i = 0; i < 32; ++i) {  // permutex2var: 0-31 the even row, 32-63 the odd row
    first_half[i] = static_cast<uint16_t>((i % 2 == 0 ? 0 : 32) + i / 2);
    second_half[i] = static_cast<uint16_t>((i % 2 == 0 ? 16 : 48) + i / 2);
  }
  const __m512i first_index = _mm512_load_si512(first_half);
  const __m512i second_index = _mm512_load_si512(second_half);

  for (int64_t p = 0; p < (rows + 1) / 2; ++p) {
    const int64_t even_row = first_row + 2 * p;
    uint32_t* tile_row = tile + p * tile_stride;
    for (int64_t c = 0; c < width; c += 64) {
      __m512i even_low, even_high, odd_low = _mm512_setzero_si512(), odd_high = _mm512_setzero_si512();
      dense_row<kN, kM>(values, positions, shape, even_row, column_begin + c, even_low, even_high);
      if (2 * p + 1 < rows) dense_row<kN, kM>(values, positions, shape, even_row + 1, column_begin + c, odd_low, odd_high);
      _mm512_store_si512(tile_row + c, _mm512_permutex2var_epi16(even_low, first_index, odd_low));
      _mm512_store_si512(tile_row + c + 16, _mm512_permutex2var_epi16(even_low, second_index, odd_low));
      if (c + 32 < width) {
        _mm512_store_si512(tile_row + c + 32, _mm512_permutex2var_epi16(even_high, first_index, odd_high));
        _mm512_store_si512(tile_row + c + 48, _mm512_permutex2var_epi16(even_high, second_index, odd_high));
      }
    }
  }
}

// expand_pairs for the patterns with kept-column masks; false for the others.
SPARSEKERNELS_AVX512_BF16 bool expand_pairs_by_mask(const bfloat16* values, const uint8_t* positions,
                                                    const NMShape& shape, int64_t first_row, int64_t rows,
                                                    int64_t column_begin, int64_t width, uint32_t* tile,
                                                    int64_t tile_stride) {
#define SPARSEKERNELS_EXPAND_PAIRS_BY_MASK(kN, kM)                                                         \
  if (shape.n == kN && shape.m == kM) {                                                                   \
    expand_pairs<kN, kM>(values, positions, shape, first_row, rows, column_begin, width, tile, tile_stride); \
    return true;                                                                                          \
  }
  SPARSEKERNELS_FOR_EACH_MASKED_PATTERN(SPARSEKERNELS_EXPAND_PAIRS_BY_MASK)
#undef SPARSEKERNELS_EXPAND_PAIRS_BY_MASK
  return false;
}

}  // namespace avx512_bf16

#endif  // defined(__x86_64__)

#undef SPARSEKERNELS_DEFINE_KERNEL_SET
#undef SPARSEKERNELS_BY_VECTORS

// ------------------------------------------------------------------------------------------------
// ISA selection, decided once per process.

template <typename scalar_t>
const KernelSet<scalar_t>& kernels_for_this_cpu() {
#if defined(__x86_64__)
  if (cpu_isa() >= CpuIsa::avx512) return avx512::kernels<scalar_t>;
  if (cpu_isa() == CpuIsa::avx2) return avx2::kernels<scalar_t>;
#endif
  return generic::kernels<scalar_t>;
}

// ------------------------------------------------------------------------------------------------
// Shared drivers: packing, blocking and the parallel loops.

// Elements a packing task converts at least (memory-bound copies: ~50 us).
constexpr int64_t kMinPackElementsPerTask = int64_t{1} << 16;

// Copies source [rows x columns] (row-major) into the transposed, batch-blocked fp32 layout
// described at BatchBlocks, padding lanes with zeros. Parallel over columns (disjoint writes).
template <typename scalar_t>
void pack_transposed(const KernelSet<scalar_t>& kernels, const scalar_t* source, int64_t rows, int64_t columns,
                     float* packed, const ParallelFor& parallel_for) {
  const BatchBlocks blocks{rows};
  if (columns == 0 || rows == 0) return;
  const int64_t grain = std::max<int64_t>(64, kMinPackElementsPerTask / rows);
  parallel_for(0, columns, grain, [&](int64_t column_begin, int64_t column_end) {
    // 16 columns of one block at a time: convert 16-element row segments (vectorised), then
    // transpose from this small staging area.
    std::vector<float> staging(static_cast<size_t>(kMaxBlockRows * kLanes));
    for (int64_t c0 = column_begin; c0 < column_end; c0 += kLanes) {
      const int64_t width_here = std::min(kLanes, column_end - c0);
      for (int64_t block = 0; block < blocks.count(); ++block) {
        const int64_t first_row = blocks.first_row(block);
        const int64_t block_rows = blocks.rows(block);
        const int64_t width = blocks.width(block);
        for (int64_t r = 0; r < block_rows; ++r) {
          kernels.to_float(source + (first_row + r) * columns + c0, staging.data() + r * kLanes, width_here);
        }
        float* destination = packed + blocks.offset(block, columns) + c0 * width;
        for (int64_t c = 0; c < width_here; ++c) {
          float* lane_row = destination + c * width;
          for (int64_t r = 0; r < block_rows; ++r) lane_row[r] = staging[r * kLanes + c];
          for (int64_t r = block_rows; r < width; ++r) lane_row[r] = 0.0f;
        }
      }
    }
  });
}

// Copies source [rows x columns] into strips of kStripRows rows, [strip][column][kStripRows] fp32
// (missing rows of the last strip are zero), the broadcast operand of the grad_input kernel.
template <typename scalar_t>
void pack_row_strips(const KernelSet<scalar_t>& kernels, const scalar_t* source, int64_t rows, int64_t columns,
                     float* packed, const ParallelFor& parallel_for) {
  const int64_t strips = (rows + kStripRows - 1) / kStripRows;
  if (columns == 0 || strips == 0) return;
  const int64_t grain = std::max<int64_t>(1, kMinPackElementsPerTask / (columns * kStripRows));
  parallel_for(0, strips, grain, [&](int64_t strip_begin, int64_t strip_end) {
    std::vector<float> row(static_cast<size_t>(columns));
    for (int64_t strip = strip_begin; strip < strip_end; ++strip) {
      float* destination = packed + strip * columns * kStripRows;
      for (int64_t i = 0; i < kStripRows; ++i) {
        const int64_t r = strip * kStripRows + i;
        if (r < rows) {
          kernels.to_float(source + r * columns, row.data(), columns);
        } else {
          std::fill(row.begin(), row.end(), 0.0f);
        }
        for (int64_t c = 0; c < columns; ++c) destination[c * kStripRows + i] = row[c];
      }
    }
  });
}

// The kept values (as fp32) and absolute input columns of a block of output rows, regrouped
// panel-major: panel p holds [rows x count(p)] at offset p * rows * panel_kept, so a panel kernel
// reads two contiguous arrays. Filled row by row, which reads the weight rows sequentially.
template <typename scalar_t>
class UnpackedRows {
 public:
  UnpackedRows(const NMShape& shape, int64_t panel, int64_t max_rows, bool with_values)
      : shape_(shape),
        panel_(panel),
        panel_kept_(panel / shape.m * shape.n),
        columns_(max_rows * shape.kept_per_row()),
        values_(with_values ? max_rows * shape.kept_per_row() : 0),
        with_values_(with_values) {}

  void unpack(const KernelSet<scalar_t>& kernels, const scalar_t* values, const uint8_t* positions,
              const int32_t* group_base, int64_t first_row, int64_t rows) {
    rows_ = rows;
    kernels.unpack_rows(values, positions, shape_, group_base, first_row, rows, panel_kept_,
                        with_values_ ? values_.data() : nullptr, columns_.data());
  }

  int64_t panels() const { return (shape_.in_features + panel_ - 1) / panel_; }
  int64_t count(int64_t p) const { return std::min(panel_kept_, shape_.kept_per_row() - p * panel_kept_); }
  int64_t offset(int64_t p) const { return p * rows_ * panel_kept_; }
  const int32_t* columns(int64_t p) const { return columns_.data() + offset(p); }
  const float* values(int64_t p) const { return values_.data() + offset(p); }

 private:
  NMShape shape_;
  int64_t panel_;
  int64_t panel_kept_;
  AlignedArray<int32_t> columns_;
  AlignedArray<float> values_;
  bool with_values_;
  int64_t rows_ = 0;
};

// Prefetches (into L2) the kept values and positions of rows [first_row, first_row + rows) within
// one kept range. grad_input walks the weight one panel at a time, a short segment per row, a
// stride pattern the hardware prefetchers do not follow.
template <typename scalar_t>
void prefetch_segments(const scalar_t* values, const uint8_t* positions, const NMShape& shape, int64_t first_row,
                       int64_t rows, const KeptRange& range) {
  constexpr uintptr_t kLine = 64;
  for (int64_t o = first_row; o < first_row + rows; ++o) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(values + o * shape.kept_per_row() + range.first);
    const uintptr_t end = begin + sizeof(scalar_t) * static_cast<uintptr_t>(range.count);
    for (uintptr_t line = begin & ~(kLine - 1); line < end; line += kLine) {
      __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
    }
    __builtin_prefetch(positions + o * shape.position_bytes() + range.first * bits_per_position(shape.m) / 8, 0, 2);
  }
}

// Prefetches (into L2) part `part` of `parts` equal parts of the bytes [begin, begin + bytes). The
// row-block drivers call it once per panel while computing on one block of weight rows, so the
// next block streams in at a steady rate, overlapped with the arithmetic.
inline void prefetch_part(const void* begin, int64_t bytes, int64_t part, int64_t parts) {
  constexpr int64_t kLine = 64;
  const int64_t lines = (bytes + kLine - 1) / kLine;
  const char* base = static_cast<const char*>(begin);
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line) {
    __builtin_prefetch(base + line * kLine, 0, 2);
  }
}

// Output rows per block: the unpacked block (values + columns) stays around 512 KiB, in L2.
int64_t unpack_block_rows(const NMShape& shape) {
  return std::clamp<int64_t>(kUnpackFloats / std::max<int64_t>(shape.kept_per_row(), 1), 8, 64);
}

// Grain (output rows per task) of the row-parallel forward and weight-gradient loops: 16 rows at
// least, more when a row carries little work.
int64_t row_grain(const NMShape& shape, int64_t M) {
  const int64_t work_per_row = std::max<int64_t>(1, shape.kept_per_row() * M);
  return std::max<int64_t>(16, kMinMultiplyAddsPerTask / work_per_row);
}

// The forward's accumulators of batch block `block`, acc[r][lane] (row stride blocks.width(block))
// for the output rows [row_begin, row_begin + rows), transposed back into y with the bias added.
// output_row is scratch for `rows` floats.
template <typename scalar_t>
void store_output_rows(const KernelSet<scalar_t>& kernels, const BatchBlocks& blocks, int64_t block, const float* acc,
                       const float* bias_float, int64_t row_begin, int64_t rows, int64_t out_features,
                       float* output_row, scalar_t* y) {
  const int64_t width = blocks.width(block);
  for (int64_t lane = 0; lane < blocks.rows(block); ++lane) {
    for (int64_t r = 0; r < rows; ++r) output_row[r] = acc[r * width + lane] + bias_float[r];
    kernels.from_float(output_row, y + (blocks.first_row(block) + lane) * out_features + row_begin, rows);
  }
}

#if defined(__x86_64__)
// The 2:4 bfloat16 forward of the avx512_bf16 level (see the avx512_bf16 kernels): the blocking
// of forward_impl, on pair rows of the activations and with the values read in place.
void forward_pairs24(const bfloat16* x, int64_t M, const bfloat16* values, const uint8_t* positions,
                     const NMShape& shape, const bfloat16* bias, bfloat16* y, const ParallelFor& parallel_for) {
  using namespace avx512_bf16;
  const KernelSet<bfloat16>& kernels = avx512::kernels<bfloat16>;
  const int64_t out_features = shape.out_features;
  const int64_t groups = shape.in_features / 4;
  const int64_t kept = shape.kept_per_row();
  const int64_t pair_columns = kPairsPerGroup * groups;  // words per lane of one batch block
  const BatchBlocks blocks{M};
  AlignedArray<uint32_t> x_pairs(blocks.packed_size(pair_columns));
  const int64_t chunks = (groups + 15) / 16;
  const int64_t pack_grain = std::max<int64_t>(1, kMinPackElementsPerTask / (16 * 4 * std::max<int64_t>(M, 1)));
  parallel_for(0, chunks, pack_grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    pack_pairs_range(x, M, groups, chunk_begin, chunk_end, x_pairs.data());
  });
  const int64_t panel_groups = pair_panel_groups(blocks.vectors(0));
  const int64_t panels = (groups + panel_groups - 1) / panel_groups;  // of a whole weight row
  // Weight rows per row block and groups per span: each row block sweeps the pair rows of a batch
  // block span by span, so one span's pair rows (kPairSpanBytes, in L2) are read from L3 once per
  // kPairBlockRows weight rows rather than once per 32. Measured on one Zen 5 core, 4096 x 4096,
  // against 32-row blocks over whole rows: 24.3 -> 20.9 ms at M = 256, 98.8 -> 84.6 ms at
  // M = 1024, 6.2 -> 5.7 ms at M = 64 (128 rows and 64-512 KiB spans were in between).
  constexpr int64_t kPairBlockRows = 256;
  constexpr int64_t kPairSpanBytes = int64_t{256} << 10;
  // Up to 16 batch rows (one vector) the pair rows are small and the larger decoded block costs
  // more than it saves (M = 7 and 16: 2.4 -> 2.6-2.7 ms): the 32-row blocks of the float32 path.
  const int64_t block_rows_max = blocks.vectors(0) > 1 ? kPairBlockRows : unpack_block_rows(shape);
  const int64_t span_groups =
      std::max<int64_t>(1, kPairSpanBytes / (kPairsPerGroup * blocks.width(0) * static_cast<int64_t>(sizeof(uint32_t))) /
                               panel_groups) *
      panel_groups;
  const bool one_span = span_groups >= groups;
  const int64_t block_bytes = kMaxBlockRows * pair_columns * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t blocks_per_pass = std::max<int64_t>(1, kActivationPassBytes / std::max<int64_t>(block_bytes, 1));
  // Accumulators: with one span a batch block is finished before the next starts; with several,
  // every batch block of the pass stays open across the spans (at most 1 MiB: several spans mean
  // batch blocks of more than 512 KiB, so a 4 MiB pass holds fewer than 8).
  const int64_t acc_blocks = one_span ? 1 : blocks_per_pass;

  parallel_for(0, out_features, row_grain(shape, M), [&](int64_t row_begin, int64_t row_end) {
    const int64_t task_rows = std::min(block_rows_max, row_end - row_begin);
    AlignedArray<int32_t> pair_rows(task_rows * std::min(span_groups, groups));
    AlignedArray<float> acc(acc_blocks * task_rows * kMaxBlockRows);
    std::vector<float> bias_float(static_cast<size_t>(task_rows), 0.0f);
    std::vector<float> output_row(static_cast<size_t>(task_rows));
    for (int64_t pass_begin = 0; pass_begin < blocks.count(); pass_begin += blocks_per_pass) {
      const int64_t pass_end = std::min(blocks.count(), pass_begin + blocks_per_pass);
      for (int64_t block_begin = row_begin; block_begin < row_end; block_begin += block_rows_max) {
        const int64_t block_rows = std::min(block_rows_max, row_end - block_begin);
        if (bias != nullptr) kernels.to_float(bias + block_begin, bias_float.data(), block_rows);
        if (one_span) {
          decode_pair_rows(positions, shape.position_bytes(), 0, groups, block_begin, block_rows, panel_groups,
                           pair_rows.data());
        }
        for (int64_t open_begin = pass_begin; open_begin < pass_end; open_begin += acc_blocks) {
          const int64_t open_end = std::min(pass_end, open_begin + acc_blocks);
          std::fill(acc.data(), acc.data() + (open_end - open_begin) * task_rows * kMaxBlockRows, 0.0f);
          for (int64_t span_begin = 0; span_begin < groups; span_begin += span_groups) {
            const int64_t span_end = std::min(groups, span_begin + span_groups);
            if (!one_span) {
              decode_pair_rows(positions, shape.position_bytes(), span_begin, span_end, block_begin, block_rows,
                               panel_groups, pair_rows.data());
            }
            for (int64_t block = open_begin; block < open_end; ++block) {
              const ForwardPairsPanelFn panel_kernel = kForwardPairsPanel[blocks.vectors(block)];
              const uint32_t* activations = x_pairs.data() + blocks.offset(block, pair_columns);
              float* block_acc = acc.data() + (block - open_begin) * task_rows * kMaxBlockRows;
              for (int64_t first_group = span_begin; first_group < span_end; first_group += panel_groups) {
                if (block == pass_begin) {  // stream in the weights of the next row block
                  const int64_t next_begin = block_begin + block_rows;
                  const int64_t next_rows = std::max<int64_t>(0, std::min(block_rows_max, row_end - next_begin));
                  const int64_t p = first_group / panel_groups;
                  prefetch_part(values + next_begin * kept, next_rows * kept * static_cast<int64_t>(sizeof(bfloat16)),
                                p, panels);
                  prefetch_part(positions + next_begin * shape.position_bytes(), next_rows * shape.position_bytes(),
                                p, panels);
                }
                panel_kernel(values + block_begin * kept + 2 * first_group, kept,
                             pair_rows.data() + (first_group - span_begin) * block_rows,
                             std::min(panel_groups, span_end - first_group), block_rows, activations, block_acc);
              }
            }
          }
          for (int64_t block = open_begin; block < open_end; ++block) {
            store_output_rows(kernels, blocks, block, acc.data() + (block - open_begin) * task_rows * kMaxBlockRows,
                              bias_float.data(), block_begin, block_rows, out_features, output_row.data(), y);
          }
        }
      }
    }
  });
}
#endif

template <typename scalar_t>
void forward_impl(const scalar_t* x, int64_t M, const scalar_t* values, const uint8_t* positions, const NMShape& shape,
                  const scalar_t* bias, scalar_t* y, const ParallelFor& parallel_for) {
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  if (M <= 0 || out_features <= 0) return;
  const KernelSet<scalar_t>& kernels = kernels_for_this_cpu<scalar_t>();
  const std::vector<int32_t> group_base = make_group_base(shape);
  const int64_t kept = shape.kept_per_row();

#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    if (shape.n == 2 && shape.m == 4 && cpu_isa() == CpuIsa::avx512_bf16 && M >= kPairForwardMinRows) {
      forward_pairs24(x, M, values, positions, shape, bias, y, parallel_for);
      return;
    }
  }
#endif

  if (M < kSmallBatch) {
    // x as fp32 rows for the GEMV (a few KiB per row).
    std::vector<float> x_converted;
    const float* x_float = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x_float = x;
    } else {
      x_converted.resize(static_cast<size_t>(M * in_features));
      kernels.to_float(x, x_converted.data(), M * in_features);
      x_float = x_converted.data();
    }
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kept * M));
    parallel_for(0, out_features, grain, [&](int64_t row_begin, int64_t row_end) {
      kernels.forward_small_batch(x_float, M, values, positions, shape, group_base.data(), bias, y, row_begin, row_end);
    });
    return;
  }

  const BatchBlocks blocks{M};
  AlignedArray<float> x_packed(blocks.packed_size(in_features));
  pack_transposed(kernels, x, M, in_features, x_packed.data(), parallel_for);
  const int64_t panel = panel_columns(blocks.vectors(0));
  const int64_t block_rows_max = unpack_block_rows(shape);

  // Every row block streams the transposed activations of all the batch blocks it multiplies. For
  // a large batch they would not stay in the last-level cache between row blocks, so the batch
  // blocks go in groups of at most kActivationPassBytes, each group a sweep over the task's rows
  // (a row block is unpacked again per group: a few percent of the multiply-adds).
  const int64_t block_bytes = kMaxBlockRows * in_features * static_cast<int64_t>(sizeof(float));
  const int64_t blocks_per_pass = std::max<int64_t>(1, kActivationPassBytes / std::max<int64_t>(block_bytes, 1));

  parallel_for(0, out_features, row_grain(shape, M), [&](int64_t row_begin, int64_t row_end) {
    UnpackedRows<scalar_t> unpacked(shape, panel, block_rows_max, /*with_values=*/true);
    AlignedArray<float> acc(block_rows_max * kMaxBlockRows);
    std::vector<float> bias_float(static_cast<size_t>(block_rows_max), 0.0f);
    std::vector<float> output_row(static_cast<size_t>(block_rows_max));
    for (int64_t pass_begin = 0; pass_begin < blocks.count(); pass_begin += blocks_per_pass) {
      const int64_t pass_end = std::min(blocks.count(), pass_begin + blocks_per_pass);
      for (int64_t block_begin = row_begin; block_begin < row_end; block_begin += block_rows_max) {
        const int64_t block_rows = std::min(block_rows_max, row_end - block_begin);
        unpacked.unpack(kernels, values, positions, group_base.data(), block_begin, block_rows);
        if (bias != nullptr) kernels.to_float(bias + block_begin, bias_float.data(), block_rows);
        for (int64_t block = pass_begin; block < pass_end; ++block) {
          const int64_t width = blocks.width(block);
          const ForwardPanelFn panel_kernel = kernels.forward_panel[blocks.vectors(block)];
          const float* activations = x_packed.data() + blocks.offset(block, in_features);
          std::fill(acc.data(), acc.data() + block_rows * width, 0.0f);
          const int64_t panels = unpacked.panels();
          for (int64_t p = 0; p < panels; ++p) {
            if (block == pass_begin) {  // stream in the weights of the next row block
              const int64_t next_begin = block_begin + block_rows;
              const int64_t next_rows = std::max<int64_t>(0, std::min(block_rows_max, row_end - next_begin));
              prefetch_part(values + next_begin * kept, next_rows * kept * static_cast<int64_t>(sizeof(scalar_t)), p,
                            panels);
              prefetch_part(positions + next_begin * shape.position_bytes(), next_rows * shape.position_bytes(), p,
                            panels);
            }
            panel_kernel(unpacked.values(p), unpacked.columns(p), unpacked.count(p), block_rows, activations,
                         acc.data());
          }
          store_output_rows(kernels, blocks, block, acc.data(), bias_float.data(), block_begin, block_rows,
                            out_features, output_row.data(), y);
        }
      }
    }
  });
}

// True when every value of data[0, count) is finite (no NaN or Inf), judged on the exponent bits.
template <typename scalar_t>
bool all_finite(const scalar_t* data, int64_t count, const ParallelFor& parallel_for) {
  std::atomic<bool> finite{true};
  parallel_for(0, count, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
    bool chunk_finite = true;
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        uint32_t word;
        std::memcpy(&word, data + i, sizeof(word));
        chunk_finite &= (word & 0x7f800000u) != 0x7f800000u;
      } else if constexpr (std::is_same_v<scalar_t, bfloat16>) {
        chunk_finite &= (data[i].bits & 0x7f80u) != 0x7f80u;
      } else {
        chunk_finite &= (data[i].bits & 0x7c00u) != 0x7c00u;
      }
    }
    if (!chunk_finite) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// grad_out with every NaN / Inf replaced by +0 (the finite part of a split grad_out).
template <typename scalar_t>
std::vector<scalar_t> zero_non_finite(const scalar_t* data, int64_t count) {
  std::vector<scalar_t> finite(data, data + count);
  for (scalar_t& value : finite) {
    if (!std::isfinite(to_float(value))) value = from_float<scalar_t>(0.0f);
  }
  return finite;
}

// The terms left out of the tiles: for every non-finite grad_out[r][o] and every kept weight w of
// row o, grad_out[r][o] * w. Each such term is NaN or +-Inf, so their float32 sum T (NaN, +Inf or
// -Inf) alone decides a column's result, as in one float32 sum over all kept terms (the finite part
// cannot change the class of T, short of overflowing float32 itself); grad_input[r][column] = T
// then replaces the finite part. Each task owns whole batch rows and walks o in increasing order,
// so the result is deterministic.
template <typename scalar_t>
void add_non_finite_terms(const scalar_t* grad_out, int64_t M, const scalar_t* values, const uint8_t* positions,
                          const NMShape& shape, const int32_t* group_base, scalar_t* grad_input,
                          const ParallelFor& parallel_for) {
  const int64_t kept = shape.kept_per_row();
  const int bits = bits_per_position(shape.m);
  parallel_for(0, M, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<float> non_finite_sum(static_cast<size_t>(shape.in_features), 0.0f);
    std::vector<int64_t> touched;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* dy = grad_out + r * shape.out_features;
      touched.clear();
      for (int64_t o = 0; o < shape.out_features; ++o) {
        const float scale = to_float(dy[o]);
        if (std::isfinite(scale)) continue;
        const scalar_t* row_values = values + o * kept;
        const uint8_t* row_positions = positions + o * shape.position_bytes();
        for (int64_t j = 0; j < kept; ++j) {
          const int64_t column = group_base[j] + generic::position_at(row_positions, bits, j);
          non_finite_sum[column] += scale * to_float(row_values[j]);
          touched.push_back(column);
        }
      }
      scalar_t* dx = grad_input + r * shape.in_features;
      for (const int64_t column : touched) dx[column] = from_float<scalar_t>(non_finite_sum[column]);
      for (const int64_t column : touched) non_finite_sum[column] = 0.0f;
    }
  });
}

#if defined(__x86_64__)
// grad_input of the avx512_bf16 level (bfloat16, any n:m, even out_features): the blocking of
// grad_input_impl with pair tiles and grad_out read in place (see pair_rows_of_tile).
void grad_input_pairs(const bfloat16* grad_out, int64_t M, const bfloat16* values, const uint8_t* positions,
                      const NMShape& shape, bfloat16* grad_input, const ParallelFor& parallel_for) {
  using namespace avx512_bf16;
  const KernelSet<bfloat16>& kernels = avx512::kernels<bfloat16>;
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const std::vector<int32_t> group_base = make_group_base(shape);
  const int64_t batch_chunk = std::min(M, kDenseBatch);
  const int64_t span_max = std::max<int64_t>(kDensePanel, kDenseAccFloats / batch_chunk / kDensePanel * kDensePanel);
  const int64_t panel_count = (in_features + kDensePanel - 1) / kDensePanel;

  parallel_for(0, panel_count, 1, [&](int64_t panel_begin, int64_t panel_end) {
    const int64_t task_begin = panel_begin * kDensePanel;
    const int64_t task_end = std::min(in_features, panel_end * kDensePanel);
    const int64_t span_strips_max = (std::min(span_max, task_end - task_begin) + kStripColumns - 1) / kStripColumns;
    const int64_t row_stride = span_strips_max * kStripColumns + kRowPadding;
    // Weight rows per tile: a pair tile of kDenseTileFloats words holds twice the rows of a
    // float32 one. Even, so that every tile starts on a pair.
    const int64_t depth_max = std::clamp<int64_t>(2 * kDenseTileFloats / row_stride, 32, 512) / 2 * 2;
    AlignedArray<float> expanded(kDecodeRows * row_stride);
    AlignedArray<uint32_t> tile(depth_max / 2 * row_stride);
    AlignedArray<float> acc(batch_chunk * row_stride);

    for (int64_t span_begin = task_begin; span_begin < task_end; span_begin += span_max) {
      const int64_t span_end = std::min(task_end, span_begin + span_max);
      const int64_t span_width = (span_end - span_begin + kStripColumns - 1) / kStripColumns * kStripColumns;
      const KeptRange range = kept_range(shape, span_begin, span_end);
      for (int64_t batch_begin = 0; batch_begin < M; batch_begin += batch_chunk) {
        const int64_t batch_rows = std::min(batch_chunk, M - batch_begin);
        for (int64_t depth_begin = 0; depth_begin < out_features; depth_begin += depth_max) {
          const int64_t depth = std::min(depth_max, out_features - depth_begin);
          for (int64_t chunk_begin = 0; chunk_begin < depth; chunk_begin += kDecodeRows) {
            const int64_t chunk_rows = std::min(kDecodeRows, depth - chunk_begin);
            const int64_t first_row = depth_begin + chunk_begin;
            const int64_t next_row = first_row + kDecodeRows;
            prefetch_segments(values, positions, shape, next_row,
                              std::max<int64_t>(0, std::min(kDecodeRows, out_features - next_row)), range);
            uint32_t* tile_rows = tile.data() + chunk_begin / 2 * row_stride;
            if (!expand_pairs_by_mask(values, positions, shape, first_row, chunk_rows, span_begin, span_width,
                                      tile_rows, row_stride)) {
              kernels.expand_rows(values, positions, shape, group_base.data(), first_row, chunk_rows, range.first,
                                  range.count, span_begin, span_width, expanded.data(), row_stride);
              pair_rows_of_tile(expanded.data(), row_stride, chunk_rows, span_width, tile_rows, row_stride);
            }
          }
          dpbf16_tile(avx512_simd::Dpbf16Tile{batch_rows, depth / 2, span_width,
                                              grad_out + batch_begin * out_features + depth_begin, out_features, 2,
                                              tile.data(), row_stride, acc.data(), row_stride, depth_begin > 0});
        }
        for (int64_t r = 0; r < batch_rows; ++r) {
          float* acc_row = acc.data() + r * row_stride;
          if (out_features == 0) std::fill_n(acc_row, span_end - span_begin, 0.0f);  // an empty sum
          kernels.from_float(acc_row, grad_input + (batch_begin + r) * in_features + span_begin, span_end - span_begin);
        }
      }
    }
  });
}
#endif

#if defined(__x86_64__)
// grad_input for M <= kSmallGradInputBatch at the AVX-512 levels, for the patterns with
// kept-column masks (avx512::grad_input_small_batch): each task owns chunks of
// kSmallGradInputColumns input columns, whose dx rows (fp32, in L1) it accumulates over every
// weight row, block after block. No tile is written: at M = 1 the tile's stores and reloads cost
// as much as the expansion itself.
template <typename scalar_t>
bool grad_input_small_batch(const scalar_t* grad_out, int64_t M, const scalar_t* values, const uint8_t* positions,
                            const NMShape& shape, scalar_t* grad_input, const ParallelFor& parallel_for) {
  if (!avx512::has_kept_mask(shape.n, shape.m)) return false;
  const KernelSet<scalar_t>& kernels = avx512::kernels<scalar_t>;
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const std::vector<float> grad_by_row = transposed_to_float(grad_out, M, out_features);
  const int64_t chunks = (in_features + kSmallGradInputColumns - 1) / kSmallGradInputColumns;
  const int64_t acc_stride = kSmallGradInputColumns + kRowPadding;
  parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    AlignedArray<float> acc(M * acc_stride);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t column = chunk * kSmallGradInputColumns;
      const int64_t width = std::min(kSmallGradInputColumns, in_features - column);
      const int64_t columns = (width + 63) / 64 * 64;
      const KeptRange range = kept_range(shape, column, column + width);
      std::fill(acc.data(), acc.data() + M * acc_stride, 0.0f);
      for (int64_t block = 0; block < out_features; block += kSmallGradInputBlockRows) {
        const int64_t rows = std::min(kSmallGradInputBlockRows, out_features - block);
        const int64_t next = block + rows;
        prefetch_segments(values, positions, shape, next,
                          std::max<int64_t>(0, std::min(kSmallGradInputBlockRows, out_features - next)), range);
        avx512::grad_input_small_batch(values, positions, shape, grad_by_row.data(), M, block, rows, column, columns,
                                       acc.data(), acc_stride);
      }
      for (int64_t r = 0; r < M; ++r) {
        kernels.from_float(acc.data() + r * acc_stride, grad_input + r * in_features + column, width);
      }
    }
  });
  return true;
}
#endif

template <typename scalar_t>
void grad_input_impl(const scalar_t* grad_out, int64_t M, const scalar_t* values, const uint8_t* positions,
                     const NMShape& shape, scalar_t* grad_input, const ParallelFor& parallel_for) {
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  if (M <= 0 || in_features <= 0) return;
  const KernelSet<scalar_t>& kernels = kernels_for_this_cpu<scalar_t>();
  const std::vector<int32_t> group_base = make_group_base(shape);
  if (!all_finite(grad_out, M * out_features, parallel_for)) {
    const std::vector<scalar_t> finite_part = zero_non_finite(grad_out, M * out_features);
    grad_input_impl(finite_part.data(), M, values, positions, shape, grad_input, parallel_for);
    add_non_finite_terms(grad_out, M, values, positions, shape, group_base.data(), grad_input, parallel_for);
    return;
  }

#if defined(__x86_64__)
  const bool pair_tiles24 = std::is_same_v<scalar_t, bfloat16> && cpu_isa() == CpuIsa::avx512_bf16 &&
                            shape.n == 2 && shape.m == 4 && out_features % 2 == 0;
  if (M <= kSmallGradInputBatch && cpu_isa() >= CpuIsa::avx512 && !pair_tiles24 &&
      grad_input_small_batch(grad_out, M, values, positions, shape, grad_input, parallel_for)) {
    return;
  }
  if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    // Odd out_features would leave the last pair of a grad_out row half outside it.
    if (cpu_isa() == CpuIsa::avx512_bf16 && out_features % 2 == 0) {
      grad_input_pairs(grad_out, M, values, positions, shape, grad_input, parallel_for);
      return;
    }
  }
#endif
  const int64_t strips_of_rows = (M + kStripRows - 1) / kStripRows;
  AlignedArray<float> grad_packed(strips_of_rows * out_features * kStripRows);
  pack_row_strips(kernels, grad_out, M, out_features, grad_packed.data(), parallel_for);
  const int64_t batch_chunk = std::min(M, kDenseBatch);
  // A task's columns are processed in spans as wide as the fp32 accumulators [batch_chunk x span]
  // allow: each weight row is then read in one long segment per span (sequential reads, few TLB
  // misses), and for small batches a task reads each of its weight rows once.
  const int64_t span_max = std::max<int64_t>(kDensePanel, kDenseAccFloats / batch_chunk / kDensePanel * kDensePanel);
  const int64_t panel_count = (in_features + kDensePanel - 1) / kDensePanel;

  parallel_for(0, panel_count, 1, [&](int64_t panel_begin, int64_t panel_end) {
    const int64_t task_begin = panel_begin * kDensePanel;
    const int64_t task_end = std::min(in_features, panel_end * kDensePanel);
    const int64_t span_strips_max = (std::min(span_max, task_end - task_begin) + kStripColumns - 1) / kStripColumns;
    const int64_t row_stride = span_strips_max * kStripColumns + kRowPadding;  // of tile and accumulators
    // Depth (weight rows per tile) so the tile stays about kDenseTileFloats.
    const int64_t depth_max = std::clamp<int64_t>(kDenseTileFloats / row_stride, 16, 256);
    AlignedArray<float> tile(depth_max * row_stride);
    AlignedArray<float> acc(batch_chunk * row_stride);

    for (int64_t span_begin = task_begin; span_begin < task_end; span_begin += span_max) {
      const int64_t span_end = std::min(task_end, span_begin + span_max);
      const int64_t span_strips = (span_end - span_begin + kStripColumns - 1) / kStripColumns;
      const KeptRange range = kept_range(shape, span_begin, span_end);
      for (int64_t batch_begin = 0; batch_begin < M; batch_begin += batch_chunk) {
        const int64_t batch_rows = std::min(batch_chunk, M - batch_begin);
        for (int64_t depth_begin = 0; depth_begin < out_features; depth_begin += depth_max) {
          const int64_t depth = std::min(depth_max, out_features - depth_begin);
          // The dense rows [depth_begin, depth_begin + depth) of the span, zero-padded to whole strips.
          for (int64_t chunk_begin = 0; chunk_begin < depth; chunk_begin += kDecodeRows) {
            const int64_t chunk_rows = std::min(kDecodeRows, depth - chunk_begin);
            const int64_t first_row = depth_begin + chunk_begin;
            const int64_t next_row = first_row + kDecodeRows;
            prefetch_segments(values, positions, shape, next_row,
                              std::max<int64_t>(0, std::min(kDecodeRows, out_features - next_row)), range);
            kernels.expand_rows(values, positions, shape, group_base.data(), first_row, chunk_rows, range.first,
                                range.count, span_begin, span_strips * kStripColumns,
                                tile.data() + chunk_begin * row_stride, row_stride);
          }
          for (int64_t strip_row = 0; strip_row < batch_rows; strip_row += kStripRows) {
            const int64_t row_strip = (batch_begin + strip_row) / kStripRows;
            kernels.dense_strip(grad_packed.data() + (row_strip * out_features + depth_begin) * kStripRows,
                                std::min(kStripRows, batch_rows - strip_row), depth, tile.data(), row_stride,
                                span_strips, acc.data() + strip_row * row_stride, row_stride, depth_begin > 0);
          }
        }
        for (int64_t r = 0; r < batch_rows; ++r) {
          float* acc_row = acc.data() + r * row_stride;
          if (out_features == 0) std::fill_n(acc_row, span_end - span_begin, 0.0f);  // an empty sum
          kernels.from_float(acc_row, grad_input + (batch_begin + r) * in_features + span_begin, span_end - span_begin);
        }
      }
    }
  });
}

// The row-parallel loop of grad_values, on transposed copies of x and grad_out in either layout:
// float32 batch lanes or batch-row pairs (BatchBlocks::rows_per_lane 1 or 2), with the panel
// kernel of that layout for each block width. Rows go in blocks whose columns are unpacked once, panel-major;
// batch blocks are summed in order (the first stores, later ones add).
template <typename scalar_t, typename word_t, typename PanelFn>
void grad_values_rows(const KernelSet<scalar_t>& kernels, const uint8_t* positions, const NMShape& shape,
                      const int32_t* group_base, const BatchBlocks& blocks, const word_t* x_packed,
                      const word_t* grad_packed, int64_t panel, const PanelFn* panel_kernels, scalar_t* grad_values,
                      const ParallelFor& parallel_for) {
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const int64_t kept = shape.kept_per_row();
  const int64_t block_rows_max = unpack_block_rows(shape);
  parallel_for(0, out_features, row_grain(shape, blocks.batch), [&](int64_t row_begin, int64_t row_end) {
    UnpackedRows<scalar_t> unpacked(shape, panel, block_rows_max, /*with_values=*/false);
    AlignedArray<float> partial(block_rows_max * kept);  // panel-major, like the unpacked columns
    std::vector<float> output_row(static_cast<size_t>(kept));
    for (int64_t block_begin = row_begin; block_begin < row_end; block_begin += block_rows_max) {
      const int64_t block_rows = std::min(block_rows_max, row_end - block_begin);
      unpacked.unpack(kernels, nullptr, positions, group_base, block_begin, block_rows);
      for (int64_t block = 0; block < blocks.count(); ++block) {
        const PanelFn panel_kernel = panel_kernels[blocks.vectors(block)];
        const word_t* grad_block = grad_packed + blocks.offset(block, out_features) + block_begin * blocks.width(block);
        const word_t* activations = x_packed + blocks.offset(block, in_features);
        const int64_t panels = unpacked.panels();
        for (int64_t p = 0; p < panels; ++p) {
          if (block == 0) {  // stream in the positions of the next row block
            const int64_t next_begin = block_begin + block_rows;
            const int64_t next_rows = std::max<int64_t>(0, std::min(block_rows_max, row_end - next_begin));
            prefetch_part(positions + next_begin * shape.position_bytes(), next_rows * shape.position_bytes(), p, panels);
          }
          panel_kernel(grad_block, unpacked.columns(p), unpacked.count(p), block_rows, activations,
                       partial.data() + unpacked.offset(p), block > 0);
        }
      }
      for (int64_t r = 0; r < block_rows; ++r) {
        for (int64_t p = 0, first = 0; p < unpacked.panels(); first += unpacked.count(p), ++p) {
          std::memcpy(output_row.data() + first, partial.data() + unpacked.offset(p) + r * unpacked.count(p),
                      sizeof(float) * unpacked.count(p));
        }
        kernels.from_float(output_row.data(), grad_values + (block_begin + r) * kept, kept);
      }
    }
  });
}

#if defined(__x86_64__)
// grad_values of the avx512_bf16 level (any n:m, bfloat16): grad_values_impl on batch-pair copies
// of x and grad_out (see the avx512_bf16 kernels).
void grad_values_pairs(const bfloat16* grad_out, const bfloat16* x, int64_t M, const uint8_t* positions,
                       const NMShape& shape, bfloat16* grad_values, const ParallelFor& parallel_for) {
  using namespace avx512_bf16;
  const KernelSet<bfloat16>& kernels = avx512::kernels<bfloat16>;
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const std::vector<int32_t> group_base = make_group_base(shape);
  const BatchBlocks blocks{M, kPairRowsPerLane};
  AlignedArray<uint32_t> x_packed(blocks.packed_size(in_features));
  AlignedArray<uint32_t> grad_packed(blocks.packed_size(out_features));
  const auto pack = [&](const bfloat16* source, int64_t columns, uint32_t* packed) {
    const int64_t grain = std::max<int64_t>(64, kMinPackElementsPerTask / M);
    parallel_for(0, columns, grain, [&](int64_t column_begin, int64_t column_end) {
      pack_batch_pairs_range(source, M, columns, column_begin, column_end, packed);
    });
  };
  pack(x, in_features, x_packed.data());
  pack(grad_out, out_features, grad_packed.data());
  const int64_t panel = panel_columns(blocks.vectors(0));  // 32 KiB of pair words per panel
  grad_values_rows(kernels, positions, shape, group_base.data(), blocks, x_packed.data(), grad_packed.data(), panel,
                   kGradValuesPairsPanel, grad_values, parallel_for);
}
#endif

#if defined(__x86_64__)
// grad_values for small batches at the avx2 and AVX-512 levels (avx2:: / avx512::
// grad_values_small_batch, and for bfloat16 at the avx512_bf16 level from two batch rows on its
// batch-pair twin; the thresholds are with kSmallGradBatch). x is copied panel by panel, as fp32
// rows or as rows of batch-pair words, with a padded stride (consecutive rows of x in one panel
// would otherwise sit 4 KiB multiples apart and share L1 sets); dy is transposed to [out x M]
// (fp32, or pair words). Both are a few KiB per batch row. Each task then sweeps its weight rows
// in blocks, one panel of input columns at a time, the panel's rows of x (about kTileFloats
// words) staying in L1.
template <typename scalar_t>
void grad_values_small_batch(const scalar_t* grad_out, const scalar_t* x, int64_t M, const uint8_t* positions,
                             const NMShape& shape, scalar_t* grad_values, const ParallelFor& parallel_for) {
  const KernelSet<scalar_t>& kernels = kernels_for_this_cpu<scalar_t>();
  using PanelFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, const uint8_t*, const NMShape&,
                           const int32_t*, int64_t, int64_t, int64_t, int64_t, scalar_t*);
  const PanelFn panel_kernel =
      cpu_isa() >= CpuIsa::avx512 ? &avx512::grad_values_small_batch<scalar_t> : &avx2::grad_values_small_batch<scalar_t>;
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const std::vector<int32_t> group_base = make_group_base(shape);
  bool use_pairs = false;
  if constexpr (std::is_same_v<scalar_t, bfloat16>) use_pairs = M >= 2 && cpu_isa() == CpuIsa::avx512_bf16;
  const int64_t lines = use_pairs ? (M + 1) / 2 : M;  // rows of words per panel
  // Multiples of 64 columns keep every panel on whole window chunks (its first kept value a
  // multiple of 16) for every n:m.
  const int64_t panel = std::max<int64_t>(64, kTileFloats / lines / 64 * 64);
  const int64_t x_stride = panel + kRowPadding;
  const int64_t panels = (in_features + panel - 1) / panel;
  AlignedArray<float> x_panels(panels * lines * x_stride);
  std::vector<float> grad_by_row(static_cast<size_t>(out_features * lines));
  if (use_pairs) {
    if constexpr (std::is_same_v<scalar_t, bfloat16>) {
      uint32_t* words = reinterpret_cast<uint32_t*>(x_panels.data());
      const auto pair_word = [&](const bfloat16* rows, int64_t stride, int64_t q, int64_t i) {
        const uint32_t odd = 2 * q + 1 < M ? rows[(2 * q + 1) * stride + i].bits : 0;
        return static_cast<uint32_t>(rows[2 * q * stride + i].bits) | odd << 16;
      };
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t origin = p * panel;
        for (int64_t q = 0; q < lines; ++q) {
          for (int64_t c = origin; c < std::min(in_features, origin + panel); ++c) {
            words[(p * lines + q) * x_stride + c - origin] = pair_word(x, in_features, q, c);
          }
        }
      }
      uint32_t* grad_words = reinterpret_cast<uint32_t*>(grad_by_row.data());
      for (int64_t o = 0; o < out_features; ++o) {
        for (int64_t q = 0; q < lines; ++q) grad_words[o * lines + q] = pair_word(grad_out, out_features, q, o);
      }
    }
  } else {
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t origin = p * panel;
      for (int64_t r = 0; r < M; ++r) {
        kernels.to_float(x + r * in_features + origin, x_panels.data() + (p * M + r) * x_stride,
                         std::min(panel, in_features - origin));
      }
    }
    grad_by_row = transposed_to_float(grad_out, M, out_features);
  }
  parallel_for(0, out_features, row_grain(shape, M), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t block_begin = row_begin; block_begin < row_end; block_begin += kSmallGradBlockRows) {
      const int64_t block_rows = std::min(kSmallGradBlockRows, row_end - block_begin);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t origin = p * panel;
        const KeptRange range = kept_range(shape, origin, std::min(in_features, origin + panel));
        const float* x_panel = x_panels.data() + p * lines * x_stride;
        if constexpr (std::is_same_v<scalar_t, bfloat16>) {
          if (use_pairs) {
            avx512_bf16::grad_values_small_batch_pairs(
                reinterpret_cast<const uint32_t*>(x_panel), x_stride, origin, lines,
                reinterpret_cast<const uint32_t*>(grad_by_row.data()), positions, shape, group_base.data(), block_begin,
                block_rows, range.first, range.count, grad_values);
            continue;
          }
        }
        panel_kernel(x_panel, x_stride, origin, M, grad_by_row.data(), positions, shape, group_base.data(),
                     block_begin, block_rows, range.first, range.count, grad_values);
      }
    }
  });
}
#endif

template <typename scalar_t>
void grad_values_impl(const scalar_t* grad_out, const scalar_t* x, int64_t M, const uint8_t* positions,
                      const NMShape& shape, scalar_t* grad_values, const ParallelFor& parallel_for) {
  const int64_t out_features = shape.out_features;
  const int64_t in_features = shape.in_features;
  const int64_t kept = shape.kept_per_row();
  if (out_features <= 0 || kept <= 0) return;
  if (M <= 0) {  // an empty sum: all-zero gradient (zero bits are +0 in every storage type)
    std::memset(static_cast<void*>(grad_values), 0, sizeof(scalar_t) * static_cast<size_t>(out_features * kept));
    return;
  }
#if defined(__x86_64__)
  const bool pairs = std::is_same_v<scalar_t, bfloat16> && cpu_isa() == CpuIsa::avx512_bf16;
  const bool window16 = chunk_window_columns(shape, avx2_simd::kLanes) == 16;  // the avx2 kernels' fetch
  const int64_t small_batch = pairs                         ? kSmallGradPairBatch
                              : cpu_isa() >= CpuIsa::avx512 ? kSmallGradBatch
                              : cpu_isa() == CpuIsa::avx2   ? (window16 ? kSmallGradBatchAvx2Window
                                                                        : kSmallGradBatchAvx2Gather)
                                                            : 0;
  if (M <= small_batch) {
    grad_values_small_batch(grad_out, x, M, positions, shape, grad_values, parallel_for);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    if (cpu_isa() == CpuIsa::avx512_bf16) {
      grad_values_pairs(grad_out, x, M, positions, shape, grad_values, parallel_for);
      return;
    }
  }
#endif
  const KernelSet<scalar_t>& kernels = kernels_for_this_cpu<scalar_t>();
  const std::vector<int32_t> group_base = make_group_base(shape);

  const BatchBlocks blocks{M};
  AlignedArray<float> x_packed(blocks.packed_size(in_features));
  AlignedArray<float> grad_packed(blocks.packed_size(out_features));
  pack_transposed(kernels, x, M, in_features, x_packed.data(), parallel_for);
  pack_transposed(kernels, grad_out, M, out_features, grad_packed.data(), parallel_for);
  grad_values_rows(kernels, positions, shape, group_base.data(), blocks, x_packed.data(), grad_packed.data(),
                   panel_columns(blocks.vectors(0)), kernels.grad_values_panel, grad_values, parallel_for);
}

}  // namespace

template <typename scalar_t>
void nm_linear_forward(const scalar_t* x, int64_t M, const scalar_t* values, const uint8_t* positions,
                       const NMShape& shape, const scalar_t* bias, scalar_t* y, const ParallelFor& parallel_for) {
  forward_impl(x, M, values, positions, shape, bias, y, parallel_for);
}

template <typename scalar_t>
void nm_linear_grad_input(const scalar_t* grad_out, int64_t M, const scalar_t* values, const uint8_t* positions,
                          const NMShape& shape, scalar_t* grad_input, const ParallelFor& parallel_for) {
  grad_input_impl(grad_out, M, values, positions, shape, grad_input, parallel_for);
}

template <typename scalar_t>
void nm_linear_grad_values(const scalar_t* grad_out, const scalar_t* x, int64_t M, const uint8_t* positions,
                           const NMShape& shape, scalar_t* grad_values, const ParallelFor& parallel_for) {
  grad_values_impl(grad_out, x, M, positions, shape, grad_values, parallel_for);
}

#define SPARSEKERNELS_INSTANTIATE_NM(scalar_t)                                                                    \
  template void nm_linear_forward<scalar_t>(const scalar_t*, int64_t, const scalar_t*, const uint8_t*,           \
                                            const NMShape&, const scalar_t*, scalar_t*, const ParallelFor&);     \
  template void nm_linear_grad_input<scalar_t>(const scalar_t*, int64_t, const scalar_t*, const uint8_t*,        \
                                               const NMShape&, scalar_t*, const ParallelFor&);                   \
  template void nm_linear_grad_values<scalar_t>(const scalar_t*, const scalar_t*, int64_t, const uint8_t*,       \
                                                const NMShape&, scalar_t*, const ParallelFor&);

SPARSEKERNELS_INSTANTIATE_NM(float)
SPARSEKERNELS_INSTANTIATE_NM(bfloat16)
SPARSEKERNELS_INSTANTIATE_NM(float16)

#undef SPARSEKERNELS_INSTANTIATE_NM

}  // namespace sparsekernels::cpu
