// Block-sparse (BSR) linear kernels for CPU: the implementation behind csrc/cpu/bsr.h.
//
// All three kernels are sums of small dense products over the kept blocks, accumulated in float32:
//   forward      y[:, strip r]  += x[:, strip c] @ block(r, c)^T     for every kept (r, c)
//   grad_input   dx[:, strip c] += dy[:, strip r] @ block(r, c)
//   grad_values  block gradient  = dy[:, strip r]^T @ x[:, strip c]
// (strip i = the block_size columns [i * b, (i + 1) * b)). Forward and grad_input share one
// driver: a "line" is one block_size-wide strip of output columns, i.e. a block row (forward,
// walked through the BSR index) or a block column (grad_input, walked through the CSC index), and
// its entries are the kept blocks on it. One task computes one line for one chunk of rows of M,
// so every output element is written by exactly one task and the results do not depend on how
// the work is split: all kernels are deterministic.
//
// Instruction sets, chosen once per process (isa.h):
//   generic  portable C++ written so that the compiler can vectorise it; runs anywhere.
//   avx2     the avx512 kernels on ymm registers (AVX2 + FMA): a 6 rows x 16 columns micro-kernel,
//            the small-M GEMV, packing and the rounding stores.
//   avx512       AVX-512 float32 micro-kernels; bfloat16 / float16 storage is widened on load.
//   avx512_bf16  avx512, plus VDPBF16PS kernels for bfloat16 (all but the forward below 7 rows).
//   amx          avx512, plus AMX-BF16 tile kernels for bfloat16 when M >= kSmallBatchRows.
// The library is compiled for the baseline ISA; the x86 kernels carry target attributes and are
// only reached after asking the CPU (and, for AMX, the Linux kernel) whether they may run.
// SPARSEKERNELS_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps the choice, which is how the tests
// reach every path.
//
// Why AMX CPUs do not use VDPBF16PS: on the Sapphire Rapids machine the amx kernels were tuned on
// it was measured at a quarter of the float32 FMA issue rate while doing only twice the work per
// instruction, i.e. slower than widening to float32, and an AMX TDPBF16PS does 16x16x32 products
// at several times the float32 FMA rate (dense bfloat16 linear, oneDNN, uses it too). On AMD Zen 4
// and later, which have AVX512-BF16 but no AMX, VDPBF16PS issues like a float32 FMA and does twice
// its multiply-adds, hence the avx512_bf16 level: on a Zen 5 the bfloat16 forward of a 4096 x 4096
// weight at block 64, density 0.5, M = 256 ran at 177 GMAC/s per core, the float32 one at 98
// (bench/results/cpu-amd-epyc-2core-avx512_bf16-2026-12-07.json).
//
// Float32 path, per (line, row chunk) task:
//   M >= kSmallBatchRows: each kept block is packed as the right-hand operand B[depth][n] (forward:
//     transposed, grad_input: as stored) into an L1-resident buffer, and a register-blocked
//     broadcast-FMA micro-kernel (6 rows x 64 columns = 24 zmm accumulators) adds A @ B into a
//     float32 accumulator [chunk rows][b]; bias, rounding and the store happen once at the end.
//   M < kSmallBatchRows (forward only): the product is bound by reading the weights, so each
//     block is read once, in storage order, as dot products along its rows (no packing).
// grad_values packs a dy tile and an x tile per kept block and per slice of M and runs the same
// micro-kernel with the roles [n][m] x [m][k]; each block is reduced over all of M by one task.
// The AMX and AVX512-BF16 kernels follow the same task structure; see their sections.

#include "bsr.h"
#include "isa.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSEKERNELS_X86_KERNELS 1
// GCC 12's AVX-512 intrinsics build their unused operands with a self-initialised
// _mm512_undefined_*(); inlined into target-attribute functions of a baseline build this trips
// false (maybe-)uninitialized warnings attributed to the header, so they are silenced there only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include "avx2.h"
#include "avx512.h"
#else
#define SPARSEKERNELS_X86_KERNELS 0
#endif

#define SPARSEKERNELS_UNROLL _Pragma("GCC unroll 16")

namespace sparsekernels::cpu {
namespace {

constexpr int64_t ceil_div(int64_t value, int64_t divisor) { return (value + divisor - 1) / divisor; }
constexpr int64_t round_up(int64_t value, int64_t multiple) { return ceil_div(value, multiple) * multiple; }

// Below this many rows the forward pass is a weight-streaming matrix-vector product, computed as
// dot products along the stored block rows. Measured crossover with the packed float32 and AMX
// paths: 10 to 13 rows depending on dtype.
constexpr int64_t kSmallBatchRows = 12;
// The same crossover for the bfloat16 VDPBF16PS forward (avx512_bf16 level), measured on a Zen 5
// for block sizes 16 to 128 at density 0.5: even at M = 6, 1.1-2x faster from M = 8.
constexpr int64_t kDpbf16ForwardRows = 7;
// Smallest amount of multiply-add work (in scalar FMAs) worth handing to a parallel chunk.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;
// Parallel grain, in items of work_per_item FMAs each, that gives every chunk kMinParallelWork.
constexpr int64_t parallel_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / work_per_item);
}
// Rows of M reduced per step in grad_values: the packed dy and x slices, 64 x b floats each,
// stay in L1 next to the [b][b] accumulator for b <= 64.
constexpr int64_t kGradValuesRowStep = 64;
// grad_values at the avx512_bf16 level packs dy and x as row pairs once for all kept blocks of
// size up to kPrepackedMaxBlock when the two copies take at most kPrepackedPairBytes (M = 2048 at
// 4096 x 4096).
constexpr int64_t kPrepackedPairBytes = int64_t{64} << 20;
constexpr int64_t kPrepackedMaxBlock = 32;

// ----------------------------------------------------------------------------------------------
// Instruction set selection (x86 only: elsewhere the portable kernels are all there is).

#if SPARSEKERNELS_X86_KERNELS
// The x86 kernels work on whole 16-float panels; other block sizes take the portable path.
CpuIsa isa_for_block_size(int64_t block_size) {
  return block_size % 16 == 0 ? cpu_isa() : CpuIsa::generic;
}
#endif

// ----------------------------------------------------------------------------------------------
// Scratch memory and work partitioning.

// Grow-only, 64-byte-aligned buffer. Each parallel body creates its own, so concurrently running
// bodies share nothing but (disjoint) output regions.
template <typename T>
class Scratch {
 public:
  T* get(int64_t count) {
    constexpr size_t kAlignment = 64;
    const size_t needed = static_cast<size_t>(count) + kAlignment / sizeof(T);
    if (storage_.size() < needed) storage_.resize(needed);
    const size_t misalignment = reinterpret_cast<uintptr_t>(storage_.data()) % kAlignment;
    return storage_.data() + (misalignment == 0 ? 0 : (kAlignment - misalignment) / sizeof(T));
  }

 private:
  std::vector<T> storage_;
};

// Tasks are (row chunk, line) pairs. A line's cost grows with its kept blocks, and the hook may
// cut the parallel range anywhere (at::parallel_for gives each thread one contiguous piece), so
// the range is measured in work units rather than tasks: within a chunk, line l owns the units
// [offsets[l] + l, offsets[l + 1] + l + 1), one per kept block plus one for its store, and a
// task runs in the body whose piece holds its first unit. Any split is then balanced to within
// one task, and every task runs exactly once however the range is cut.
template <typename index_t>
class LineSchedule {
 public:
  LineSchedule(const index_t* offsets, int64_t n_lines, int64_t n_chunks)
      : offsets_(offsets), n_lines_(n_lines), n_chunks_(n_chunks),
        units_per_chunk_(static_cast<int64_t>(offsets[n_lines]) + n_lines) {}

  int64_t total_units() const { return n_chunks_ * units_per_chunk_; }

  template <typename Task>
  void for_each_task(int64_t begin, int64_t end, const Task& task) const {
    if (begin >= end || n_lines_ == 0) return;
    int64_t chunk = begin / units_per_chunk_;
    const int64_t unit_in_chunk = begin - chunk * units_per_chunk_;
    // First line whose first unit is at or after `begin` (first_unit is strictly increasing).
    int64_t low = 0, high = n_lines_;
    while (low < high) {
      const int64_t middle = (low + high) / 2;
      if (first_unit(middle) < unit_in_chunk) {
        low = middle + 1;
      } else {
        high = middle;
      }
    }
    for (int64_t line = low;; ++line) {
      if (line == n_lines_) {
        line = 0;
        ++chunk;
      }
      if (chunk >= n_chunks_ || chunk * units_per_chunk_ + first_unit(line) >= end) return;
      task(chunk, line);
    }
  }

 private:
  int64_t first_unit(int64_t line) const { return static_cast<int64_t>(offsets_[line]) + line; }

  const index_t* offsets_;
  int64_t n_lines_;
  int64_t n_chunks_;
  int64_t units_per_chunk_;
};

// Splits M into chunks of `granule`-multiple rows: few enough that each chunk amortises packing
// its blocks, and many enough (with the lines) for the parallel split to balance.
int64_t choose_row_chunk(int64_t M, int64_t n_lines, int64_t granule, int64_t min_rows, int64_t max_rows) {
  constexpr int64_t kWantedTasks = 16;
  const int64_t wanted_chunks = ceil_div(kWantedTasks, std::max<int64_t>(n_lines, 1));
  const int64_t rows = std::clamp(ceil_div(M, wanted_chunks), min_rows, max_rows);
  return round_up(std::min(rows, M), granule);
}

// Block row of kept block `block` (BSR order): the last row whose first block is at or before it.
template <typename index_t>
int64_t block_row_of(const BsrIndex<index_t>& index, int64_t block) {
  const index_t* row_offsets = index.block_row_offsets;
  return std::upper_bound(row_offsets, row_offsets + index.n_block_rows + 1, block) - row_offsets - 1;
}

// ----------------------------------------------------------------------------------------------
// Problem descriptions shared by the drivers.

// One line product: out[:, line strip] = sum over the line's entries e of
//   A[:, a_blocks[e] strip] @ B_e,  B_e = block^T (forward) or block (grad_input).
template <typename scalar_t, typename index_t>
struct LineProduct {
  const scalar_t* a;           // activations (forward) or output gradient (grad_input), [M][lda]
  int64_t lda;
  const scalar_t* values;      // [nnz][b][b]
  const index_t* offsets;      // [n_lines + 1], entries of line l are [offsets[l], offsets[l + 1])
  const index_t* a_blocks;     // [nnz], strip of A multiplied by each entry
  const index_t* value_index;  // [nnz], block of each entry; null when entry e is values[e]
  int64_t n_lines;
  int64_t block_size;
  bool transpose_blocks;       // forward: the stored block is [out][in], the product needs [in][out]
  const scalar_t* bias;        // [n_lines * b] or null
  scalar_t* out;               // [M][ldo]
  int64_t ldo;

