// bsr_decode_linear against a float64 CPU reference: every block size, int32 and int64 indexes,
// empty block rows, odd row counts, bias, strided x and y, and corrupted indexes (offsets past nnz,
// negative or decreasing offsets, block columns out of range), for which the kernel must give the
// result of the clamped index (and, under compute-sanitizer, read nothing out of bounds). Exit 77
// (skipped) without a GPU.
#include <cstdio>
#include <vector>

#include "cuda/bsr_decode.cuh"
#include "test_util.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

namespace {

struct Case {
  int64_t rows, out, in, block;
  float density;
  DType dtype;
  bool int64_index, bias;
  int64_t x_pad, y_pad;  // extra elements per row (x_pad a multiple of 8)
  bool corrupt = false;  // corrupt the index after building it
};

int64_t clamp(int64_t value, int64_t low, int64_t high) { return value < low ? low : (value > high ? high : value); }

template <typename index_t>
bool run_typed(const Case& c, Random& rng) {
  const int64_t b = c.block, block_rows = c.out / b, block_cols = c.in / b;
  const int64_t ldx = c.in + c.x_pad, ldy = c.out + c.y_pad;
  std::vector<index_t> offsets(1, 0), cols;
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc)
      if (br != 1 && rng.uniform(0, 1) < c.density) cols.push_back(static_cast<index_t>(bc));  // block row 1 empty
    offsets.push_back(static_cast<index_t>(cols.size()));
  }
  const int64_t nnz = static_cast<int64_t>(cols.size());
  if (c.corrupt && nnz >= 2 && block_rows >= 3) {
    cols[0] = static_cast<index_t>(block_cols + 7);          // past the last block column
    cols[nnz - 1] = static_cast<index_t>(-5);                // negative
    offsets[1] = static_cast<index_t>(-2);                   // negative (row 0 empty, row 1 from 0)
    offsets[2] = static_cast<index_t>(nnz + 3);              // past nnz, and above offsets[3]
    offsets[block_rows] = static_cast<index_t>(nnz + 1000);  // the last row runs past nnz
  }
  std::vector<uint16_t> x(c.rows * ldx, to_bits(1e4f, c.dtype)), values(nnz * b * b), bias(c.out);
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t k = 0; k < c.in; ++k) x[r * ldx + k] = to_bits(rng.uniform(-1, 1), c.dtype);
  for (auto& v : values) v = to_bits(rng.uniform(-1, 1), c.dtype);
  for (auto& v : bias) v = to_bits(rng.uniform(-1, 1), c.dtype);

  // Reference on the index as the kernel clamps it (a valid index is unchanged).
  std::vector<float> want(c.rows * c.out);
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t br = 0; br < block_rows; ++br)
      for (int64_t i = 0; i < b; ++i) {
        double sum = c.bias ? from_bits(bias[br * b + i], c.dtype) : 0.0;
        const int64_t begin = clamp(offsets[br], 0, nnz), end = clamp(offsets[br + 1], begin, nnz);
        for (int64_t k = begin; k < end; ++k)
          for (int64_t j = 0; j < b; ++j)
            sum += double(from_bits(values[(k * b + i) * b + j], c.dtype)) *
                   from_bits(x[r * ldx + clamp(cols[k], 0, block_cols - 1) * b + j], c.dtype);
        want[r * c.out + br * b + i] = static_cast<float>(sum);
      }

  const BsrDecodeProblem problem{c.rows, c.out, c.in, b, nnz, ldx, ldy};
  DeviceBuffer<uint16_t> d_x(x), d_values(values), d_bias(bias), d_y(std::vector<uint16_t>(c.rows * ldy, 0));
  DeviceBuffer<index_t> d_offsets(offsets), d_cols(cols);
  if (!bsr_decode_supported(problem, d_x.ptr, d_values.ptr)) {
    std::fprintf(stderr, "FAIL: case unexpectedly unsupported\n");
    return false;
  }
  SK_CHECK_CUDA(bsr_decode_linear(c.dtype, c.int64_index, d_x.ptr, d_values.ptr, d_offsets.ptr, d_cols.ptr,
                                  c.bias ? d_bias.ptr : nullptr, d_y.ptr, problem, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = rows_to_float(d_y.to_host(), c.rows, c.out, ldy, c.dtype);
  char what[160];
  std::snprintf(what, sizeof what, "bsr_decode M=%lld %lldx%lld b=%lld nnz=%lld int64=%d bias=%d corrupt=%d",
                (long long)c.rows, (long long)c.out, (long long)c.in, (long long)b, (long long)nnz, c.int64_index,
                c.bias, c.corrupt);
  return report_close(got, want, rtol_for(c.dtype), 2e-2f, what);
}

bool run(const Case& c, Random& rng) {
  return c.int64_index ? run_typed<int64_t>(c, rng) : run_typed<int32_t>(c, rng);
}

}  // namespace

int main() {
  require_gpu();
  Random rng(7);
  bool ok = true;
  const Case cases[] = {
      {1, 64, 64, 16, 0.5f, DType::bfloat16, false, false, 0, 0},
      {3, 96, 160, 32, 0.4f, DType::float16, true, true, 8, 5},
      {16, 256, 512, 64, 0.2f, DType::bfloat16, false, true, 0, 0},
      {5, 256, 384, 128, 0.5f, DType::bfloat16, true, false, 16, 1},
      {13, 512, 1024, 16, 0.1f, DType::float16, false, true, 0, 0},
      {8, 1024, 2048, 64, 0.1f, DType::bfloat16, false, true, 0, 0},
      {4, 256, 512, 16, 0.5f, DType::bfloat16, false, true, 0, 0, /*corrupt=*/true},
      {16, 512, 256, 128, 0.9f, DType::float16, true, false, 8, 0, /*corrupt=*/true},
  };
  for (const Case& c : cases) ok = run(c, rng) && ok;
  return ok ? 0 : 1;
}
