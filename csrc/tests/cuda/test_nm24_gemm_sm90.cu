// CUTLASS sm90 (sparse wgmma) 2:4 GEMM against a float64 CPU reference, with the weight compressed on
// the GPU by nm24_compress ("sm90" layout): checks the metadata layout and the GEMM together
// (nm24_gemm_check.cuh). Exit 77 (skipped) without a Hopper GPU (compute capability 9.x).
#include <cstdio>

#include "cuda/nm24_gemm_sm90.cuh"
#include "nm24_gemm_check.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

int main() {
  require_gpu();
  if (device_major() != 9) {
    std::printf("SKIP: needs a Hopper GPU (compute capability 9.x)\n");
    return kSkipped;
  }
  // This build has sm_90a code, so the image check must pass (else the bindings would fall back).
  if (!nm24_gemm_sm90_runnable()) {
    std::fprintf(stderr, "FAIL: nm24_gemm_sm90_runnable() is false on a 9.x GPU with an sm_90a build\n");
    return 1;
  }
  const Nm24GemmUnderTest gemm{"nm24_gemm_sm90", Nm24Layout::sm90, /*writes_transposed=*/false, &nm24_gemm_sm90};
  Random rng(13);
  bool ok = true;
  ok = check_nm24_gemm(gemm, 128, 128, 8, DType::bfloat16, rng) && ok;
  ok = check_nm24_gemm(gemm, 96, 256, 24, DType::float16, rng) && ok;
  ok = check_nm24_gemm(gemm, 200, 384, 136, DType::bfloat16, rng) && ok;  // partial tiles in M and N
  ok = check_nm24_gemm(gemm, 256, 1024, 256, DType::bfloat16, rng) && ok;
  ok = !nm24_gemm_sm90_supported(100, 128, 8 + 1) && !nm24_gemm_sm90_supported(128, 96, 8) && ok;
  return ok ? 0 : 1;
}
