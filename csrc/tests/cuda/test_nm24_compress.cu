// nm24_compress and nm24_metadata_from_positions against a CPU reference: magnitude selection (ties,
// NaN), masks (including bad groups), and the three metadata layouts. The layout formulas are the
// ones of sparsekernels/formats/nm24_metadata.py, which the Python tests check against torch's
// CUTLASS conversion and the CuTe atom. Exit 77 (skipped) without a GPU.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cuda/nm24_compress.cuh"
#include "test_util.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

namespace {

int64_t host_offset(int64_t r, int64_t w, int64_t rows, int64_t words, Nm24Layout layout) {
  if (layout == Nm24Layout::natural) return r * words + w;
  if (layout == Nm24Layout::sm80) {
    int64_t row = 32 * (r / 32) + 4 * (r % 8) + (r % 32) / 8, col = w;
    if (row % 2 == 0 && col % 2 == 1) ++row, --col;
    else if (row % 2 == 1 && col % 2 == 0) --row, ++col;
    return (col / 2) * (2 * rows) + 2 * row + col % 2;
  }
  const int64_t k = layout == Nm24Layout::sm90 ? 4 : layout == Nm24Layout::sm90_k64 ? 2 : 1;
  const int64_t padded_rows = (rows + 63) / 64 * 64, v = w % (2 * k);
  return (r % 16) / 8 + 2 * (v / 2) + 2 * k * (r % 8) + 16 * k * (v % 2) + 32 * k * ((r % 64) / 16) +
         128 * k * (r / 64) + 2 * k * padded_rows * (w / (2 * k));
}

float score(float w) { return std::isnan(w) ? INFINITY : std::fabs(w); }

bool run(int64_t rows, int64_t cols, Nm24Layout layout, DType dtype, bool masked, Random& rng) {
  std::vector<uint16_t> dense(rows * cols);
  std::vector<uint8_t> mask(rows * cols, 0);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const int kind = rng.below(20);
    // Mostly random values, with ties (equal magnitudes) and the odd NaN.
    const float v = kind == 0 ? NAN : kind < 4 ? 0.5f * (rng.below(2) ? 1.f : -1.f) : rng.uniform(-2, 2);
    dense[i] = to_bits(v, dtype);
  }
  int64_t bad_expected = 0;
  for (int64_t g = 0; g < rows * cols / 4; ++g) {
    if (masked && g % 97 == 5) {  // a bad group: three ones
      mask[4 * g] = mask[4 * g + 1] = mask[4 * g + 3] = 1;
      ++bad_expected;
      continue;
    }
    int picked = 0;
    while (picked < 2) {
      const int t = rng.below(4);
      if (!mask[4 * g + t]) mask[4 * g + t] = 1, ++picked;
    }
  }
  // Reference: natural words and kept values.
  const int64_t words = cols / 16;
  std::vector<uint16_t> natural(rows * words, 0), want_values(rows * cols / 2);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 4; ++g) {
      const uint16_t* grp = &dense[r * cols + 4 * g];
      int i0 = 0, i1 = 1;
      if (!masked) {
        float s[4];
        for (int t = 0; t < 4; ++t) s[t] = score(from_bits(grp[t], dtype));
        top2_of_4(s, i0, i1);
      } else {
        int found = 0;
        for (int t = 0; t < 4; ++t)
          if (mask[r * cols + 4 * g + t]) {
            if (found == 0) i0 = t;
            if (found == 1) i1 = t;
            ++found;
          }
      }
      want_values[r * cols / 2 + 2 * g] = grp[i0];
      want_values[r * cols / 2 + 2 * g + 1] = grp[i1];
      natural[r * words + g / 4] |= static_cast<uint16_t>((i0 | (i1 << 2)) << (4 * (g % 4)));
    }
  const size_t size = nm24_metadata_words(rows, cols, layout);
  std::vector<uint16_t> want_meta(size, 0x4444);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t w = 0; w < words; ++w) want_meta[host_offset(r, w, rows, words, layout)] = natural[r * words + w];

  DeviceBuffer<uint16_t> d_dense(dense), d_values(rows * cols / 2), d_meta(size), d_meta2(size);
  DeviceBuffer<uint8_t> d_mask(mask);
  DeviceBuffer<int> d_bad(std::vector<int>{0});
  SK_CHECK_CUDA(nm24_compress(dtype, d_dense.ptr, cols, masked ? d_mask.ptr : nullptr, cols, rows, cols, layout,
                              d_values.ptr, d_meta.ptr, d_bad.ptr, nullptr));
  // Positions (natural words as little-endian bytes) -> the same layout.
  std::vector<uint8_t> positions(rows * cols / 8);
  for (size_t i = 0; i < natural.size(); ++i) positions[2 * i] = natural[i] & 0xff, positions[2 * i + 1] = natural[i] >> 8;
  DeviceBuffer<uint8_t> d_positions(positions);
  SK_CHECK_CUDA(nm24_metadata_from_positions(d_positions.ptr, rows, cols, layout, d_meta2.ptr, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());

  bool ok = d_values.to_host() == want_values && d_meta.to_host() == want_meta && d_meta2.to_host() == want_meta &&
            d_bad.to_host()[0] == bad_expected;
  std::printf("%s nm24_compress %lldx%lld layout=%d dtype=%d masked=%d\n", ok ? "ok  " : "FAIL", (long long)rows,
              (long long)cols, static_cast<int>(layout), static_cast<int>(dtype), masked);
  return ok;
}