  const scalar_t* block(int64_t entry) const {
    const int64_t stored = value_index != nullptr ? static_cast<int64_t>(value_index[entry]) : entry;
    return values + stored * block_size * block_size;
  }

  // What the task (line, rows [m_begin, m_end)) works on. The drivers unpack it by position:
  //   const auto [rows, first, count, out, bias] = product.task(line, m_begin, m_end);
  struct Task {
    int64_t rows;          // m_end - m_begin
    int64_t first;         // the line's entries are [first, first + count)
    int64_t count;
    scalar_t* out;         // the line's output strip at row m_begin, row stride ldo
    const scalar_t* bias;  // the bias of the line's outputs, or null
  };
  Task task(int64_t line, int64_t m_begin, int64_t m_end) const {
    const int64_t first = offsets[line];
    return Task{m_end - m_begin, first, static_cast<int64_t>(offsets[line + 1]) - first,
                out + m_begin * ldo + line * block_size, bias != nullptr ? bias + line * block_size : nullptr};
  }
};

// The parallel loops of the drivers, shared by every instruction set; a driver picks the chunk
// size, the grain and the task. Each parallel body owns one Workspace.
//
// task(line, m_begin, m_end, workspace) for every line and every chunk of m_chunk rows of M, in
// LineSchedule's balanced order.
template <class Workspace, typename scalar_t, typename index_t, class Task>
void for_each_line_task(const LineProduct<scalar_t, index_t>& product, int64_t M, int64_t m_chunk, int64_t grain,
                        const ParallelFor& parallel_for, const Task& task) {
  const LineSchedule<index_t> schedule(product.offsets, product.n_lines, ceil_div(M, m_chunk));
  parallel_for(0, schedule.total_units(), grain, [&](int64_t begin, int64_t end) {
    Workspace workspace;
    schedule.for_each_task(begin, end, [&](int64_t chunk, int64_t line) {
      const int64_t m_begin = chunk * m_chunk;
      task(line, m_begin, std::min(M, m_begin + m_chunk), workspace);
    });
  });
}

// task(block, block_row, workspace) for every kept block, each reduced over all of M by one call.
template <class Workspace, typename index_t, class Task>
void for_each_kept_block(const BsrIndex<index_t>& index, int64_t M, const ParallelFor& parallel_for, const Task& task) {
  const int64_t grain = parallel_grain(std::max<int64_t>(M, 1) * index.block_size * index.block_size);
  parallel_for(0, index.nnz, grain, [&](int64_t begin, int64_t end) {
    Workspace workspace;
    int64_t block_row = block_row_of(index, begin);
    for (int64_t block = begin; block < end; ++block) {
      while (index.block_row_offsets[block_row + 1] <= block) ++block_row;
      task(block, block_row, workspace);
    }
  });
}

// out[rows x width] (+)= lhs[rows x depth] @ rhs[depth x width], all float32. lhs is addressed
// through two strides so that one kernel reads activations in place (row stride = leading
// dimension, depth stride 1) and the packed dy slices of grad_values, whose rows are the output
// features (row stride 1, depth stride b).
struct FmaTile {
  int64_t rows, depth, width;
  const float* lhs;
  int64_t lhs_row_stride, lhs_depth_stride;
  const float* rhs;
  int64_t rhs_stride;
  float* out;
  int64_t out_stride;
  bool accumulate;  // false: overwrite out
};

// Small-M forward of one line: out[m][n] = sum_e dot(lhs_e[m][:], blocks[e][n][:]).
template <typename scalar_t>
struct GemvArgs {
  int64_t rows;
  int64_t count;                  // kept blocks in the line
  int64_t block_size;
  const float* const* lhs;        // per entry: activations [rows][block_size], row stride lhs_stride
  int64_t lhs_stride;
  const scalar_t* const* blocks;  // per entry: stored block [block_size][block_size]
  float* out;                     // [rows][block_size], overwritten
  float* block_scratch;           // block_size^2 floats for the portable path
};

template <typename scalar_t>
struct FmaWorkspace {
  Scratch<float> acc, lhs, rhs;
  std::vector<const float*> lhs_pointers;
  std::vector<const scalar_t*> blocks;
};

// ----------------------------------------------------------------------------------------------
// Portable kernels.

// Eight independent partial sums: vectorisable without reassociating one float reduction, which
// the compiler may not do under IEEE semantics.
inline float dot_product(const float* lhs, const float* rhs, int64_t length) {
  constexpr int kLanes = 8;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += lhs[i + lane] * rhs[i + lane];
  }
  float sum = 0.0f;
  for (; i < length; ++i) sum += lhs[i] * rhs[i];
  for (int lane = 0; lane < kLanes; ++lane) sum += lanes[lane];
  return sum;
}

template <typename scalar_t>
struct GenericKernels {
  static void convert_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t width, float* dst) {
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t col = 0; col < width; ++col) dst[row * width + col] = to_float(src[row * src_stride + col]);
    }
  }

  // dst[k][n] = block[n][k].
  static void transpose_block(const scalar_t* block, int64_t block_size, float* dst) {
    for (int64_t k = 0; k < block_size; ++k) {
      for (int64_t n = 0; n < block_size; ++n) dst[k * block_size + n] = to_float(block[n * block_size + k]);
    }
  }

  // Row by row, with the innermost loop along the output row so it vectorises.
  static void fma_tile(const FmaTile& tile) {
    for (int64_t row = 0; row < tile.rows; ++row) {
      float* __restrict out_row = tile.out + row * tile.out_stride;
      if (!tile.accumulate) std::fill(out_row, out_row + tile.width, 0.0f);
      const float* lhs_row = tile.lhs + row * tile.lhs_row_stride;
      for (int64_t d = 0; d < tile.depth; ++d) {
        const float lhs_value = lhs_row[d * tile.lhs_depth_stride];
        const float* __restrict rhs_row = tile.rhs + d * tile.rhs_stride;
        for (int64_t col = 0; col < tile.width; ++col) out_row[col] += lhs_value * rhs_row[col];
      }
    }
  }

  // dst = round(acc + bias); a null acc stands for zeros, a null bias for no bias.
  static void store_rows(const float* acc, int64_t acc_stride, int64_t rows, int64_t width, const scalar_t* bias,
                         scalar_t* dst, int64_t dst_stride) {
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t col = 0; col < width; ++col) {
        float value = acc != nullptr ? acc[row * acc_stride + col] : 0.0f;
        if (bias != nullptr) value += to_float(bias[col]);
        dst[row * dst_stride + col] = from_float<scalar_t>(value);
      }
    }
  }

  static void gemv(const GemvArgs<scalar_t>& args) {
    const int64_t block_size = args.block_size;
    std::fill(args.out, args.out + args.rows * block_size, 0.0f);
    for (int64_t entry = 0; entry < args.count; ++entry) {
      const float* weights;
      if constexpr (std::is_same_v<scalar_t, float>) {
        weights = args.blocks[entry];
      } else {
        convert_rows(args.blocks[entry], block_size, block_size, block_size, args.block_scratch);
        weights = args.block_scratch;
      }
      for (int64_t row = 0; row < args.rows; ++row) {
        const float* lhs_row = args.lhs[entry] + row * args.lhs_stride;
        float* out_row = args.out + row * block_size;
        for (int64_t n = 0; n < block_size; ++n) out_row[n] += dot_product(lhs_row, weights + n * block_size, block_size);
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------
// AVX-512 kernels (float32 arithmetic for every storage type).

#if SPARSEKERNELS_X86_KERNELS
using avx512_simd::Dpbf16Tile;
using avx512_simd::dpbf16_tile;
using avx512_simd::transpose16x16_epi32;

#define SPARSEKERNELS_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,amx-tile,amx-bf16")))

// 16 consecutive values, widened to float32.
SPARSEKERNELS_AVX512 inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }

SPARSEKERNELS_AVX512 inline __m512 load16(const bfloat16* src) {
  const __m512i widened = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16));
}

SPARSEKERNELS_AVX512 inline __m512 load16(const float16* src) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// 16 values rounded to nearest even, as from_float() does (bit for bit, float16 NaN payloads aside).
SPARSEKERNELS_AVX512 inline void store16(float* dst, __m512 value) { _mm512_storeu_ps(dst, value); }

SPARSEKERNELS_AVX512 inline void store16(bfloat16* dst, __m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i lowest_kept_bit = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lowest_kept_bit);
  __m512i result = _mm512_srli_epi32(_mm512_add_epi32(bits, rounding), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  result = _mm512_mask_mov_epi32(result, is_nan, quiet_nan);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(result));
}

SPARSEKERNELS_AVX512 inline void store16(float16* dst, __m512 value) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The register-blocked micro-kernel: kRows rows x (16 * kVectors) columns of out live in zmm
// registers for the whole depth loop. Each depth step loads kVectors rhs vectors once and
// broadcasts one lhs value per row, so there are kRows * kVectors FMAs per
// kRows + kVectors loads: 24 FMAs per 10 loads at 6 x 4, enough to keep both FMA ports busy.
template <int kRows, int kVectors>
SPARSEKERNELS_AVX512 inline void avx512_fma_strip(const FmaTile& tile, int64_t row0, int64_t col0) {
  const int64_t out_stride = tile.out_stride;
  float* out = tile.out + row0 * out_stride + col0;
  __m512 acc[kRows][kVectors];
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int v = 0; v < kVectors; ++v) {
      acc[i][v] = tile.accumulate ? _mm512_loadu_ps(out + i * out_stride + 16 * v) : _mm512_setzero_ps();
    }
  }
  const float* lhs = tile.lhs + row0 * tile.lhs_row_stride;
  const float* rhs = tile.rhs + col0;
  const int64_t lhs_row_stride = tile.lhs_row_stride;
  for (int64_t d = 0; d < tile.depth; ++d) {
    __m512 rhs_vectors[kVectors];
    SPARSEKERNELS_UNROLL
    for (int v = 0; v < kVectors; ++v) rhs_vectors[v] = _mm512_loadu_ps(rhs + 16 * v);
    SPARSEKERNELS_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const __m512 lhs_value = _mm512_set1_ps(lhs[i * lhs_row_stride]);
      SPARSEKERNELS_UNROLL
      for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_fmadd_ps(lhs_value, rhs_vectors[v], acc[i][v]);
    }
    lhs += tile.lhs_depth_stride;
    rhs += tile.rhs_stride;
  }
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(out + i * out_stride + 16 * v, acc[i][v]);
  }
}

