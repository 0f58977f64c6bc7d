// nm_decode_linear against a float64 CPU reference: every n:m, odd row counts, bias, strided x and
// y, split-K forced on and off, and corrupted m = 8 position codes (8..15, in the last group of the
// last row too), which the kernel must read modulo 8 (and, under compute-sanitizer, read nothing
// out of bounds). Exit 77 (skipped) without a GPU.
#include <cstdio>
#include <vector>

#include "cuda/nm_decode.cuh"
#include "test_util.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

namespace {

struct Case {
  int64_t rows, out, in, n, m;
  DType dtype;
  bool bias;
  int64_t x_pad, y_pad;  // extra elements per row of x / y
  int sm_count;          // 0: no split; large: many splits
  bool corrupt = false;  // m = 8: codes 8 + t for offset t in some groups (read modulo 8: still t)
};

bool run(const Case& c, Random& rng) {
  const int64_t kept = c.in / c.m * c.n;
  const int bits = c.m == 2 ? 1 : (c.m == 4 ? 2 : 4);
  const int64_t position_bytes = kept * bits / 8;
  const int64_t ldx = c.in + c.x_pad, ldy = c.out + c.y_pad;
  std::vector<uint16_t> x(c.rows * ldx, to_bits(1e4f, c.dtype)), values(c.out * kept), bias(c.out);
  std::vector<uint8_t> positions(c.out * position_bytes, 0);
  std::vector<int64_t> columns(c.out * kept);
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t k = 0; k < c.in; ++k) x[r * ldx + k] = to_bits(rng.uniform(-1, 1), c.dtype);
  for (auto& b : bias) b = to_bits(rng.uniform(-1, 1), c.dtype);
  for (int64_t o = 0; o < c.out; ++o) {
    for (int64_t g = 0; g < c.in / c.m; ++g) {
      // n distinct increasing offsets: a random subset of 0..m-1.
      std::vector<int> chosen(c.m, 0);
      for (int64_t picked = 0; picked < c.n;) {
        const int t = rng.below(static_cast<int>(c.m));
        if (!chosen[t]) chosen[t] = 1, ++picked;
      }
      int64_t j = g * c.n;
      for (int t = 0; t < c.m; ++t) {
        if (!chosen[t]) continue;
        values[o * kept + j] = to_bits(rng.uniform(-1, 1), c.dtype);
        columns[o * kept + j] = g * c.m + t;
        // Corrupted: the first and the last group of the first and the last row get code 8 + t.
        const bool corrupt = c.corrupt && c.m == 8 && (o == 0 || o == c.out - 1) && (g == 0 || g == c.in / c.m - 1);
        const int code = corrupt ? 8 + t : t;
        positions[o * position_bytes + j * bits / 8] |= static_cast<uint8_t>(code << ((j % (8 / bits)) * bits));
        ++j;
      }
    }
  }
  std::vector<float> want(c.rows * c.out);
  for (int64_t r = 0; r < c.rows; ++r)
    for (int64_t o = 0; o < c.out; ++o) {
      double sum = c.bias ? from_bits(bias[o], c.dtype) : 0.0;
      for (int64_t j = 0; j < kept; ++j)
        sum += double(from_bits(values[o * kept + j], c.dtype)) * from_bits(x[r * ldx + columns[o * kept + j]], c.dtype);
      want[r * c.out + o] = static_cast<float>(sum);
    }

  const NMDecodeProblem problem{c.rows, c.out, c.in, c.n, c.m, ldx, ldy};
  DeviceBuffer<uint16_t> d_x(x), d_values(values), d_bias(bias), d_y(std::vector<uint16_t>(c.rows * ldy, 0));
  DeviceBuffer<uint8_t> d_positions(positions);
  if (!nm_decode_supported(problem, d_values.ptr)) {
    std::fprintf(stderr, "FAIL: case unexpectedly unsupported\n");
    return false;
  }
  const size_t workspace_bytes = nm_decode_workspace_bytes(problem, c.sm_count);
  DeviceBuffer<float> workspace(workspace_bytes / sizeof(float) + 1);
  SK_CHECK_CUDA(nm_decode_linear(c.dtype, d_x.ptr, d_values.ptr, d_positions.ptr, c.bias ? d_bias.ptr : nullptr,
                                 d_y.ptr, workspace.ptr, problem, c.sm_count, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = rows_to_float(d_y.to_host(), c.rows, c.out, ldy, c.dtype);
  char what[160];
  std::snprintf(what, sizeof what, "nm_decode M=%lld %lldx%lld %lld:%lld bias=%d splits_sm=%d workspace=%zu corrupt=%d",
                (long long)c.rows, (long long)c.out, (long long)c.in, (long long)c.n, (long long)c.m, c.bias,
                c.sm_count, workspace_bytes, c.corrupt);
  return report_close(got, want, rtol_for(c.dtype), 2e-2f, what);
}

}  // namespace

int main() {
  require_gpu();
  Random rng(5);
  bool ok = true;
  const Case cases[] = {
      {1, 64, 64, 2, 4, DType::bfloat16, false, 0, 0, 0},
      {3, 96, 256, 2, 4, DType::bfloat16, true, 8, 3, 132},
      {7, 33, 512, 2, 4, DType::float16, true, 0, 0, 1000},
      {16, 130, 1024, 2, 4, DType::bfloat16, true, 24, 0, 132},
      {5, 40, 128, 1, 2, DType::float16, false, 0, 1, 132},
      {2, 17, 256, 3, 8, DType::bfloat16, true, 0, 0, 1000},
      {9, 50, 512, 1, 16, DType::bfloat16, false, 0, 0, 132},
      {16, 64, 4096, 2, 4, DType::float16, true, 0, 0, 0},  // splits forced by the shared-memory x tile only
      {11, 257, 8192, 2, 4, DType::bfloat16, true, 0, 0, 132},
      {3, 40, 256, 2, 8, DType::bfloat16, true, 0, 0, 0, /*corrupt=*/true},
      {16, 33, 512, 5, 8, DType::float16, false, 0, 0, 132, /*corrupt=*/true},
  };
  for (const Case& c : cases) ok = run(c, rng) && ok;
  return ok ? 0 : 1;
}
