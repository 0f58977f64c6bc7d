// 2:4 compression and metadata reordering (see nm24_compress.cuh and
// sparsekernels/formats/nm24_metadata.py, whose formulas the offset function below mirrors).
//
// One thread per 16-bit metadata word of the (padded) layout: it covers 16 dense columns of one row,
// read as two 16-byte vectors, and writes 8 kept values (one 16-byte store) and the word. Padding
// words of the sm_90 layouts get four 0x4 nibbles (offsets 0, 1), valid for the hardware.
#include "device_common.cuh"
#include "nm24_compress.cuh"

namespace sparsekernels::cuda {
namespace {

using detail::Storage;

constexpr int kThreads = 256;
constexpr uint16_t kPadWord = 0x4444;

// NumK (MinTileShapeK / 32) of an sm_90 layout, 0 for the others.
__host__ __device__ inline int sm90_num_k(Nm24Layout layout) {
  return layout == Nm24Layout::sm90 ? 4 : layout == Nm24Layout::sm90_k64 ? 2 : layout == Nm24Layout::sm90_k32 ? 1 : 0;
}

struct LayoutShape {
  int64_t rows, words;                // real rows and words per row (cols / 16)
  int64_t padded_rows, padded_words;  // thread grid: the layout's padded extent
  int num_k;                          // sm_90 layouts: NumK; else 0

  // Words of the padded layout: the metadata size, and one thread each.
  __host__ __device__ int64_t padded_count() const { return padded_rows * padded_words; }
};

__host__ __device__ inline LayoutShape layout_shape(int64_t rows, int64_t cols, Nm24Layout layout) {
  LayoutShape s{rows, cols / 16, rows, cols / 16, sm90_num_k(layout)};
  if (s.num_k > 0) {
    const int64_t atom_cols = 32 * s.num_k;
    s.padded_rows = (rows + 63) / 64 * 64;
    s.padded_words = (cols + atom_cols - 1) / atom_cols * atom_cols / 16;
  }
  return s;
}

// Word offset of natural word (r, w) in layout (r, w may be padding coordinates for sm_90).
__host__ __device__ __forceinline__ int64_t metadata_offset(int64_t r, int64_t w, const LayoutShape& s, Nm24Layout layout) {
  if (layout == Nm24Layout::natural) return r * s.words + w;
  if (layout == Nm24Layout::sm80) {
    int64_t row = 32 * (r / 32) + 4 * (r % 8) + (r % 32) / 8;
    int64_t col = w;
    if (row % 2 == 0 && col % 2 == 1) {
      ++row;
      --col;
    } else if (row % 2 == 1 && col % 2 == 0) {
      --row;
      ++col;
    }
    return (col / 2) * (2 * s.rows) + 2 * row + col % 2;
  }
  const int64_t k = s.num_k, v = w % (2 * k);
  return (r % 16) / 8 + 2 * (v / 2) + 2 * k * (r % 8) + 16 * k * (v % 2) + 32 * k * ((r % 64) / 16) +
         128 * k * (r / 64) + 2 * k * s.padded_rows * (w / (2 * k));
}

// The word a thread of either kernel owns: natural coordinates (r, w) and offset in the layout.
struct WordSite {
  int64_t r, w, offset;
};

// Maps this thread to its word of the padded grid. False when the thread has nothing (more) to do:
// past the grid, or on a padding word, which it has just filled with kPadWord.
__device__ __forceinline__ bool claim_real_word(const LayoutShape& shape, Nm24Layout layout, uint16_t* metadata,
                                                WordSite& site) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= shape.padded_count()) return false;
  site.r = i / shape.padded_words;
  site.w = i % shape.padded_words;
  site.offset = metadata_offset(site.r, site.w, shape, layout);
  if (site.r >= shape.rows || site.w >= shape.words) {
    metadata[site.offset] = kPadWord;
    return false;
  }
  return true;
}

// Selection score as NMMatrix.from_dense: |w|, NaN counted as +inf.
__device__ __forceinline__ float score(float w) { return isnan(w) ? INFINITY : fabsf(w); }