// The last rows / kRows strip, with a kernel of exactly that height.
template <int kRows, int kVectors>
SPARSEKERNELS_AVX512 inline void avx512_fma_rows_left(const FmaTile& tile, int64_t row0, int64_t col0, int64_t rows) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      avx512_fma_strip<kRows, kVectors>(tile, row0, col0);
    } else {
      avx512_fma_rows_left<kRows - 1, kVectors>(tile, row0, col0, rows);
    }
  }
}

// One column panel, swept by strips of rows: the rhs panel (depth x 16 * kVectors floats, 16 KiB
// for a 64-deep, 64-wide panel) stays in L1 while the lhs rows stream past it.
template <int kRows, int kVectors>
SPARSEKERNELS_AVX512 void avx512_fma_panel(const FmaTile& tile, int64_t col0) {
  int64_t row = 0;
  for (; row + kRows <= tile.rows; row += kRows) avx512_fma_strip<kRows, kVectors>(tile, row, col0);
  avx512_fma_rows_left<kRows - 1, kVectors>(tile, row, col0, tile.rows - row);
}

// 64- and 32-column panels keep 24 of the 32 zmm registers as accumulators (6 x 4 and 12 x 2
// vectors); 16-column panels use 12 x 1, where the loads rather than the FMAs are the limit.
SPARSEKERNELS_AVX512 void avx512_fma_tile(const FmaTile& tile) {
  int64_t col0 = 0;
  for (; col0 + 64 <= tile.width; col0 += 64) avx512_fma_panel<6, 4>(tile, col0);
  if (col0 + 32 <= tile.width) {
    avx512_fma_panel<12, 2>(tile, col0);
    col0 += 32;
  }
  if (col0 < tile.width) avx512_fma_panel<12, 1>(tile, col0);
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void avx512_convert_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t width,
                                              float* dst) {
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < width; col += 16) {
      _mm512_storeu_ps(dst + row * width + col, load16(src + row * src_stride + col));
    }
  }
}

// dst[k][n] = block[n][k], 16 x 16 tiles at a time.
template <typename scalar_t>
SPARSEKERNELS_AVX512 void avx512_transpose_block(const scalar_t* block, int64_t block_size, float* dst) {
  for (int64_t n0 = 0; n0 < block_size; n0 += 16) {
    for (int64_t k0 = 0; k0 < block_size; k0 += 16) {
      __m512i rows[16];
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < 16; ++i) rows[i] = _mm512_castps_si512(load16(block + (n0 + i) * block_size + k0));
      transpose16x16_epi32(rows);
      SPARSEKERNELS_UNROLL
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (k0 + j) * block_size + n0, rows[j]);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX512 void avx512_store_rows(const float* acc, int64_t acc_stride, int64_t rows, int64_t width,
                                            const scalar_t* bias, scalar_t* dst, int64_t dst_stride) {
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < width; col += 16) {
      __m512 value = acc != nullptr ? _mm512_loadu_ps(acc + row * acc_stride + col) : _mm512_setzero_ps();
      if (bias != nullptr) value = _mm512_add_ps(value, load16(bias + col));
      store16(dst + row * dst_stride + col, value);
    }
  }
}

// dst[j] = sum of the 16 lanes of sums[j], j < 4: unpacks sum within 128-bit lanes for all four
// at once, then the four 128-bit lanes are added through memory (store forwarding keeps it cheap).
SPARSEKERNELS_AVX512 inline void horizontal_sums4(const __m512 sums[4], float* dst) {
  // Per 128-bit lane: [s0(0)+s0(2), s1(0)+s1(2), s0(1)+s0(3), s1(1)+s1(3)], likewise for s2, s3.
  const __m512 pairs01 = _mm512_add_ps(_mm512_unpacklo_ps(sums[0], sums[1]), _mm512_unpackhi_ps(sums[0], sums[1]));
  const __m512 pairs23 = _mm512_add_ps(_mm512_unpacklo_ps(sums[2], sums[3]), _mm512_unpackhi_ps(sums[2], sums[3]));
  // Per 128-bit lane: [s0, s1, s2, s3] summed over the lane.
  const __m512d low = _mm512_unpacklo_pd(_mm512_castps_pd(pairs01), _mm512_castps_pd(pairs23));
  const __m512d high = _mm512_unpackhi_pd(_mm512_castps_pd(pairs01), _mm512_castps_pd(pairs23));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_add_ps(_mm512_castpd_ps(low), _mm512_castpd_ps(high)));
  const __m128 total = _mm_add_ps(_mm_add_ps(_mm_load_ps(lanes), _mm_load_ps(lanes + 4)),
                                  _mm_add_ps(_mm_load_ps(lanes + 8), _mm_load_ps(lanes + 12)));
  _mm_storeu_ps(dst, total);
}

// Outputs n0 .. n0 + 3 of activation rows row0 .. row0 + kRows - 1. Partial sums stay in vector
// form across all blocks of the line and are reduced horizontally once per output.
template <typename scalar_t, int kRows>
SPARSEKERNELS_AVX512 inline void avx512_gemv_tile(const GemvArgs<scalar_t>& args, int64_t row0, int64_t n0) {
  constexpr int kOutputs = 4;
  const int64_t block_size = args.block_size;
  __m512 acc[kRows][kOutputs];
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int j = 0; j < kOutputs; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t entry = 0; entry < args.count; ++entry) {
    const scalar_t* weights = args.blocks[entry] + n0 * block_size;
    const float* lhs = args.lhs[entry] + row0 * args.lhs_stride;
    for (int64_t k0 = 0; k0 < block_size; k0 += 16) {
      __m512 weight_vectors[kOutputs];
      SPARSEKERNELS_UNROLL
      for (int j = 0; j < kOutputs; ++j) weight_vectors[j] = load16(weights + j * block_size + k0);
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const __m512 lhs_vector = _mm512_loadu_ps(lhs + i * args.lhs_stride + k0);
        SPARSEKERNELS_UNROLL
        for (int j = 0; j < kOutputs; ++j) acc[i][j] = _mm512_fmadd_ps(lhs_vector, weight_vectors[j], acc[i][j]);
      }
    }
  }
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) horizontal_sums4(acc[i], args.out + (row0 + i) * block_size + n0);
}

template <typename scalar_t, int kRows>
SPARSEKERNELS_AVX512 inline void avx512_gemv_rows_left(const GemvArgs<scalar_t>& args, int64_t row0, int64_t n0,
                                                       int64_t rows) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      avx512_gemv_tile<scalar_t, kRows>(args, row0, n0);
    } else {
      avx512_gemv_rows_left<scalar_t, kRows - 1>(args, row0, n0, rows);
    }
  }
}

// Each pass reads 4 rows of every block of the line (4 x 256 bytes per block for b = 64, in L1
// for the passes over the other activation rows) against up to 6 activation rows: 24 FMAs per
// 10 vector loads. Over all passes each weight is read from memory once.
template <typename scalar_t>
SPARSEKERNELS_AVX512 void avx512_gemv(const GemvArgs<scalar_t>& args) {
  constexpr int kMaxRows = 6;
  for (int64_t n0 = 0; n0 < args.block_size; n0 += 4) {
    int64_t row = 0;
    for (; row + kMaxRows <= args.rows; row += kMaxRows) avx512_gemv_tile<scalar_t, kMaxRows>(args, row, n0);
    avx512_gemv_rows_left<scalar_t, kMaxRows - 1>(args, row, n0, args.rows - row);
  }
}

// ----------------------------------------------------------------------------------------------
// Pair ("VNNI") layout of a bfloat16 right-hand operand B[depth][n], read by both the AMX tile
// multiply and VDPBF16PS: [depth/2][n] 32-bit words, word (p, n) holding (B[2p][n], B[2p + 1][n])
// (the low half is the even depth). Each kept block is packed into it as [b/2][b] words.

// 32 or 16 bfloat16 from src, zero-extended. A 16-value row is half a register: a masked 512-bit
// load would do, but on Zen 5 it ran the bfloat16 b = 16 forward and grad_input 2-3x slower than
// float32 (the masked-off half still costs); a 256-bit load does not touch it.
SPARSEKERNELS_AVX512 inline __m512i load_32_or_16(const void* src, int64_t count) {
  return count == 32 ? _mm512_loadu_si512(src)
                     : _mm512_zextsi256_si512(_mm256_loadu_si256(static_cast<const __m256i*>(src)));
}

// Forward weights: depth is the stored column k, so word (k/2, n) is the pair (k, k + 1) of stored
// row n, which is already one 32-bit word in memory: packing is a 32-bit transpose of the
// [b][b/2] word matrix into [b/2][b].
SPARSEKERNELS_AVX512 void pack_pairs_transposed(const bfloat16* block, int64_t block_size, uint32_t* dst) {
  const int64_t words_per_row = block_size / 2;
  const char* src = reinterpret_cast<const char*>(block);
  for (int64_t n0 = 0; n0 < block_size; n0 += 16) {
    for (int64_t w0 = 0; w0 < words_per_row; w0 += 16) {
      const int64_t words = std::min<int64_t>(16, words_per_row - w0);  // 8 for 16 x 16 blocks
      __m512i rows[16];
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < 16; ++i) {
        rows[i] = load_32_or_16(src + ((n0 + i) * words_per_row + w0) * sizeof(uint32_t), 2 * words);
      }
      transpose16x16_epi32(rows);
      for (int64_t j = 0; j < words; ++j) _mm512_storeu_si512(dst + (w0 + j) * block_size + n0, rows[j]);
    }
  }
}

