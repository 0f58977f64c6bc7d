// CUTLASS 3.x sparse GEMM instantiations for Hopper, bfloat16 and float16 (see nm24_gemm_sm90.cuh).
//
// Configuration after CUTLASS's example 62 (16-bit sparse A): 128x128x128 tiles, 1x2x1 clusters,
// automatic schedules, float32 accumulation. The tile K of 128 fixes the metadata layout
// (MinTileShapeK = min(tile K, 128) = 128: layout "sm90"). Untuned and not run here: a GPU visit
// must test it (tests/test_cuda.py) before any result is trusted.
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "nm24_gemm_sm90.cuh"

// Sparse wgmma exists only in the arch-specific target sm_90a. Compiled for plain sm_90 (or
// compute_90 PTX), CUTLASS turns the kernel body into a printf and the GEMM returns without
// writing y, so an H100 would get uninitialised output and no error: refuse to build that.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "nm24_gemm_sm90.cu needs the arch-specific target sm_90a: list 9.0a instead of 9.0 in TORCH_CUDA_ARCH_LIST (nvcc: -gencode=arch=compute_90a,code=sm_90a)"
#endif

namespace sparsekernels::cuda {
namespace {

#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)

template <typename Element>
struct Sm90SparseGemm {
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, cutlass::layout::ColumnMajor, kAlignment,   // C (unused, beta = 0)
      Element, cutlass::layout::ColumnMajor, kAlignment,   // D: y.T, i.e. y row-major [tokens, out]
      cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,      // A: W (2:4 along K), compressed by the caller
      Element, cutlass::layout::ColumnMajor, kAlignment,   // B: x.T, i.e. x row-major [tokens, in]
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <typename Element>
cudaError_t run(const void* values, const uint16_t* metadata, const void* x, void* y, int64_t out, int64_t in,
                int64_t tokens, cudaStream_t stream) {
  using Config = Sm90SparseGemm<Element>;
  using Gemm = typename Config::Gemm;
  using Mainloop = typename Config::Mainloop;
  using SparseConfig = typename Mainloop::SparseConfig;
  static_assert(decltype(cute::size<1>(typename SparseConfig::TensorEAtom{}))::value == 128,
                "the metadata layout must be the one of nm24 layout \"sm90\" (MinTileShapeK 128)");
  const int m = static_cast<int>(out), n = static_cast<int>(tokens), k = static_cast<int>(in);
  const auto problem = cute::make_shape(m, n, k, 1);
  const auto layout_a = SparseConfig::fill_layoutA(problem);
  const auto layout_e = SparseConfig::fill_layoutE(problem);
  const auto stride_b = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{}, cute::make_shape(n, k, 1));
  const auto stride_d = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{}, cute::make_shape(m, n, 1));
  const auto stride_c = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideC{}, cute::make_shape(m, n, 1));
  auto* d = static_cast<Element*>(y);
  typename Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<const Element*>(values), layout_a, static_cast<const Element*>(x), stride_b,
       reinterpret_cast<const typename Mainloop::ElementE*>(metadata), layout_e},
      {{1.f, 0.f}, d, stride_c, d, stride_d}};
  Gemm gemm;
  if (gemm.can_implement(arguments) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // The tile scheduler may want a little workspace: stream-ordered allocation keeps the launcher
  // API pointer-free and stays legal under CUDA graph capture.
  const size_t workspace_bytes = Gemm::get_workspace_size(arguments);
  void* workspace = nullptr;
  if (workspace_bytes > 0) {
    const cudaError_t status = cudaMallocAsync(&workspace, workspace_bytes, stream);
    if (status != cudaSuccess) return status;
  }
  cudaError_t result = cudaSuccess;
  if (gemm.initialize(arguments, workspace, stream) != cutlass::Status::kSuccess) {
    result = cudaErrorInvalidValue;
  } else if (gemm.run(stream) != cutlass::Status::kSuccess) {
    result = cudaGetLastError();
    if (result == cudaSuccess) result = cudaErrorLaunchFailure;
  } else {
    result = cudaGetLastError();
  }
  if (workspace != nullptr) {
    const cudaError_t freed = cudaFreeAsync(workspace, stream);
    if (result == cudaSuccess) result = freed;
  }
  return result;
}

#endif  // CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED

}  // namespace

bool nm24_gemm_sm90_supported(int64_t out, int64_t in, int64_t tokens) {
  return gemm_extents_fit_int(out, in, tokens) && in % 128 == 0 && out % 8 == 0 && tokens % 8 == 0;
}

bool nm24_gemm_sm90_runnable() {
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
  // Both dtypes are instantiated here with the same flags: the bfloat16 kernel stands for both. With
  // plain sm_90 refused at compile time (above), a PTX arch of 90 means sm_90a code.
  using Kernel = typename Sm90SparseGemm<cutlass::bfloat16_t>::Gemm::GemmKernel;
  return current_device_major() == 9 &&
         kernel_ptx_version(reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>)) >= 90;
#else
  return false;
#endif
}

cudaError_t nm24_gemm_sm90(DType dtype, const void* values, const uint16_t* metadata, const void* x, void* y,
                           int64_t out, int64_t in, int64_t tokens, cudaStream_t stream) {
  if (!nm24_gemm_sm90_supported(out, in, tokens) || !aligned16(values) || !aligned16(metadata) || !aligned16(x) ||
      !aligned16(y))
    return cudaErrorInvalidValue;
  if (current_device_major() != 9) return cudaErrorInvalidDevice;
  if (!nm24_gemm_sm90_runnable()) return cudaErrorNoKernelImageForDevice;
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
  return dtype == DType::bfloat16 ? run<cutlass::bfloat16_t>(values, metadata, x, y, out, in, tokens, stream)
                                  : run<cutlass::half_t>(values, metadata, x, y, out, in, tokens, stream);
#else
  (void)dtype;
  return cudaErrorNotSupported;
#endif
}

}  // namespace sparsekernels::cuda