// Offsets i0 < i1 of the two largest scores of a group (first maximum wins ties).
__device__ __forceinline__ void top2(const float s[4], int& i0, int& i1) {
  int best = 0;
#pragma unroll
  for (int i = 1; i < 4; ++i)
    if (s[i] > s[best]) best = i;
  int second = best == 0 ? 1 : 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (i != best && s[i] > s[second]) second = i;
  i0 = best < second ? best : second;
  i1 = best < second ? second : best;
}

// raw[i] without dynamic indexing (keeps raw in registers).
__device__ __forceinline__ uint16_t pick(const uint16_t raw[4], int i) {
  return i == 0 ? raw[0] : i == 1 ? raw[1] : i == 2 ? raw[2] : raw[3];
}

template <DType kDType>
__global__ void __launch_bounds__(kThreads)
    nm24_compress_kernel(const uint16_t* __restrict__ dense, int64_t dense_row_stride,
                         const uint8_t* __restrict__ mask, int64_t mask_row_stride, LayoutShape shape,
                         Nm24Layout layout, uint16_t* __restrict__ values, uint16_t* __restrict__ metadata,
                         int* bad_groups) {
  WordSite site;
  if (!claim_real_word(shape, layout, metadata, site)) return;
  const int64_t r = site.r, w = site.w;
  const uint4* src = reinterpret_cast<const uint4*>(dense + r * dense_row_stride + 16 * w);
  const uint4 lo = __ldg(src), hi = __ldg(src + 1);
  uint4 mask_bits{};
  if (mask != nullptr) mask_bits = __ldg(reinterpret_cast<const uint4*>(mask + r * mask_row_stride + 16 * w));

  uint16_t kept[8];
  unsigned word = 0;
  int bad = 0;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    uint16_t raw[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) raw[t] = detail::lane16(g < 2 ? lo : hi, (g % 2) * 4 + t);
    int i0 = 0, i1 = 1;
    if (mask == nullptr) {
      float s[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) s[t] = score(Storage<kDType>::to_float(raw[t]));
      top2(s, i0, i1);
    } else {
      // Byte g*4 + t of the 16 mask bytes.
      const unsigned mask_word = g == 0 ? mask_bits.x : g == 1 ? mask_bits.y : g == 2 ? mask_bits.z : mask_bits.w;
      int found = 0, first = 0, second = 1;
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if ((mask_word >> (8 * t)) & 0xffu) {
          if (found == 0) first = t;
          if (found == 1) second = t;
          ++found;
        }
      }
      if (found >= 2) {
        i0 = first;
        i1 = second;
      }
      bad += found != 2;
    }
    kept[2 * g] = pick(raw, i0);
    kept[2 * g + 1] = pick(raw, i1);
    word |= static_cast<unsigned>(i0 | (i1 << 2)) << (4 * g);
  }
  if (bad && bad_groups != nullptr) atomicAdd(bad_groups, bad);
  uint4 out;
  out.x = kept[0] | (static_cast<unsigned>(kept[1]) << 16);
  out.y = kept[2] | (static_cast<unsigned>(kept[3]) << 16);
  out.z = kept[4] | (static_cast<unsigned>(kept[5]) << 16);
  out.w = kept[6] | (static_cast<unsigned>(kept[7]) << 16);
  *reinterpret_cast<uint4*>(values + r * (shape.words * 8) + 8 * w) = out;
  metadata[site.offset] = static_cast<uint16_t>(word);
}

// A metadata word with every nibble whose offsets do not increase (i0 >= i1) replaced by 0x4
// (offsets 0, 1). A valid 2:4 pattern never has one, but positions reach this kernel unchecked
// (reading them on the host would need a sync), and such nibbles are outside mma.sp's metadata
// contract (undefined results): a corrupted pattern gives wrong numbers in the GEMM, nothing else.
__device__ __forceinline__ uint16_t with_ordered_nibbles(unsigned word) {
  unsigned ordered = 0;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const unsigned nibble = (word >> (4 * g)) & 0xfu;
    ordered |= ((nibble & 3u) < (nibble >> 2) ? nibble : 0x4u) << (4 * g);
  }
  return static_cast<uint16_t>(ordered);
}