// Depth running down the rows (grad_input weights): word (p, col) pairs rows 2p and 2p + 1,
// interleaving them 16 bits at a time; an odd last row is paired with zeros.
// dst is [ceil(rows / 2)][width] words.
SPARSEKERNELS_AVX512 void pack_row_pairs(const bfloat16* src, int64_t src_stride, int64_t rows, int64_t width,
                                         uint32_t* dst) {
  alignas(64) uint16_t first_half[32], second_half[32];
  for (int i = 0; i < 32; ++i) {
    // permutex2var indices: 0-31 select from the even row, 32-63 from the odd row.
    first_half[i] = static_cast<uint16_t>((i % 2 == 0 ? 0 : 32) + i / 2);
    second_half[i] = static_cast<uint16_t>((i % 2 == 0 ? 16 : 48) + i / 2);
  }
  const __m512i first_index = _mm512_load_si512(first_half);
  const __m512i second_index = _mm512_load_si512(second_half);
  for (int64_t pair = 0; pair < ceil_div(rows, 2); ++pair) {
    const bfloat16* even = src + 2 * pair * src_stride;
    const bfloat16* odd = 2 * pair + 1 < rows ? even + src_stride : nullptr;
    uint32_t* dst_row = dst + pair * width;
    for (int64_t col = 0; col < width; col += 32) {
      const int64_t count = std::min<int64_t>(32, width - col);  // 32 or 16: width is a multiple of 16
      const __m512i even_values = load_32_or_16(even + col, count);
      const __m512i odd_values = odd != nullptr ? load_32_or_16(odd + col, count) : _mm512_setzero_si512();
      const __m512i first = _mm512_permutex2var_epi16(even_values, first_index, odd_values);
      const __m512i second = _mm512_permutex2var_epi16(even_values, second_index, odd_values);
      const int64_t first_words = std::min<int64_t>(16, count);
      _mm512_mask_storeu_epi32(dst_row + col, static_cast<__mmask16>((1u << first_words) - 1), first);
      if (count > 16) {
        _mm512_mask_storeu_epi32(dst_row + col + 16, static_cast<__mmask16>((1u << (count - 16)) - 1), second);
      }
    }
  }
}

template <typename scalar_t>
struct Avx512Kernels {
  static void convert_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t width, float* dst) {
    avx512_convert_rows(src, src_stride, rows, width, dst);
  }
  static void transpose_block(const scalar_t* block, int64_t block_size, float* dst) {
    avx512_transpose_block(block, block_size, dst);
  }
  static void fma_tile(const FmaTile& tile) { avx512_fma_tile(tile); }
  static void store_rows(const float* acc, int64_t acc_stride, int64_t rows, int64_t width, const scalar_t* bias,
                         scalar_t* dst, int64_t dst_stride) {
    avx512_store_rows(acc, acc_stride, rows, width, bias, dst, dst_stride);
  }
  static void gemv(const GemvArgs<scalar_t>& args) { avx512_gemv(args); }
};

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA kernels (CPUs without AVX-512: AMD Zen 1-3, Intel client cores).
//
// The same kernels as the AVX-512 set, on 8-float ymm registers (16 of them instead of 32, so the
// register tiles are smaller); conversions come from avx2.h.

// kRows rows x 16 columns (two ymm) of out in registers for the whole depth loop: 12 accumulators
// at 6 rows, plus the two rhs vectors and one broadcast, fill 15 of the 16 ymm registers. Each
// depth step makes 12 FMAs from 2 loads and 6 broadcasts.
template <int kRows>
SPARSEKERNELS_AVX2 inline void avx2_fma_strip(const FmaTile& tile, int64_t row0, int64_t col0) {
  const int64_t out_stride = tile.out_stride;
  float* out = tile.out + row0 * out_stride + col0;
  __m256 acc[kRows][2];
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int v = 0; v < 2; ++v) {
      acc[i][v] = tile.accumulate ? _mm256_loadu_ps(out + i * out_stride + 8 * v) : _mm256_setzero_ps();
    }
  }
  const float* lhs = tile.lhs + row0 * tile.lhs_row_stride;
  const float* rhs = tile.rhs + col0;
  const int64_t lhs_row_stride = tile.lhs_row_stride;
  for (int64_t d = 0; d < tile.depth; ++d) {
    const __m256 rhs_low = _mm256_loadu_ps(rhs);
    const __m256 rhs_high = _mm256_loadu_ps(rhs + 8);
    SPARSEKERNELS_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const __m256 lhs_value = _mm256_broadcast_ss(lhs + i * lhs_row_stride);
      acc[i][0] = _mm256_fmadd_ps(lhs_value, rhs_low, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(lhs_value, rhs_high, acc[i][1]);
    }
    lhs += tile.lhs_depth_stride;
    rhs += tile.rhs_stride;
  }
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    _mm256_storeu_ps(out + i * out_stride, acc[i][0]);
    _mm256_storeu_ps(out + i * out_stride + 8, acc[i][1]);
  }
}

// The last rows % 6 rows of a panel, with a kernel of exactly that height.
template <int kRows>
SPARSEKERNELS_AVX2 inline void avx2_fma_rows_left(const FmaTile& tile, int64_t row0, int64_t col0, int64_t rows) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      avx2_fma_strip<kRows>(tile, row0, col0);
    } else {
      avx2_fma_rows_left<kRows - 1>(tile, row0, col0, rows);
    }
  }
}

// 16-column panels (tile.width is a multiple of 16: block sizes are), 6 rows at a time.
SPARSEKERNELS_AVX2 void avx2_fma_tile(const FmaTile& tile) {
  constexpr int kRows = 6;
  for (int64_t col0 = 0; col0 < tile.width; col0 += 16) {
    int64_t row = 0;
    for (; row + kRows <= tile.rows; row += kRows) avx2_fma_strip<kRows>(tile, row, col0);
    avx2_fma_rows_left<kRows - 1>(tile, row, col0, tile.rows - row);
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void avx2_convert_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t width,
                                          float* dst) {
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < width; col += 8) {
      _mm256_storeu_ps(dst + row * width + col, avx2_simd::load8(src + row * src_stride + col));
    }
  }
}

// In-register transpose of an 8 x 8 float matrix (rows[i] = row i).
SPARSEKERNELS_AVX2 inline void transpose8x8_ps(__m256 rows[8]) {
  // Interleave the elements of row pairs within 128-bit halves ...
  __m256 pairs[8];
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < 4; ++i) {
    pairs[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    pairs[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  // ... then their 64-bit pairs: quads[4g + j] holds, in half h, column 4h + j of rows 4g .. 4g + 3 ...
  __m256 quads[8];
  SPARSEKERNELS_UNROLL
  for (int group = 0; group < 2; ++group) {
    const __m256* in = pairs + 4 * group;
    quads[4 * group + 0] = _mm256_shuffle_ps(in[0], in[2], 0x44);
    quads[4 * group + 1] = _mm256_shuffle_ps(in[0], in[2], 0xee);
    quads[4 * group + 2] = _mm256_shuffle_ps(in[1], in[3], 0x44);
    quads[4 * group + 3] = _mm256_shuffle_ps(in[1], in[3], 0xee);
  }
  // ... and the 128-bit halves of the two row groups.
  SPARSEKERNELS_UNROLL
  for (int j = 0; j < 4; ++j) {
    rows[j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x20);
    rows[4 + j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x31);
  }
}

// dst[k][n] = block[n][k], 8 x 8 tiles at a time.
template <typename scalar_t>
SPARSEKERNELS_AVX2 void avx2_transpose_block(const scalar_t* block, int64_t block_size, float* dst) {
  for (int64_t n0 = 0; n0 < block_size; n0 += 8) {
    for (int64_t k0 = 0; k0 < block_size; k0 += 8) {
      __m256 rows[8];
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < 8; ++i) rows[i] = avx2_simd::load8(block + (n0 + i) * block_size + k0);
      transpose8x8_ps(rows);
      SPARSEKERNELS_UNROLL
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k0 + j) * block_size + n0, rows[j]);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void avx2_store_rows(const float* acc, int64_t acc_stride, int64_t rows, int64_t width,
                                        const scalar_t* bias, scalar_t* dst, int64_t dst_stride) {
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < width; col += 8) {
      __m256 value = acc != nullptr ? _mm256_loadu_ps(acc + row * acc_stride + col) : _mm256_setzero_ps();
      if (bias != nullptr) value = _mm256_add_ps(value, avx2_simd::load8(bias + col));
      avx2_simd::store8(dst + row * dst_stride + col, value);
    }
  }
}

// Outputs n0 .. n0 + kOutputs - 1 of activation rows row0 .. row0 + kRows - 1, as in
// avx512_gemv_tile. With 16 ymm registers: 3 rows x 4 outputs (12 accumulators, 3 activation
// vectors, 1 weight vector), or 1 row x 8 outputs, which keeps 8 FMA chains in flight at M = 1.
template <typename scalar_t, int kRows, int kOutputs>
SPARSEKERNELS_AVX2 inline void avx2_gemv_tile(const GemvArgs<scalar_t>& args, int64_t row0, int64_t n0) {
  static_assert(kOutputs % 4 == 0, "outputs are reduced four at a time");
  const int64_t block_size = args.block_size;
  __m256 acc[kRows][kOutputs];
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int j = 0; j < kOutputs; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t entry = 0; entry < args.count; ++entry) {
    const scalar_t* weights = args.blocks[entry] + n0 * block_size;
    const float* lhs = args.lhs[entry] + row0 * args.lhs_stride;
    for (int64_t k0 = 0; k0 < block_size; k0 += 8) {
      __m256 lhs_vectors[kRows];
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < kRows; ++i) lhs_vectors[i] = _mm256_loadu_ps(lhs + i * args.lhs_stride + k0);
      SPARSEKERNELS_UNROLL
      for (int j = 0; j < kOutputs; ++j) {
        const __m256 weight_vector = avx2_simd::load8(weights + j * block_size + k0);
        SPARSEKERNELS_UNROLL
        for (int i = 0; i < kRows; ++i) acc[i][j] = _mm256_fmadd_ps(lhs_vectors[i], weight_vector, acc[i][j]);
      }
    }
  }
  SPARSEKERNELS_UNROLL
  for (int i = 0; i < kRows; ++i) {
    SPARSEKERNELS_UNROLL
    for (int j = 0; j < kOutputs; j += 4) {
      _mm_storeu_ps(args.out + (row0 + i) * block_size + n0 + j, avx2_simd::sum_each_of_4(acc[i] + j));
    }
  }
}

template <typename scalar_t, int kRows>
SPARSEKERNELS_AVX2 inline void avx2_gemv_rows_left(const GemvArgs<scalar_t>& args, int64_t row0, int64_t n0,
                                                   int64_t rows) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      avx2_gemv_tile<scalar_t, kRows, 4>(args, row0, n0);
    } else {
      avx2_gemv_rows_left<scalar_t, kRows - 1>(args, row0, n0, rows);
    }
  }
}

template <typename scalar_t>
SPARSEKERNELS_AVX2 void avx2_gemv(const GemvArgs<scalar_t>& args) {
  if (args.rows == 1) {
    for (int64_t n0 = 0; n0 < args.block_size; n0 += 8) avx2_gemv_tile<scalar_t, 1, 8>(args, 0, n0);
    return;
  }
  constexpr int kMaxRows = 3;
  for (int64_t n0 = 0; n0 < args.block_size; n0 += 4) {
    int64_t row = 0;
    for (; row + kMaxRows <= args.rows; row += kMaxRows) avx2_gemv_tile<scalar_t, kMaxRows, 4>(args, row, n0);
    avx2_gemv_rows_left<scalar_t, kMaxRows - 1>(args, row, n0, args.rows - row);
  }
}

