// CUTLASS 2.x sparse GEMM instantiations for bfloat16 and float16 (see nm24_gemm_sm80.cuh).
//
// Tile shapes follow CUTLASS's own 16-bit sparse sm80 configurations: 128x128x64 threadblock,
// 64x64x64 warps, m16n8k32 mma.sp, 3 stages; float32 accumulation. Untuned: a GPU visit should
// profile other tiles (and an sm_90a wgmma kernel, which this file does not have yet).
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_sparse.h"
#include "nm24_gemm_sm80.cuh"

namespace sparsekernels::cuda {
namespace {

template <typename Element>
using Sm80SparseGemm = cutlass::gemm::device::SparseGemm<
    Element, cutlass::layout::RowMajor,     // A: kept values of W, [out, in / 2]
    Element, cutlass::layout::ColumnMajor,  // B: x.T, i.e. x row-major [tokens, in]
    Element, cutlass::layout::RowMajor,     // C/D: y_t [out, tokens]
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 64>,
    cutlass::gemm::GemmShape<64, 64, 64>, cutlass::gemm::GemmShape<16, 8, 32>,
    cutlass::epilogue::thread::LinearCombination<Element, 128 / cutlass::sizeof_bits<Element>::value, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3>;

template <typename Element>
cudaError_t run(const void* values, const uint16_t* metadata, const void* x, void* y_t, int64_t out, int64_t in,
                int64_t tokens, cudaStream_t stream) {
  using Gemm = Sm80SparseGemm<Element>;
  static_assert(sizeof(typename Gemm::ElementE) == sizeof(uint16_t), "16-bit A uses 16-bit metadata words");
  using ElementE = typename Gemm::ElementE;
  const int m = static_cast<int>(out), n = static_cast<int>(tokens), k = static_cast<int>(in);
  auto* a = const_cast<Element*>(static_cast<const Element*>(values));
  auto* b = const_cast<Element*>(static_cast<const Element*>(x));
  auto* d = static_cast<Element*>(y_t);
  auto* e = reinterpret_cast<ElementE*>(const_cast<uint16_t*>(metadata));
  typename Gemm::Arguments arguments{
      {m, n, k},
      {a, typename Gemm::LayoutA(k / 2)},
      {b, typename Gemm::LayoutB(k)},
      {d, typename Gemm::LayoutC(n)},  // C unused (beta = 0)
      {d, typename Gemm::LayoutC(n)},
      {e, Gemm::LayoutE::packed({m, k / Gemm::kSparse / Gemm::kElementsPerElementE})},
      {1.f, 0.f},
      1};
  Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.initialize(arguments, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm(stream) != cutlass::Status::kSuccess) {
    const cudaError_t status = cudaGetLastError();
    return status != cudaSuccess ? status : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace

bool nm24_gemm_sm80_supported(int64_t out, int64_t in, int64_t tokens) {
  return gemm_extents_fit_int(out, in, tokens) && out % 32 == 0 && in % 64 == 0 && tokens % 8 == 0;
}

bool nm24_gemm_sm80_runnable() {
  const int major = current_device_major();
  // Both dtypes are instantiated here with the same flags: the bfloat16 kernel stands for both.
  using Kernel = typename Sm80SparseGemm<cutlass::bfloat16_t>::GemmKernel;
  return (major == 8 || major == 9) &&
         kernel_ptx_version(reinterpret_cast<const void*>(&cutlass::Kernel<Kernel>)) >= 80;
}

cudaError_t nm24_gemm_sm80(DType dtype, const void* values, const uint16_t* metadata, const void* x, void* y_t,
                           int64_t out, int64_t in, int64_t tokens, cudaStream_t stream) {
  if (!nm24_gemm_sm80_supported(out, in, tokens) || !aligned16(values) || !aligned16(metadata) || !aligned16(x) ||
      !aligned16(y_t))
    return cudaErrorInvalidValue;
  if (!nm24_gemm_sm80_runnable()) return cudaErrorNoKernelImageForDevice;
  return dtype == DType::bfloat16
             ? run<cutlass::bfloat16_t>(values, metadata, x, y_t, out, in, tokens, stream)
             : run<cutlass::half_t>(values, metadata, x, y_t, out, in, tokens, stream);
}

}  // namespace sparsekernels::cuda
