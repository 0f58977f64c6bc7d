// Host-only check (no GPU needed) of the metadata layouts of nm24_compress.cu against CUTLASS's own
// code: sm80 against cutlass::reorder_meta into ColumnMajorInterleaved<2> (what SparseGemm reads),
// and the sm_90 layouts against Sm90GemmSparseConfig<16-bit A, MinTileShapeK>::fill_layoutE, the
// CuTe layout the sm_90 sparse collective reads. Built only with the CUTLASS headers.
#include <cstdio>
#include <vector>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
#include "cutlass/layout/matrix.h"
#include "cutlass/tensor_ref.h"
#include "cutlass/util/host_reorder.h"
#include "cuda/nm24_compress.cuh"

using namespace sparsekernels::cuda;

namespace {

bool check_sm80(int rows, int cols) {
  const int words = cols / 16;
  std::vector<uint16_t> natural(rows * words), reordered(rows * words, 0xffff);
  for (int i = 0; i < rows * words; ++i) natural[i] = static_cast<uint16_t>(i);
  using LayoutE = cutlass::layout::ColumnMajorInterleaved<2>;
  cutlass::TensorRef<uint16_t, cutlass::layout::RowMajor> src(natural.data(), cutlass::layout::RowMajor(words));
  cutlass::TensorRef<uint16_t, LayoutE> dst(reordered.data(), LayoutE::packed({rows, words}));
  cutlass::reorder_meta(dst, src, {rows, 1, words});
  for (int r = 0; r < rows; ++r)
    for (int w = 0; w < words; ++w) {
      const int64_t offset = nm24_metadata_offset(r, w, rows, cols, Nm24Layout::sm80);
      if (offset < 0 || reordered[offset] != natural[r * words + w]) {
        std::printf("FAIL sm80 %dx%d: word (%d, %d) at %lld\n", rows, cols, r, w, (long long)offset);
        return false;
      }
    }
  std::printf("ok   sm80 %dx%d\n", rows, cols);
  return true;
}

template <int kMinTileK>
bool check_sm90(int rows, int cols, Nm24Layout layout) {
  using Config = cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, cutlass::bfloat16_t>, cute::GMMA::Major::K,
                                               cute::sparse_elem<8, uint8_t>, cute::Int<kMinTileK>>;
  const auto layout_e = Config::fill_layoutE(cute::make_tuple(rows, 8, cols, 1));
  // Offsets are in logical elements; 16 of them per 16-bit word (2 bits per kept value).
  const int64_t words = static_cast<int64_t>(cute::cosize(layout_e)) / 16;
  if (words != static_cast<int64_t>(nm24_metadata_words(rows, cols, layout))) {
    std::printf("FAIL sm90 MinTileK=%d %dx%d: %lld words, nm24_metadata_words says %zu\n", kMinTileK, rows, cols,
                (long long)words, nm24_metadata_words(rows, cols, layout));
    return false;
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; c += 16) {
      const int64_t logical = layout_e(r, c, 0);
      const int64_t offset = nm24_metadata_offset(r, c / 16, rows, cols, layout);
      if (logical % 16 != 0 || logical / 16 != offset) {
        std::printf("FAIL sm90 MinTileK=%d %dx%d: (%d, %d): CuTe %lld, ours %lld words\n", kMinTileK, rows, cols, r, c,
                    (long long)logical, (long long)offset);
        return false;
      }
    }
  std::printf("ok   sm90 MinTileK=%d %dx%d\n", kMinTileK, rows, cols);
  return true;
}

}  // namespace

int main() {
  bool ok = true;
  for (auto [rows, cols] : {std::pair{32, 32}, {64, 96}, {96, 64}, {128, 256}}) ok = check_sm80(rows, cols) && ok;
  for (auto [rows, cols] : {std::pair{64, 128}, {130, 288}, {1, 16}, {200, 512}}) {
    ok = check_sm90<128>(rows, cols, Nm24Layout::sm90) && ok;
    ok = check_sm90<64>(rows, cols, Nm24Layout::sm90_k64) && ok;
    ok = check_sm90<32>(rows, cols, Nm24Layout::sm90_k32) && ok;
  }
  return ok ? 0 : 1;
}