template <typename scalar_t>
struct Avx2Kernels {
  static void convert_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t width, float* dst) {
    avx2_convert_rows(src, src_stride, rows, width, dst);
  }
  static void transpose_block(const scalar_t* block, int64_t block_size, float* dst) {
    avx2_transpose_block(block, block_size, dst);
  }
  static void fma_tile(const FmaTile& tile) { avx2_fma_tile(tile); }
  static void store_rows(const float* acc, int64_t acc_stride, int64_t rows, int64_t width, const scalar_t* bias,
                         scalar_t* dst, int64_t dst_stride) {
    avx2_store_rows(acc, acc_stride, rows, width, bias, dst, dst_stride);
  }
  static void gemv(const GemvArgs<scalar_t>& args) { avx2_gemv(args); }
};

// ----------------------------------------------------------------------------------------------
// AMX-BF16 kernels for bfloat16.
//
// TDPBF16PS C[16][16] += A[16][32] B[32][16] reads A as 16 rows of 32 bfloat16 (for forward and
// grad_input a plain row-major slice of x or dy, loaded in place with its row stride) and B in
// the pair layout above: 16 rows of 16 32-bit words. Each kept block is packed once per task. Tiles: 0-3
// accumulators (2 x 2 tiles of 16 x 16 floats: 32 rows x 32 columns of output), 4-5 A, 6-7 B.
// Tile state is configured at the start of each task and released at its end.
//
// GCC's tile-load intrinsic is an asm statement without a memory operand, so the compiler does
// not know it reads the packed buffers; compiler barriers order it after their ordinary stores.

struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxTileConfig) == 64, "AMX palette-1 configuration is 64 bytes");

inline void compiler_memory_barrier() { __asm__ __volatile__("" ::: "memory"); }

// depth_step: bfloat16 depth consumed per TDPBF16PS, 32, or 16 for 16 x 16 blocks.
SPARSEKERNELS_AMX void amx_configure(int64_t depth_step) {
  AmxTileConfig config{};
  config.palette_id = 1;
  for (int tile = 0; tile < 4; ++tile) {
    config.rows[tile] = 16;
    config.bytes_per_row[tile] = 16 * sizeof(float);
  }
  for (int tile = 4; tile < 6; ++tile) {
    config.rows[tile] = 16;
    config.bytes_per_row[tile] = static_cast<uint16_t>(depth_step * sizeof(bfloat16));
  }
  for (int tile = 6; tile < 8; ++tile) {
    config.rows[tile] = static_cast<uint8_t>(depth_step / 2);
    config.bytes_per_row[tile] = 16 * sizeof(uint32_t);
  }
  compiler_memory_barrier();  // the intrinsic declares a read of the first 8 bytes only
  _tile_loadconfig(&config);
}

// Activation rows of one 16-row tile: row r of the tile for entry e starts at
// base + r * stride + columns[e].
struct AmxLhs {
  const bfloat16* base;
  int64_t stride;
  const int64_t* columns;
};

// Accumulates kRowTiles x kColTiles 16 x 16 tiles of output over every kept block of the line
// (the whole reduction stays in tile registers), then stores them to out [32][32] floats.
// rhs points at column n0 of the first packed block.
template <int kRowTiles, int kColTiles>
SPARSEKERNELS_AMX void amx_accumulate(int64_t count, int64_t block_size, int64_t depth_step, const AmxLhs* lhs,
                                      const uint32_t* rhs, float* out) {
  const int64_t block_words = block_size * block_size / 2;
  const int64_t rhs_step_words = depth_step / 2 * block_size;
  const int64_t rhs_stride_bytes = block_size * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t lhs0_stride_bytes = lhs[0].stride * static_cast<int64_t>(sizeof(bfloat16));
  const int64_t lhs1_stride_bytes = kRowTiles == 2 ? lhs[1].stride * static_cast<int64_t>(sizeof(bfloat16)) : 0;
  _tile_zero(0);
  if constexpr (kColTiles == 2) _tile_zero(1);
  if constexpr (kRowTiles == 2) _tile_zero(2);
  if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_zero(3);
  for (int64_t entry = 0; entry < count; ++entry) {
    const uint32_t* block_rhs = rhs + entry * block_words;
    const bfloat16* lhs0 = lhs[0].base + lhs[0].columns[entry];
    const bfloat16* lhs1 = kRowTiles == 2 ? lhs[1].base + lhs[1].columns[entry] : nullptr;
    for (int64_t depth = 0; depth < block_size; depth += depth_step) {
      const uint32_t* step_rhs = block_rhs + depth / depth_step * rhs_step_words;
      _tile_loadd(6, step_rhs, rhs_stride_bytes);
      if constexpr (kColTiles == 2) _tile_loadd(7, step_rhs + 16, rhs_stride_bytes);
      _tile_loadd(4, lhs0 + depth, lhs0_stride_bytes);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (kColTiles == 2) _tile_dpbf16ps(1, 4, 7);
      if constexpr (kRowTiles == 2) {
        _tile_loadd(5, lhs1 + depth, lhs1_stride_bytes);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (kColTiles == 2) _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  constexpr int64_t kOutStrideBytes = 32 * sizeof(float);
  _tile_stored(0, out, kOutStrideBytes);
  if constexpr (kColTiles == 2) _tile_stored(1, out + 16, kOutStrideBytes);
  if constexpr (kRowTiles == 2) _tile_stored(2, out + 16 * 32, kOutStrideBytes);
  if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_stored(3, out + 16 * 32 + 16, kOutStrideBytes);
}

struct AmxWorkspace {
  Scratch<uint32_t> panel;
  Scratch<bfloat16> tail;
  Scratch<float> out_tile;
  std::vector<int64_t> lhs_columns, tail_columns;
};

template <typename index_t>
SPARSEKERNELS_AMX void amx_line_task(const LineProduct<bfloat16, index_t>& product, int64_t line, int64_t m_begin,
                                     int64_t m_end, AmxWorkspace& workspace) {
  const int64_t block_size = product.block_size;
  const auto [rows, first, count, out, bias] = product.task(line, m_begin, m_end);
  if (count == 0) {
    avx512_store_rows<bfloat16>(nullptr, 0, rows, block_size, bias, out, product.ldo);
    return;
  }

  // Pack every kept block of the line once; the packing is ~1/rows of the multiply work.
  const int64_t block_words = block_size * block_size / 2;
  uint32_t* panel = workspace.panel.get(count * block_words);
  workspace.lhs_columns.resize(count);
  for (int64_t entry = 0; entry < count; ++entry) {
    const bfloat16* block = product.block(first + entry);
    if (product.transpose_blocks) {
      pack_pairs_transposed(block, block_size, panel + entry * block_words);
    } else {
      pack_row_pairs(block, block_size, block_size, block_size, panel + entry * block_words);
    }
    workspace.lhs_columns[entry] = static_cast<int64_t>(product.a_blocks[first + entry]) * block_size;
  }

  // Whole 16-row tiles of A are loaded in place. The rows of a last partial tile are gathered,
  // zero padded to 16, so that no tile load reads past row M.
  const int64_t full_rows = rows / 16 * 16;
  const int64_t tail_rows = rows - full_rows;
  const int64_t tail_stride = count * block_size;
  const bfloat16* tail = nullptr;
  if (tail_rows > 0) {
    bfloat16* gathered = workspace.tail.get(16 * tail_stride);
    workspace.tail_columns.resize(count);
    for (int64_t row = 0; row < 16; ++row) {
      const bfloat16* src_row = product.a + (m_begin + full_rows + row) * product.lda;
      for (int64_t entry = 0; entry < count; ++entry) {
        bfloat16* dst = gathered + row * tail_stride + entry * block_size;
        if (row < tail_rows) {
          std::memcpy(dst, src_row + workspace.lhs_columns[entry], block_size * sizeof(bfloat16));
        } else {
          std::memset(dst, 0, block_size * sizeof(bfloat16));
        }
      }
    }
    for (int64_t entry = 0; entry < count; ++entry) workspace.tail_columns[entry] = entry * block_size;
    tail = gathered;
  }

  const int64_t depth_step = std::min<int64_t>(block_size, 32);
  float* out_tile = workspace.out_tile.get(32 * 32);
  compiler_memory_barrier();
  amx_configure(depth_step);
  for (int64_t n0 = 0; n0 < block_size; n0 += 32) {
    const bool two_col_tiles = block_size - n0 >= 32;
    for (int64_t m0 = 0; m0 < rows; m0 += 32) {
      AmxLhs lhs[2];
      const bool two_row_tiles = rows - m0 > 16;
      for (int tile = 0; tile < (two_row_tiles ? 2 : 1); ++tile) {
        const int64_t tile_row = m0 + 16 * tile;
        if (tile_row < full_rows) {
          lhs[tile] = {product.a + (m_begin + tile_row) * product.lda, product.lda, workspace.lhs_columns.data()};
        } else {
          lhs[tile] = {tail, tail_stride, workspace.tail_columns.data()};
        }
      }
      const uint32_t* rhs = panel + n0;
      if (two_row_tiles && two_col_tiles) {
        amx_accumulate<2, 2>(count, block_size, depth_step, lhs, rhs, out_tile);
      } else if (two_row_tiles) {
        amx_accumulate<2, 1>(count, block_size, depth_step, lhs, rhs, out_tile);
      } else if (two_col_tiles) {
        amx_accumulate<1, 2>(count, block_size, depth_step, lhs, rhs, out_tile);
      } else {
        amx_accumulate<1, 1>(count, block_size, depth_step, lhs, rhs, out_tile);
      }
      avx512_store_rows<bfloat16>(out_tile, 32, std::min<int64_t>(32, rows - m0), two_col_tiles ? 32 : 16,
                                  bias != nullptr ? bias + n0 : nullptr, out + m0 * product.ldo + n0, product.ldo);
    }
  }
  _tile_release();
  compiler_memory_barrier();
}

template <typename index_t>
void run_amx_line_product(const LineProduct<bfloat16, index_t>& product, int64_t M, const ParallelFor& parallel_for) {
  // Chunks of 128 rows (4 pairs of 16-row tiles). Tasks run chunk by chunk (LineSchedule is
  // chunk-major), so the activations of a chunk, 128 x 4096 bfloat16 = 1 MiB, stay in L2 while all
  // lines read them; at this speed that matters more than packing each block once per chunk
  // rather than once per call (longer chunks measured up to 15% slower).
  const int64_t m_chunk = choose_row_chunk(M, product.n_lines, 32, 128, 128);
  for_each_line_task<AmxWorkspace>(product, M, m_chunk, 1, parallel_for,
                                   [&](int64_t line, int64_t m_begin, int64_t m_end, AmxWorkspace& workspace) {
                                     amx_line_task(product, line, m_begin, m_end, workspace);
                                   });
}

// grad_values with AMX: dW[n][k] = sum over m of dy[m][n] x[m][k], with M as the depth.
// B tiles are the row pairs of an x slice, [m/2][k] words. A tiles need dy transposed, [n][m/2]
// words: the row pairs of the dy slice ([m/2][n] words) followed by a 32-bit transpose. M is cut
// into slices of kAmxGradValuesRows; the float32 result accumulates in C tiles over a slice and in
// a [b][b] buffer across slices. Consecutive blocks of a block row reuse the packed dy slice, so
// slices are long (a packed slice is b x 1024 bfloat16, 128 KiB at b = 64, in L2).
// For large M this kernel is bound by gathering each block's b-column strip of x (one short run
// per row of M, every row on its own page), not by the tile multiplies.
constexpr int64_t kAmxGradValuesRows = 1024;

// dst[c][r] = src[r][c] for a [rows][cols] matrix of 32-bit words, both multiples of 16.
SPARSEKERNELS_AMX void amx_transpose_words(const uint32_t* src, int64_t rows, int64_t cols, uint32_t* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512i tile[16];
      SPARSEKERNELS_UNROLL
      for (int i = 0; i < 16; ++i) tile[i] = _mm512_loadu_si512(src + (r0 + i) * cols + c0);
      transpose16x16_epi32(tile);
      SPARSEKERNELS_UNROLL
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (c0 + j) * rows + r0, tile[j]);
    }
  }
}

