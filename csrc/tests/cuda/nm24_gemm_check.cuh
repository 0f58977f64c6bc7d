// The check shared by the CUTLASS 2:4 GEMM test programs (test_nm24_gemm_sm80.cu and
// test_nm24_gemm_sm90.cu): the GEMM against a float64 CPU reference, with the weight compressed on
// the GPU by nm24_compress in the GEMM's metadata layout, so that one run checks the metadata layout
// and the GEMM together. Each program keeps its own cases, its own GPU requirement and its own
// CTest entry; only the set-up and the comparison live here.
#pragma once

#include <cstdio>
#include <vector>

#include "cuda/nm24_compress.cuh"
#include "test_util.cuh"

namespace sparsekernels::cuda::test {

// One GEMM under test. The launchers of nm24_gemm_sm80.cuh and nm24_gemm_sm90.cuh share this
// signature; they differ in the metadata layout they read and in the orientation of the output.
struct Nm24GemmUnderTest {
  const char* name;
  Nm24Layout layout;
  bool writes_transposed;  // true: y_t [out, tokens] (sm80); false: y [tokens, out] (sm90)
  cudaError_t (*launch)(DType dtype, const void* values, const uint16_t* metadata, const void* x, void* y,
                        int64_t out_features, int64_t in_features, int64_t tokens, cudaStream_t stream);
};

// Compute capability major of the current device (after require_gpu()).
inline int device_major() {
  int device = 0, major = 0;
  SK_CHECK_CUDA(cudaGetDevice(&device));
  SK_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// Random W [out, in] and x [tokens, in]; W compressed by nm24_compress (magnitude selection), then
// the GEMM, compared with x @ W.T on the magnitude-pruned weight in the GEMM's output orientation.
inline bool check_nm24_gemm(const Nm24GemmUnderTest& gemm, int64_t out, int64_t in, int64_t tokens, DType dtype,
                            Random& rng) {
  std::vector<uint16_t> w(out * in), x(tokens * in);
  for (auto& v : w) v = to_bits(rng.uniform(-1, 1), dtype);
  for (auto& v : x) v = to_bits(rng.uniform(-1, 1), dtype);
  // Reference on the magnitude-pruned weight (top 2 |w| of 4, ties to the lower column).
  std::vector<float> pruned(out * in, 0.f);
  for (int64_t g = 0; g < out * in / 4; ++g) {
    float s[4];
    for (int t = 0; t < 4; ++t) s[t] = std::fabs(from_bits(w[4 * g + t], dtype));
    int i0 = 0, i1 = 1;
    top2_of_4(s, i0, i1);
    pruned[4 * g + i0] = from_bits(w[4 * g + i0], dtype);
    pruned[4 * g + i1] = from_bits(w[4 * g + i1], dtype);
  }
  // Row-major output as the GEMM writes it: y_t [out, tokens] or y [tokens, out].
  const int64_t y_rows = gemm.writes_transposed ? out : tokens, y_cols = gemm.writes_transposed ? tokens : out;
  std::vector<float> want(out * tokens);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t t = 0; t < tokens; ++t) {
      double sum = 0;
      for (int64_t k = 0; k < in; ++k) sum += double(pruned[o * in + k]) * from_bits(x[t * in + k], dtype);
      want[gemm.writes_transposed ? o * tokens + t : t * out + o] = static_cast<float>(sum);
    }

  DeviceBuffer<uint16_t> d_w(w), d_x(x), d_values(out * in / 2), d_meta(nm24_metadata_words(out, in, gemm.layout)),
      d_y(out * tokens);
  SK_CHECK_CUDA(nm24_compress(dtype, d_w.ptr, in, nullptr, 0, out, in, gemm.layout, d_values.ptr, d_meta.ptr,
                              nullptr, nullptr));
  SK_CHECK_CUDA(gemm.launch(dtype, d_values.ptr, d_meta.ptr, d_x.ptr, d_y.ptr, out, in, tokens, nullptr));
  SK_CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = rows_to_float(d_y.to_host(), y_rows, y_cols, y_cols, dtype);
  char what[128];
  std::snprintf(what, sizeof what, "%s out=%lld in=%lld tokens=%lld dtype=%d", gemm.name, (long long)out,
                (long long)in, (long long)tokens, static_cast<int>(dtype));
  return report_close(got, want, rtol_for(dtype), 3e-2f, what);
}

}  // namespace sparsekernels::cuda::test
