// CUTLASS sm80 2:4 GEMM against a float64 CPU reference, with the weight compressed on the GPU by
// nm24_compress (sm80 layout): checks the metadata layout and the GEMM together (nm24_gemm_check.cuh).
// Exit 77 (skipped) without a GPU of compute capability 8.x or 9.x.
#include <cstdio>

#include "cuda/nm24_gemm_sm80.cuh"
#include "nm24_gemm_check.cuh"

using namespace sparsekernels::cuda;
using namespace sparsekernels::cuda::test;

int main() {
  require_gpu();
  if (device_major() != 8 && device_major() != 9) {
    std::printf("SKIP: needs compute capability 8.x or 9.x (the archs the GEMM is taken on)\n");
    return kSkipped;
  }
  if (!nm24_gemm_sm80_runnable()) {
    std::fprintf(stderr, "FAIL: nm24_gemm_sm80_runnable() is false on an 8.x/9.x GPU with an sm_80 build\n");
    return 1;
  }
  const Nm24GemmUnderTest gemm{"nm24_gemm_sm80", Nm24Layout::sm80, /*writes_transposed=*/true, &nm24_gemm_sm80};
  Random rng(13);
  bool ok = true;
  ok = check_nm24_gemm(gemm, 128, 128, 8, DType::bfloat16, rng) && ok;
  ok = check_nm24_gemm(gemm, 96, 256, 24, DType::float16, rng) && ok;
  ok = check_nm24_gemm(gemm, 256, 512, 136, DType::bfloat16, rng) && ok;
  ok = !nm24_gemm_sm80_supported(100, 128, 8) && !nm24_gemm_sm80_supported(128, 96, 8) &&
       !nm24_gemm_sm80_supported(128, 128, 3) && ok;
  return ok ? 0 : 1;
}