// Row pairs of rows x width bfloat16 (stride src_stride), zero padded to padded_pairs word rows.
SPARSEKERNELS_AMX void amx_pack_padded_row_pairs(const bfloat16* src, int64_t src_stride, int64_t rows, int64_t width,
                                                 int64_t padded_pairs, uint32_t* dst) {
  pack_row_pairs(src, src_stride, rows, width, dst);
  const int64_t pairs = ceil_div(rows, 2);
  std::memset(dst + pairs * width, 0, (padded_pairs - pairs) * width * sizeof(uint32_t));
}

// kRowTiles x kColTiles C tiles at acc (row stride block_size floats), over `pair_steps` steps of
// 16 m-pairs. a: A rows for the first row tile, a_row_words apart; b: B row 0, b_row_words apart.
template <int kRowTiles, int kColTiles>
SPARSEKERNELS_AMX void amx_grad_values_tiles(int64_t pair_steps, const uint32_t* a, int64_t a_row_words,
                                             const uint32_t* b, int64_t b_row_words, float* acc, int64_t block_size,
                                             bool accumulate) {
  const int64_t acc_stride_bytes = block_size * static_cast<int64_t>(sizeof(float));
  float* acc_lower = acc + 16 * block_size;
  if (accumulate) {
    _tile_loadd(0, acc, acc_stride_bytes);
    if constexpr (kColTiles == 2) _tile_loadd(1, acc + 16, acc_stride_bytes);
    if constexpr (kRowTiles == 2) _tile_loadd(2, acc_lower, acc_stride_bytes);
    if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_loadd(3, acc_lower + 16, acc_stride_bytes);
  } else {
    _tile_zero(0);
    if constexpr (kColTiles == 2) _tile_zero(1);
    if constexpr (kRowTiles == 2) _tile_zero(2);
    if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_zero(3);
  }
  const int64_t a_stride_bytes = a_row_words * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t b_stride_bytes = b_row_words * static_cast<int64_t>(sizeof(uint32_t));
  const uint32_t* a_lower = a + 16 * a_row_words;
  for (int64_t step = 0; step < pair_steps; ++step) {
    const uint32_t* step_b = b + step * 16 * b_row_words;
    _tile_loadd(6, step_b, b_stride_bytes);
    if constexpr (kColTiles == 2) _tile_loadd(7, step_b + 16, b_stride_bytes);
    _tile_loadd(4, a + step * 16, a_stride_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kColTiles == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kRowTiles == 2) {
      _tile_loadd(5, a_lower + step * 16, a_stride_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (kColTiles == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, acc_stride_bytes);
  if constexpr (kColTiles == 2) _tile_stored(1, acc + 16, acc_stride_bytes);
  if constexpr (kRowTiles == 2) _tile_stored(2, acc_lower, acc_stride_bytes);
  if constexpr (kRowTiles == 2 && kColTiles == 2) _tile_stored(3, acc_lower + 16, acc_stride_bytes);
}

struct AmxGradValuesWorkspace {
  Scratch<uint32_t> dy_pairs, dy_transposed, x_pairs;
  Scratch<float> acc;
  int64_t packed_block_row = -1;  // block row and slice whose dy is in dy_transposed
  int64_t packed_m0 = -1;
};

template <typename index_t>
SPARSEKERNELS_AMX void amx_grad_values_task(const bfloat16* grad_out, const bfloat16* x, int64_t M,
                                            const BsrIndex<index_t>& index, int64_t block, int64_t block_row,
                                            bfloat16* grad_values, AmxGradValuesWorkspace& workspace) {
  const int64_t block_size = index.block_size;
  const int64_t out_features = index.n_block_rows * block_size;
  const int64_t in_features = index.n_block_cols * block_size;
  const int64_t block_col = index.block_col_indices[block];
  float* acc = workspace.acc.get(block_size * block_size);
  for (int64_t m0 = 0; m0 < M; m0 += kAmxGradValuesRows) {
    const int64_t rows = std::min(kAmxGradValuesRows, M - m0);
    const int64_t padded_pairs = round_up(ceil_div(rows, 2), 16);
    uint32_t* dy_transposed = workspace.dy_transposed.get(block_size * padded_pairs);
    if (workspace.packed_block_row != block_row || workspace.packed_m0 != m0) {
      uint32_t* dy_pairs = workspace.dy_pairs.get(padded_pairs * block_size);
      amx_pack_padded_row_pairs(grad_out + m0 * out_features + block_row * block_size, out_features, rows, block_size,
                                padded_pairs, dy_pairs);
      amx_transpose_words(dy_pairs, padded_pairs, block_size, dy_transposed);
      workspace.packed_block_row = block_row;
      workspace.packed_m0 = m0;
    }
    uint32_t* x_pairs = workspace.x_pairs.get(padded_pairs * block_size);
    amx_pack_padded_row_pairs(x + m0 * in_features + block_col * block_size, in_features, rows, block_size,
                              padded_pairs, x_pairs);
    compiler_memory_barrier();
    const bool accumulate = m0 > 0;
    const int64_t pair_steps = padded_pairs / 16;
    for (int64_t n0 = 0; n0 < block_size; n0 += 32) {
      const uint32_t* a = dy_transposed + n0 * padded_pairs;
      for (int64_t k0 = 0; k0 < block_size; k0 += 32) {
        float* out = acc + n0 * block_size + k0;
        if (block_size - n0 >= 32 && block_size - k0 >= 32) {
          amx_grad_values_tiles<2, 2>(pair_steps, a, padded_pairs, x_pairs + k0, block_size, out, block_size, accumulate);
        } else {  // 16 x 16 blocks
          amx_grad_values_tiles<1, 1>(pair_steps, a, padded_pairs, x_pairs + k0, block_size, out, block_size, accumulate);
        }
      }
    }
    compiler_memory_barrier();
  }
  avx512_store_rows<bfloat16>(M > 0 ? acc : nullptr, block_size, block_size, block_size, nullptr,
                              grad_values + block * block_size * block_size, block_size);
}

template <typename index_t>
SPARSEKERNELS_AMX void amx_grad_values_range(const bfloat16* grad_out, const bfloat16* x, int64_t M,
                                             const BsrIndex<index_t>& index, int64_t begin, int64_t end,
                                             bfloat16* grad_values) {
  AmxGradValuesWorkspace workspace;
  const index_t* row_offsets = index.block_row_offsets;
  int64_t block_row = block_row_of(index, begin);
  amx_configure(32);
  for (int64_t block = begin; block < end; ++block) {
    while (row_offsets[block_row + 1] <= block) ++block_row;
    amx_grad_values_task(grad_out, x, M, index, block, block_row, grad_values, workspace);
  }
  _tile_release();
  compiler_memory_barrier();
}

// ----------------------------------------------------------------------------------------------
// AVX512-BF16 kernels for bfloat16 (the avx512_bf16 level: CPUs without AMX).
//
// VDPBF16PS adds, in each of 16 float32 lanes, the two products of a pair of bfloat16 values:
// acc[n] += a[2p] * b[2p][n] + a[2p + 1] * b[2p + 1][n]. On AMD Zen 4 and 5 it issues like a
// float32 FMA and so does twice the multiply-adds per instruction (see the top of this file); the
// widening float32 path also spends loads and conversions on every bfloat16 operand.
// The micro-kernel is the float32 one with depth counted in pairs: the rhs is a kept block packed
// in the pair layout, and each lhs row contributes one 32-bit pair, broadcast to all lanes. For
// forward and grad_input the lhs pairs are read in place (two adjacent bfloat16 of a row of x or
// dy: block sizes are multiples of 16, so a pair never straddles a block).
//
// Numerics: each instruction rounds the sum of its two products once into the float32 accumulator
// (the float32 path rounds after each product), and input and output denormals are flushed to
// zero; both are far below bfloat16's own precision. Accumulation order is fixed per output
// element, so results stay deterministic.

struct Dpbf16Workspace {
  Scratch<float> acc;
  Scratch<uint32_t> rhs, lhs;
};

// One (line, row chunk) task of forward or grad_input (the structure of fma_line_task).
template <typename index_t>
SPARSEKERNELS_AVX512_BF16 void dpbf16_line_task(const LineProduct<bfloat16, index_t>& product, int64_t line,
                                                int64_t m_begin, int64_t m_end, Dpbf16Workspace& workspace) {
  const int64_t block_size = product.block_size;
  const auto [rows, first, count, out, bias] = product.task(line, m_begin, m_end);
  if (count == 0) {
    avx512_store_rows<bfloat16>(nullptr, 0, rows, block_size, bias, out, product.ldo);
    return;
  }
  float* acc = workspace.acc.get(rows * block_size);
  uint32_t* packed = workspace.rhs.get(block_size * block_size / 2);
  for (int64_t entry = first; entry < first + count; ++entry) {
    const bfloat16* block = product.block(entry);
    if (product.transpose_blocks) {
      pack_pairs_transposed(block, block_size, packed);
    } else {
      pack_row_pairs(block, block_size, block_size, block_size, packed);
    }
    const bfloat16* lhs =
        product.a + m_begin * product.lda + static_cast<int64_t>(product.a_blocks[entry]) * block_size;
    dpbf16_tile(Dpbf16Tile{rows, block_size / 2, block_size, lhs, product.lda, 2, packed, block_size, acc, block_size,
                           entry != first});
  }
  avx512_store_rows<bfloat16>(acc, block_size, rows, block_size, bias, out, product.ldo);
}

template <typename index_t>
void run_dpbf16_line_product(const LineProduct<bfloat16, index_t>& product, int64_t M, const ParallelFor& parallel_for) {
  // The chunking of run_fma_line_product: whole 6- and 12-row strips, accumulator in L2.
  const int64_t m_chunk = choose_row_chunk(M, product.n_lines, 12, 48, 256);
  const int64_t grain = parallel_grain(m_chunk * product.block_size * product.block_size);
  for_each_line_task<Dpbf16Workspace>(product, M, m_chunk, grain, parallel_for,
                                      [&](int64_t line, int64_t m_begin, int64_t m_end, Dpbf16Workspace& workspace) {
                                        dpbf16_line_task(product, line, m_begin, m_end, workspace);
                                      });
}

// grad_values of one kept block with M as the depth: per slice of kGradValuesRowStep rows, dy and
// x are packed as row pairs ([rows/2][b] words each, an odd last row paired with zero), and the
// tile runs with the block's output features as its rows: lhs row n, pair p is word (p, n) of the
// packed dy, i.e. row stride 1 word, pair stride b words.
template <typename index_t>
SPARSEKERNELS_AVX512_BF16 void dpbf16_grad_values_task(const bfloat16* grad_out, const bfloat16* x, int64_t M,
                                                       const BsrIndex<index_t>& index, int64_t block, int64_t block_row,
                                                       bfloat16* grad_values, Dpbf16Workspace& workspace) {
  const int64_t block_size = index.block_size;
  const int64_t out_features = index.n_block_rows * block_size;
  const int64_t in_features = index.n_block_cols * block_size;
  const int64_t block_col = index.block_col_indices[block];
  bfloat16* dst = grad_values + block * block_size * block_size;
  float* acc = workspace.acc.get(block_size * block_size);
  for (int64_t m0 = 0; m0 < M; m0 += kGradValuesRowStep) {
    const int64_t rows = std::min(kGradValuesRowStep, M - m0);
    const int64_t pairs = ceil_div(rows, 2);
    uint32_t* dy_pairs = workspace.lhs.get(pairs * block_size);
    pack_row_pairs(grad_out + m0 * out_features + block_row * block_size, out_features, rows, block_size, dy_pairs);
    uint32_t* x_pairs = workspace.rhs.get(pairs * block_size);
    pack_row_pairs(x + m0 * in_features + block_col * block_size, in_features, rows, block_size, x_pairs);
    dpbf16_tile(Dpbf16Tile{block_size, pairs, block_size, reinterpret_cast<const bfloat16*>(dy_pairs), 2,
                           2 * block_size, x_pairs, block_size, acc, block_size, m0 > 0});
  }
  avx512_store_rows<bfloat16>(M > 0 ? acc : nullptr, block_size, block_size, block_size, nullptr, dst, block_size);
}

// grad_values of one kept block over the whole of M, from dy and x packed once as row pairs for
// every block (dy_pairs [pairs][out_features] and x_pairs [pairs][in_features] words): the tile
// reads the block's slices of both in place.
template <typename index_t>
SPARSEKERNELS_AVX512_BF16 void dpbf16_grad_values_prepacked(const uint32_t* dy_pairs, const uint32_t* x_pairs,
                                                            int64_t pairs, const BsrIndex<index_t>& index,
                                                            int64_t block, int64_t block_row, bfloat16* grad_values,
                                                            Dpbf16Workspace& workspace) {
  const int64_t block_size = index.block_size;
  const int64_t out_features = index.n_block_rows * block_size;
  const int64_t in_features = index.n_block_cols * block_size;
  const int64_t block_col = index.block_col_indices[block];
  float* acc = workspace.acc.get(block_size * block_size);
  dpbf16_tile(Dpbf16Tile{block_size, pairs, block_size,
                         reinterpret_cast<const bfloat16*>(dy_pairs + block_row * block_size), 2, 2 * out_features,
                         x_pairs + block_col * block_size, in_features, acc, block_size, false});
  avx512_store_rows<bfloat16>(acc, block_size, block_size, block_size, nullptr,
                              grad_values + block * block_size * block_size, block_size);
}

template <typename index_t>
void run_dpbf16_grad_values(const bfloat16* grad_out, const bfloat16* x, int64_t M, const BsrIndex<index_t>& index,
                            bfloat16* grad_values, const ParallelFor& parallel_for) {
  const int64_t block_size = index.block_size;
  const int64_t out_features = index.n_block_rows * block_size;
  const int64_t in_features = index.n_block_cols * block_size;
  const int64_t pairs = ceil_div(M, 2);
  // Packing a kept block's dy and x slices costs 2 b words per b * b multiply-adds of each row
  // pair, which at small b rivals the products (and each slice is packed again for every block
  // that uses it): for b <= 32, dy and x are packed once for all blocks instead (up to
  // kPrepackedPairBytes). 4096 x 4096 at density 0.5 on one Zen 5 core, M = 16 / 256 / 1024: b16
  // 3.3 / 47 / 239 -> 1.7 / 27 / 121 ms, b32 2.0 / 21 / 101 -> 1.3 / 12 / 51 ms. From b64 on the
  // per-block slices, which stay in L1, are as fast or faster (b128 at M = 256: 11.3 against 13.4).
  const int64_t prepacked_bytes = pairs * (out_features + in_features) * static_cast<int64_t>(sizeof(uint32_t));
  if (M > 0 && block_size <= kPrepackedMaxBlock && prepacked_bytes <= kPrepackedPairBytes) {
    std::vector<uint32_t> dy_pairs(static_cast<size_t>(pairs * out_features));
    std::vector<uint32_t> x_pairs(static_cast<size_t>(pairs * in_features));
    const int64_t pack_grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, out_features + in_features));
    parallel_for(0, pairs, pack_grain, [&](int64_t pair_begin, int64_t pair_end) {
      const int64_t row_begin = 2 * pair_begin, rows = std::min(M, 2 * pair_end) - row_begin;
      pack_row_pairs(grad_out + row_begin * out_features, out_features, rows, out_features,
                     dy_pairs.data() + pair_begin * out_features);
      pack_row_pairs(x + row_begin * in_features, in_features, rows, in_features, x_pairs.data() + pair_begin * in_features);
    });
    for_each_kept_block<Dpbf16Workspace>(index, M, parallel_for,
                                         [&](int64_t block, int64_t block_row, Dpbf16Workspace& workspace) {
                                           dpbf16_grad_values_prepacked(dy_pairs.data(), x_pairs.data(), pairs, index,
                                                                        block, block_row, grad_values, workspace);
                                         });
    return;
  }
  for_each_kept_block<Dpbf16Workspace>(index, M, parallel_for,
                                       [&](int64_t block, int64_t block_row, Dpbf16Workspace& workspace) {
                                         dpbf16_grad_values_task(grad_out, x, M, index, block, block_row, grad_values,
                                                                 workspace);
                                       });
}
#endif  // SPARSEKERNELS_X86_KERNELS

// ----------------------------------------------------------------------------------------------
// Float32 drivers, shared by the portable and the AVX-512 kernels.

// One (line, row chunk) task for M >= kSmallBatchRows.
template <class Kernels, typename scalar_t, typename index_t>
void fma_line_task(const LineProduct<scalar_t, index_t>& product, int64_t line, int64_t m_begin, int64_t m_end,
                   FmaWorkspace<scalar_t>& workspace) {
  const int64_t block_size = product.block_size;
  const auto [rows, first, count, out, bias] = product.task(line, m_begin, m_end);
  if (count == 0) {
    Kernels::store_rows(nullptr, 0, rows, block_size, bias, out, product.ldo);
    return;
  }
  const int64_t last = first + count;
  float* acc = workspace.acc.get(rows * block_size);
  for (int64_t entry = first; entry < last; ++entry) {
    // Right-hand operand [depth][block_size]; grad_input float32 blocks are used in place.
    const scalar_t* block = product.block(entry);
    const float* rhs;
    if (product.transpose_blocks) {
      float* packed = workspace.rhs.get(block_size * block_size);
      Kernels::transpose_block(block, block_size, packed);
      rhs = packed;
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      rhs = block;
    } else {
      float* widened = workspace.rhs.get(block_size * block_size);
      Kernels::convert_rows(block, block_size, block_size, block_size, widened);
      rhs = widened;
    }
    // Left-hand operand: the matching strip of A, in place for float32, widened otherwise.
    const scalar_t* lhs_src = product.a + m_begin * product.lda + static_cast<int64_t>(product.a_blocks[entry]) * block_size;
    const float* lhs;
    int64_t lhs_stride;
    if constexpr (std::is_same_v<scalar_t, float>) {
      lhs = lhs_src;
      lhs_stride = product.lda;
    } else {
      float* widened = workspace.lhs.get(rows * block_size);
      Kernels::convert_rows(lhs_src, product.lda, rows, block_size, widened);
      lhs = widened;
      lhs_stride = block_size;
    }
    Kernels::fma_tile(FmaTile{rows, block_size, block_size, lhs, lhs_stride, 1, rhs, block_size, acc, block_size,
                              entry != first});
  }
  Kernels::store_rows(acc, block_size, rows, block_size, bias, out, product.ldo);
}

// One line of the small-M forward pass (all M rows at once).
template <class Kernels, typename scalar_t, typename index_t>
void gemv_line_task(const LineProduct<scalar_t, index_t>& product, int64_t line, int64_t m_begin, int64_t m_end,
                    FmaWorkspace<scalar_t>& workspace) {
  const int64_t block_size = product.block_size;
  const auto [rows, first, count, out, bias] = product.task(line, m_begin, m_end);
  if (count == 0) {
    Kernels::store_rows(nullptr, 0, rows, block_size, bias, out, product.ldo);
    return;
  }
  workspace.lhs_pointers.resize(count);
  workspace.blocks.resize(count);
  // 16-bit activations are widened once per block ([rows][b], cheap next to the b^2 weights).
  float* widened = std::is_same_v<scalar_t, float> ? nullptr : workspace.lhs.get(count * rows * block_size);
  for (int64_t entry = 0; entry < count; ++entry) {
    const scalar_t* lhs_src =
        product.a + m_begin * product.lda + static_cast<int64_t>(product.a_blocks[first + entry]) * block_size;
    if constexpr (std::is_same_v<scalar_t, float>) {
      workspace.lhs_pointers[entry] = lhs_src;
    } else {
      float* dst = widened + entry * rows * block_size;
      Kernels::convert_rows(lhs_src, product.lda, rows, block_size, dst);
      workspace.lhs_pointers[entry] = dst;
    }
    workspace.blocks[entry] = product.block(first + entry);
  }
  float* acc = workspace.acc.get(rows * block_size);
  const GemvArgs<scalar_t> args{rows,
                                count,
                                block_size,
                                workspace.lhs_pointers.data(),
                                std::is_same_v<scalar_t, float> ? product.lda : block_size,
                                workspace.blocks.data(),
                                acc,
                                workspace.rhs.get(block_size * block_size)};
  Kernels::gemv(args);
  Kernels::store_rows(acc, block_size, rows, block_size, bias, out, product.ldo);
}

template <class Kernels, typename scalar_t, typename index_t>
void run_fma_line_product(const LineProduct<scalar_t, index_t>& product, int64_t M, const ParallelFor& parallel_for) {
  const int64_t block_size = product.block_size;
  const bool gemv = product.transpose_blocks && M < kSmallBatchRows;
  // Chunks are multiples of 12 rows (whole strips of the 6- and 12-row micro-kernels) and at
  // most 256 rows, so the float32 accumulator of a 64-wide line (64 KiB) stays in L2.
  const int64_t m_chunk = gemv ? M : choose_row_chunk(M, product.n_lines, 12, 48, 256);
  const int64_t grain = parallel_grain(m_chunk * block_size * block_size);
  for_each_line_task<FmaWorkspace<scalar_t>>(
      product, M, m_chunk, grain, parallel_for,
      [&](int64_t line, int64_t m_begin, int64_t m_end, FmaWorkspace<scalar_t>& workspace) {
        if (gemv) {
          gemv_line_task<Kernels>(product, line, m_begin, m_end, workspace);
        } else {
          fma_line_task<Kernels>(product, line, m_begin, m_end, workspace);
        }
      });
}

template <typename scalar_t, typename index_t>
void run_line_product(const LineProduct<scalar_t, index_t>& product, int64_t M, const ParallelFor& parallel_for) {
  if (M <= 0 || product.n_lines == 0) return;
#if SPARSEKERNELS_X86_KERNELS
  const CpuIsa isa = isa_for_block_size(product.block_size);
  if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    if (isa == CpuIsa::amx && M >= kSmallBatchRows) {
      run_amx_line_product(product, M, parallel_for);
      return;
    }
    // Below kDpbf16ForwardRows the forward is bound by reading the weights: the float32 GEMV.
    if (isa == CpuIsa::avx512_bf16 && (M >= kDpbf16ForwardRows || !product.transpose_blocks)) {
      run_dpbf16_line_product(product, M, parallel_for);
      return;
    }
  }
  if (isa >= CpuIsa::avx512) {
    run_fma_line_product<Avx512Kernels<scalar_t>>(product, M, parallel_for);
    return;
  }
  if (isa == CpuIsa::avx2) {
    run_fma_line_product<Avx2Kernels<scalar_t>>(product, M, parallel_for);
    return;
  }
#endif
  run_fma_line_product<GenericKernels<scalar_t>>(product, M, parallel_for);
}

