// CUTLASS sm80 2:4 GEMM against a float64 CPU reference, with the weight compressed on the GPU by
// nm24_compress (sm80 layout): checks the metadata layout and the GEMM together. Exit 77 (skipped)
// without a GPU of compute capability 8.0 or newer.
#include <cstdio>
#include <vector>

#include "cuda/nm24_compress.cuh"
#include "cuda/nm24_gemm_sm80.cuh"
#include "test_util.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

namespace {

bool run(int64_t out, int64_t in, int64_t tokens, DType dtype, Random& rng) {
  std::vector<uint16_t> w(out * in), x(tokens * in);
  for (auto& v : w) v = to_bits(rng.uniform(-1, 1), dtype);
  for (auto& v : x) v = to_bits(rng.uniform(-1, 1), dtype);
  // Reference on the magnitude-pruned weight (top 2 |w| of 4, ties to the lower column).
  std::vector<float> pruned(out * in, 0.f);
  for (int64_t g = 0; g < out * in / 4; ++g) {
    float s[4];
    for (int t = 0; t < 4; ++t) s[t] = std::fabs(from_bits(w[4 * g + t], dtype));
    int best = 0;
    for (int t = 1; t < 4; ++t) if (s[t] > s[best]) best = t;
    int second = best == 0 ? 1 : 0;
    for (int t = 0; t < 4; ++t) if (t != best && s[t] > s[second]) second = t;
    pruned[4 * g + best] = from_bits(w[4 * g + best], dtype);
    pruned[4 * g + second] = from_bits(w[4 * g + second], dtype);
  }
  std::vector<float> want(out * tokens);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t t = 0; t < tokens; ++t) {
      double sum = 0;
      for (int64_t k = 0; k < in; ++k) sum += double(pruned[o * in + k]) * from_bits(x[t * in + k], dtype);
      want[o * tokens + t] = static_cast<float>(sum);
    }

  DeviceBuffer<uint16_t> d_w(w), d_x(x), d_values(out * in / 2), d_meta(nm24_metadata_words(out, in, Nm24Layout::sm80)),
      d_y(out * tokens);
  SK_CHECK_CUDA(nm24_compress(dtype, d_w.ptr, in, nullptr, 0, out, in, Nm24Layout::sm80, d_values.ptr, d_meta.ptr,
                              nullptr, nullptr));
  SK_CHECK_CUDA(nm24_gemm_sm80(dtype, d_values.ptr, d_meta.ptr, d_x.ptr, d_y.ptr, out, in, tokens, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());
  const auto y = d_y.to_host();
  std::vector<float> got(y.size());
  for (size_t i = 0; i < y.size(); ++i) got[i] = from_bits(y[i], dtype);
  char what[128];
  std::snprintf(what, sizeof what, "nm24_gemm_sm80 out=%lld in=%lld tokens=%lld dtype=%d", (long long)out,
                (long long)in, (long long)tokens, static_cast<int>(dtype));
  const bool ok = all_close(got, want, dtype == DType::bfloat16 ? 1.6e-2f : 2e-3f, 3e-2f, what);
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  return ok;
}

}  // namespace

int main() {
  require_gpu();
  int device = 0, major = 0;
  SK_CHECK_CUDA(cudaGetDevice(&device));
  SK_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) {
    std::printf("SKIP: needs compute capability 8.0+\n");
    return kSkipped;
  }
  Random rng(13);
  bool ok = true;
  ok = run(128, 128, 8, DType::bfloat16, rng) && ok;
  ok = run(96, 256, 24, DType::float16, rng) && ok;
  ok = run(256, 512, 136, DType::bfloat16, rng) && ok;
  ok = !nm24_gemm_sm80_supported(100, 128, 8) && !nm24_gemm_sm80_supported(128, 96, 8) &&
       !nm24_gemm_sm80_supported(128, 128, 3) && ok;
  return ok ? 0 : 1;
}