__global__ void __launch_bounds__(kThreads)
    nm24_metadata_from_positions_kernel(const uint8_t* __restrict__ positions, LayoutShape shape, Nm24Layout layout,
                                        uint16_t* __restrict__ metadata) {
  WordSite site;
  if (!claim_real_word(shape, layout, metadata, site)) return;
  const int64_t r = site.r, w = site.w;
  // Little-endian: byte 2w holds groups 4w, 4w+1; byte 2w+1 groups 4w+2, 4w+3.
  const uint8_t* row = positions + r * (2 * shape.words);
  metadata[site.offset] = with_ordered_nibbles(row[2 * w] | (row[2 * w + 1] << 8));
}

bool shape_ok(int64_t rows, int64_t cols, Nm24Layout layout) {
  if (rows < 1 || cols < 16 || cols % 16 != 0) return false;
  if (layout == Nm24Layout::sm80 && (rows % 32 != 0 || cols % 32 != 0)) return false;
  return layout == Nm24Layout::natural || layout == Nm24Layout::sm80 || sm90_num_k(layout) > 0;
}

}  // namespace

size_t nm24_metadata_words(int64_t rows, int64_t cols, Nm24Layout layout) {
  if (!shape_ok(rows, cols, layout)) return 0;
  const LayoutShape s = layout_shape(rows, cols, layout);
  return static_cast<size_t>(s.padded_count());
}

int64_t nm24_metadata_offset(int64_t r, int64_t w, int64_t rows, int64_t cols, Nm24Layout layout) {
  if (!shape_ok(rows, cols, layout)) return -1;
  return metadata_offset(r, w, layout_shape(rows, cols, layout), layout);
}

cudaError_t nm24_compress(DType dtype, const void* dense, int64_t dense_row_stride, const uint8_t* mask,
                          int64_t mask_row_stride, int64_t rows, int64_t cols, Nm24Layout layout, void* values,
                          uint16_t* metadata, int* bad_groups, cudaStream_t stream) {
  if (!shape_ok(rows, cols, layout) || dense_row_stride < cols || dense_row_stride % 8 != 0 || !aligned16(dense) ||
      !aligned16(values))
    return cudaErrorInvalidValue;
  if (mask != nullptr && (mask_row_stride < cols || mask_row_stride % 16 != 0 || !aligned16(mask)))
    return cudaErrorInvalidValue;
  const LayoutShape s = layout_shape(rows, cols, layout);
  const unsigned blocks = detail::ceil_div(s.padded_count(), kThreads);
  const auto* src = static_cast<const uint16_t*>(dense);
  auto* dst = static_cast<uint16_t*>(values);
  if (dtype == DType::bfloat16) {
    nm24_compress_kernel<DType::bfloat16><<<blocks, kThreads, 0, stream>>>(src, dense_row_stride, mask, mask_row_stride,
                                                                         s, layout, dst, metadata, bad_groups);
  } else {
    nm24_compress_kernel<DType::float16><<<blocks, kThreads, 0, stream>>>(src, dense_row_stride, mask, mask_row_stride,
                                                                        s, layout, dst, metadata, bad_groups);
  }
  return cudaGetLastError();
}

cudaError_t nm24_metadata_from_positions(const uint8_t* positions, int64_t rows, int64_t cols, Nm24Layout layout,
                                         uint16_t* metadata, cudaStream_t stream) {
  if (!shape_ok(rows, cols, layout)) return cudaErrorInvalidValue;
  const LayoutShape s = layout_shape(rows, cols, layout);
  nm24_metadata_from_positions_kernel<<<detail::ceil_div(s.padded_count(), kThreads), kThreads, 0, stream>>>(
      positions, s, layout, metadata);
  return cudaGetLastError();
}

}  // namespace sparsekernels::cuda
