// Which x86 vector kernels the CPU kernels run: decided once per process, shared by every kernel
// family (bsr.cpp, nm.cpp) so that they never disagree.
//
// The levels are ordered; each kernel family uses the highest level it has kernels for, at or
// below the process's level:
//   generic  portable C++ (any CPU, any architecture)
//   avx2     AVX2 + FMA + F16C, 8-float vectors (Haswell and later, AMD Zen 1-3, Intel client
//            cores without AVX-512)
//   avx512       AVX-512 F/BW/VL/DQ + FMA + F16C, 16-float vectors
//   avx512_bf16  avx512 plus AVX512-BF16 (VDPBF16PS) and AVX512-VBMI2 (VPEXPANDW) on a CPU without
//                AMX (AMD Zen 4 and later): bfloat16 products as pair dot products, at least twice
//                the float32 FMA rate. Cooper Lake, which has AVX512-BF16 but not VBMI2, stays at
//                avx512.
//   amx          avx512 plus AMX-BF16 tiles, granted by the OS (Sapphire Rapids and later). These
//                CPUs have AVX512-BF16 as well, but their bfloat16 kernels are the AMX ones: the
//                VDPBF16PS kernels are not used at this level (see bsr.cpp)
// The library is compiled for the baseline ISA; kernels above it carry target attributes and are
// only reached after asking the CPU (and, for AMX, the Linux kernel) whether they may run.
//
// SPARSEKERNELS_CPU_ISA=generic|avx2|avx512|avx512_bf16|amx caps the level (it never raises it above what the
// CPU supports), which is how the tests reach every path on one machine. Any other value is
// reported once on stderr and ignored.
#pragma once

namespace sparsekernels::cpu {

enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };

// The level of this process: what the CPU and OS support, capped by SPARSEKERNELS_CPU_ISA.
// Computed on the first call (thread-safe), constant afterwards.
CpuIsa cpu_isa();

// "generic", "avx2", "avx512", "avx512_bf16" or "amx".
const char* cpu_isa_name(CpuIsa isa);

}  // namespace sparsekernels::cpu