// grad_values of one kept block: acc[n][k] = sum over m of dy[m][row strip n] * x[m][col strip k],
// a product whose depth is M. Slices of both operands are packed contiguous first, which also
// avoids the cache-set conflicts of walking 64 rows that are a power-of-two stride apart.
template <class Kernels, typename scalar_t, typename index_t>
void grad_values_task(const scalar_t* grad_out, const scalar_t* x, int64_t M, const BsrIndex<index_t>& index,
                      int64_t block, int64_t block_row, scalar_t* grad_values, FmaWorkspace<scalar_t>& workspace) {
  const int64_t block_size = index.block_size;
  const int64_t out_features = index.n_block_rows * block_size;
  const int64_t in_features = index.n_block_cols * block_size;
  const int64_t block_col = index.block_col_indices[block];
  scalar_t* dst = grad_values + block * block_size * block_size;
  if (M == 0) {
    Kernels::store_rows(nullptr, 0, block_size, block_size, nullptr, dst, block_size);
    return;
  }
  float* acc = workspace.acc.get(block_size * block_size);
  for (int64_t m0 = 0; m0 < M; m0 += kGradValuesRowStep) {
    const int64_t rows = std::min(kGradValuesRowStep, M - m0);
    float* dy = workspace.lhs.get(rows * block_size);
    Kernels::convert_rows(grad_out + m0 * out_features + block_row * block_size, out_features, rows, block_size, dy);
    float* xs = workspace.rhs.get(rows * block_size);
    Kernels::convert_rows(x + m0 * in_features + block_col * block_size, in_features, rows, block_size, xs);
    // Output row n = feature n of the block row, reading dy[m][n] at dy + m * b + n.
    Kernels::fma_tile(FmaTile{block_size, rows, block_size, dy, 1, block_size, xs, block_size, acc, block_size, m0 > 0});
  }
  Kernels::store_rows(acc, block_size, block_size, block_size, nullptr, dst, block_size);
}