// Corrupted positions (every 16-bit pattern, i.e. nibbles with i0 >= i1) -> natural metadata: each
// nibble whose offsets do not increase becomes 0x4 (offsets 0, 1), every other one is kept.
bool run_unordered_positions() {
  const int64_t rows = 1 << 16, cols = 16;  // one word per row, word r = r: every pattern once
  std::vector<uint8_t> positions(rows * cols / 8);
  std::vector<uint16_t> want(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const unsigned word = static_cast<unsigned>(r);
    positions[2 * r] = word & 0xff, positions[2 * r + 1] = word >> 8;
    unsigned ordered = 0;
    for (int g = 0; g < 4; ++g) {
      const unsigned nibble = (word >> (4 * g)) & 0xfu;
      ordered |= ((nibble & 3u) < (nibble >> 2) ? nibble : 0x4u) << (4 * g);
    }
    want[r] = static_cast<uint16_t>(ordered);
  }
  DeviceBuffer<uint8_t> d_positions(positions);
  DeviceBuffer<uint16_t> d_meta(nm24_metadata_words(rows, cols, Nm24Layout::natural));
  SK_CHECK_CUDA(nm24_metadata_from_positions(d_positions.ptr, rows, cols, Nm24Layout::natural, d_meta.ptr, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());
  const bool ok = d_meta.to_host() == want;
  std::printf("%s nm24_metadata_from_positions with unordered nibbles\n", ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace

int main() {
  require_gpu();
  Random rng(11);
  bool ok = true;
  ok = run(3, 48, Nm24Layout::natural, DType::bfloat16, false, rng) && ok;
  ok = run(64, 96, Nm24Layout::sm80, DType::bfloat16, false, rng) && ok;
  ok = run(96, 64, Nm24Layout::sm80, DType::float16, true, rng) && ok;
  ok = run(70, 80, Nm24Layout::sm90, DType::bfloat16, true, rng) && ok;
  ok = run(128, 256, Nm24Layout::sm90, DType::float16, false, rng) && ok;
  ok = run(70, 80, Nm24Layout::sm90_k64, DType::bfloat16, false, rng) && ok;
  ok = run(130, 48, Nm24Layout::sm90_k32, DType::float16, true, rng) && ok;
  ok = run_unordered_positions() && ok;
  // Unsupported shapes are refused without a launch.
  ok = nm24_metadata_words(16, 32, Nm24Layout::sm80) == 0 && nm24_metadata_words(4, 24, Nm24Layout::natural) == 0 && ok;
  return ok ? 0 : 1;
}
