// 2:4 compression on the GPU: dense (or masked) 16-bit weight -> kept values + sparse-tensor-core
// metadata, and NMMatrix positions -> metadata. The layouts are documented, with a CPU reference,
// in sparsekernels/formats/nm24_metadata.py; the enum below names the same three.
#pragma once

#include <cstddef>
#include <cstdint>

#include "api.cuh"

namespace sparsekernels::cuda {

enum class Nm24Layout : int {
  natural = 0,   // uint16[rows, cols / 16], group 4w + j of a row in bits 4j..4j+3 of word w
  sm80 = 1,      // CUTLASS 2.x SparseGemm: reorder_meta + ColumnMajorInterleaved<2>; rows, cols % 32 == 0
  sm90 = 2,      // CUTLASS 3.x Sm90GemmSparseConfig, 16-bit A, MinTileShapeK 128 (NumK 4); padded 64 x 128
  sm90_k64 = 3,  // same, MinTileShapeK 64 (NumK 2); padded to 64 x 64
  sm90_k32 = 4,  // same, MinTileShapeK 32 (NumK 1); padded to 64 x 32
};

// Words (uint16) of metadata for a [rows, cols] weight; 0 when the layout cannot hold the shape
// (cols % 16 != 0, or sm80 with rows or cols not a multiple of 32).
size_t nm24_metadata_words(int64_t rows, int64_t cols, Nm24Layout layout);

// Word offset, in layout, of natural word (r, w) of a [rows, cols] weight (host side of the same
// function the kernels use; for layout tests). -1 when the layout cannot hold the shape.
int64_t nm24_metadata_offset(int64_t r, int64_t w, int64_t rows, int64_t cols, Nm24Layout layout);

// dense[rows, cols] (row stride dense_row_stride, 16-byte aligned rows) -> values[rows, cols / 2]
// (contiguous) and metadata in layout. Without mask: keep the 2 largest |w| of each group of 4
// (ties to the lower column, NaN counts as largest), as NMMatrix.from_dense. With mask (bytes, 0 or
// 1, [rows, cols] with row stride mask_row_stride, 16-byte aligned rows): keep the masked ones; a
// group whose mask does not hold exactly two ones increments *bad_groups (device int, may be null)
// and gets the first two set positions (or offsets 0, 1). Padding words (sm90 layouts) get valid nibbles.
cudaError_t nm24_compress(DType dtype, const void* dense, int64_t dense_row_stride, const uint8_t* mask,
                          int64_t mask_row_stride, int64_t rows, int64_t cols, Nm24Layout layout, void* values,
                          uint16_t* metadata, int* bad_groups, cudaStream_t stream);

// NMMatrix.positions of a 2:4 weight (uint8[rows, cols / 8], contiguous) -> metadata in layout.
// Positions are the natural words byte for byte, so this permutes 16-bit words; in passing, a nibble
// whose offsets do not increase (i0 >= i1: no valid pattern has one, but positions are not checked
// on the GPU) becomes 0x4 (offsets 0, 1), so that corrupted positions give the GEMMs valid metadata.
cudaError_t nm24_metadata_from_positions(const uint8_t* positions, int64_t rows, int64_t cols, Nm24Layout layout,
                                         uint16_t* metadata, cudaStream_t stream);

}  // namespace sparsekernels::cuda
