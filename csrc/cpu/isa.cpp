// Instruction-set detection for the CPU kernels (see isa.h).
#include "isa.h"

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define SPARSEKERNELS_X86_DETECTION 1
#else
#define SPARSEKERNELS_X86_DETECTION 0
#endif

namespace sparsekernels::cpu {
namespace {

#if SPARSEKERNELS_X86_DETECTION
// __builtin_cpu_supports also checks, through XGETBV, that the OS saves the ymm / zmm state.
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
}

bool cpu_grants_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;  // CPUID.(7,0):EDX
  if ((edx & kAmxBf16) == 0 || (edx & kAmxTile) == 0) return false;
#if defined(__linux__)
  // Linux (5.16+) gives the 8 KiB tile-data state only to processes that request it; without the
  // grant the first tile instruction faults. The grant is process-wide and idempotent.
  constexpr long kArchRequestXcompPerm = 0x1023;
  constexpr long kXfeatureTileData = 18;
  return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureTileData) == 0;
#else
  return false;
#endif
}
#endif

// The highest level the hardware allows, asking for the AMX grant only when the cap admits AMX
// (the grant enlarges every signal frame of the process).
CpuIsa supported_isa(CpuIsa cap) {
#if SPARSEKERNELS_X86_DETECTION
  if (cap == CpuIsa::generic || !cpu_has_avx2()) return CpuIsa::generic;
  if (cap == CpuIsa::avx2 || !cpu_has_avx512()) return CpuIsa::avx2;
  if (cap == CpuIsa::avx512) return CpuIsa::avx512;
  // An AMX CPU has AVX512-BF16 too: capped at avx512_bf16 it runs the VDPBF16PS kernels.
  if (cap == CpuIsa::amx && cpu_grants_amx_bf16()) return CpuIsa::amx;
  return cpu_has_avx512_bf16() ? CpuIsa::avx512_bf16 : CpuIsa::avx512;
#else
  (void)cap;
  return CpuIsa::generic;
#endif
}

CpuIsa requested_cap() {
  const char* requested = std::getenv("SPARSEKERNELS_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0') return CpuIsa::amx;
  for (CpuIsa isa : {CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::avx512_bf16, CpuIsa::amx}) {
    if (std::strcmp(requested, cpu_isa_name(isa)) == 0) return isa;
  }
  std::fprintf(stderr,
               "sparsekernels: SPARSEKERNELS_CPU_ISA=%s is not one of generic, avx2, avx512, avx512_bf16, amx; ignored\n",
               requested);
  return CpuIsa::amx;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = supported_isa(requested_cap());  // thread-safe one-time initialisation
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::generic:
      return "generic";
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx512_bf16:
      return "avx512_bf16";
    case CpuIsa::amx:
      return "amx";
  }
  return "generic";
}

}  // namespace sparsekernels::cpu