template <class Kernels, typename scalar_t, typename index_t>
void run_grad_values(const scalar_t* grad_out, const scalar_t* x, int64_t M, const BsrIndex<index_t>& index,
                     scalar_t* grad_values, const ParallelFor& parallel_for) {
  for_each_kept_block<FmaWorkspace<scalar_t>>(
      index, M, parallel_for, [&](int64_t block, int64_t block_row, FmaWorkspace<scalar_t>& workspace) {
        grad_values_task<Kernels>(grad_out, x, M, index, block, block_row, grad_values, workspace);
      });
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Entry points.

template <typename scalar_t, typename index_t>
void bsr_linear_forward(const scalar_t* x, int64_t M, const scalar_t* values, const BsrIndex<index_t>& index,
                        const scalar_t* bias, scalar_t* y, const ParallelFor& parallel_for) {
  const int64_t block_size = index.block_size;
  const LineProduct<scalar_t, index_t> product{x,
                                               index.n_block_cols * block_size,
                                               values,
                                               index.block_row_offsets,
                                               index.block_col_indices,
                                               nullptr,
                                               index.n_block_rows,
                                               block_size,
                                               /*transpose_blocks=*/true,
                                               bias,
                                               y,
                                               index.n_block_rows * block_size};
  run_line_product(product, M, parallel_for);
}

template <typename scalar_t, typename index_t>
void bsr_linear_grad_input(const scalar_t* grad_out, int64_t M, const scalar_t* values, const BsrIndex<index_t>& index,
                           scalar_t* grad_input, const ParallelFor& parallel_for) {
  const int64_t block_size = index.block_size;
  const LineProduct<scalar_t, index_t> product{grad_out,
                                               index.n_block_rows * block_size,
                                               values,
                                               index.block_col_offsets,
                                               index.block_row_indices,
                                               index.block_value_indices,
                                               index.n_block_cols,
                                               block_size,
                                               /*transpose_blocks=*/false,
                                               nullptr,
                                               grad_input,
                                               index.n_block_cols * block_size};
  run_line_product(product, M, parallel_for);
}

template <typename scalar_t, typename index_t>
void bsr_linear_grad_values(const scalar_t* grad_out, const scalar_t* x, int64_t M, const BsrIndex<index_t>& index,
                            scalar_t* grad_values, const ParallelFor& parallel_for) {
  if (index.nnz == 0) return;
#if SPARSEKERNELS_X86_KERNELS
  const CpuIsa isa = isa_for_block_size(index.block_size);
  if constexpr (std::is_same_v<scalar_t, bfloat16>) {
    if (isa == CpuIsa::amx && M >= kSmallBatchRows) {
      const int64_t grain = parallel_grain(M * index.block_size * index.block_size);
      parallel_for(0, index.nnz, grain, [&](int64_t begin, int64_t end) {
        amx_grad_values_range(grad_out, x, M, index, begin, end, grad_values);
      });
      return;
    }
    if (isa == CpuIsa::avx512_bf16) {
      run_dpbf16_grad_values(grad_out, x, M, index, grad_values, parallel_for);
      return;
    }
  }
  if (isa >= CpuIsa::avx512) {
    run_grad_values<Avx512Kernels<scalar_t>>(grad_out, x, M, index, grad_values, parallel_for);
    return;
  }
  if (isa == CpuIsa::avx2) {
    run_grad_values<Avx2Kernels<scalar_t>>(grad_out, x, M, index, grad_values, parallel_for);
    return;
  }
#endif
  run_grad_values<GenericKernels<scalar_t>>(grad_out, x, M, index, grad_values, parallel_for);
}

#define SPARSEKERNELS_INSTANTIATE_BSR(scalar_t, index_t)                                                          \
  template void bsr_linear_forward<scalar_t, index_t>(const scalar_t*, int64_t, const scalar_t*,                  \
                                                      const BsrIndex<index_t>&, const scalar_t*, scalar_t*,       \
                                                      const ParallelFor&);                                        \
  template void bsr_linear_grad_input<scalar_t, index_t>(const scalar_t*, int64_t, const scalar_t*,               \
                                                         const BsrIndex<index_t>&, scalar_t*, const ParallelFor&); \
  template void bsr_linear_grad_values<scalar_t, index_t>(const scalar_t*, const scalar_t*, int64_t,              \
                                                          const BsrIndex<index_t>&, scalar_t*, const ParallelFor&);

SPARSEKERNELS_INSTANTIATE_BSR(float, int32_t)
SPARSEKERNELS_INSTANTIATE_BSR(float, int64_t)
SPARSEKERNELS_INSTANTIATE_BSR(bfloat16, int32_t)
SPARSEKERNELS_INSTANTIATE_BSR(bfloat16, int64_t)
SPARSEKERNELS_INSTANTIATE_BSR(float16, int32_t)
SPARSEKERNELS_INSTANTIATE_BSR(float16, int64_t)

#undef SPARSEKERNELS_INSTANTIATE_BSR

}  // namespace sparsekernels::cpu
