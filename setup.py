"""Build script for the sparsekernels C++/CUDA extension (sparsekernels._C).

* Always builds the CPU kernels (csrc/cpu) and the op bindings (csrc/bindings).
* Adds the CUDA kernels (csrc/cuda/*.cu and csrc/bindings/cuda_*.cpp) when the installed torch has
  CUDA and nvcc is found, or when SPARSEKERNELS_FORCE_CUDA=1. SPARSEKERNELS_SKIP_CUDA=1 skips them.
* The CUTLASS 2:4 sparse GEMM (csrc/cuda/nm24_gemm_*.cu) needs the CUTLASS headers of the pinned
  `nvidia-cutlass` wheel, found through csrc/cuda/find_cutlass.py (or CUTLASS_INCLUDE_DIR); without
  them those sources are left out and the bindings use the other paths (SPARSEKERNELS_WITH_CUTLASS).
* Honours MAX_JOBS (parallel compile jobs; default: the CPU count, capped by memory at ~4 GiB a
  job) and TORCH_CUDA_ARCH_LIST (default "8.0+PTX;9.0a": Ampere and Hopper SASS, which the 2:4 sparse
  tensor core kernels need, and compute_80 PTX for later GPUs). Hopper is always built as sm_90a: an
  entry 9.0 / 9.0+PTX / Hopper becomes 9.0a (csrc/cuda/arch_list.py says why), and the build says so.

Install for development with `pip install --no-build-isolation -e .` (torch must already be
installed; `make test` does all of this in .venv).
"""

from __future__ import annotations

import glob
import os
import runpy

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> int:
    """One job per core, but no more than memory allows (~4 GiB per nvcc/g++ job)."""
    jobs = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        jobs = max(1, min(jobs, int(memory_gib // 4)))
    except (ValueError, OSError, AttributeError):
        pass
    return jobs


def _with_cuda() -> bool:
    if _env_flag("SPARSEKERNELS_SKIP_CUDA"):
        return False
    if _env_flag("SPARSEKERNELS_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(*patterns: str) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        found += sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, pattern)))
    return found


def _set_cuda_arch_list() -> None:
    """TORCH_CUDA_ARCH_LIST as csrc/cuda/arch_list.py resolves it (9.0 -> 9.0a), announced."""
    resolver = runpy.run_path(os.path.join(ROOT, "csrc", "cuda", "arch_list.py"))

    def visible_capabilities():
        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]

    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    resolved, hopper_replaced = resolver["cuda_arch_list"](requested, visible_capabilities)
    if hopper_replaced:
        print(
            f"sparsekernels: TORCH_CUDA_ARCH_LIST={requested!r}: building 9.0 as 9.0a (the Hopper 2:4 GEMM "
            "needs the arch-specific target sm_90a; plain sm_90 code would leave its output unwritten)"
        )
    os.environ["TORCH_CUDA_ARCH_LIST"] = resolved
    print(f"sparsekernels: CUDA arch list {resolved}")


def _cutlass_include_dir():
    """CUTLASS include directory of the pinned nvidia-cutlass (None when not installed at that version)."""
    finder = runpy.run_path(os.path.join(ROOT, "csrc", "cuda", "find_cutlass.py"))
    found = finder["cutlass_include_dir"]()
    if found is None:
        print(
            f"sparsekernels: CUTLASS headers not found (pip install --no-deps {finder['PINNED_SPEC']}); "
            "building without the 2:4 GEMM"
        )
    return found


def extensions():
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # -fopenmp: at::parallel_for is header-inline and runs serially unless the extension itself is
    # compiled with OpenMP (torch's CPU wheels use the OpenMP backend).
    cxx_flags = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sources = _sources("csrc/bindings/library.cpp", "csrc/bindings/cpu_*.cpp", "csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/bindings/cuda_*.cpp")
    if _with_cuda() and cuda_sources:
        _set_cuda_arch_list()
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        define_macros = [("SPARSEKERNELS_WITH_CUDA", "1")]
        cutlass_include = _cutlass_include_dir()
        if cutlass_include is None:
            cutlass_sources = set(_sources("csrc/cuda/nm24_gemm_*.cu"))
            cuda_sources = [source for source in cuda_sources if source not in cutlass_sources]
        else:
            # tools/util/include (packed_stride.hpp, host_reorder.h) ships in the same wheel.
            include_dirs += [cutlass_include, os.path.join(cutlass_include, "..", "tools", "util", "include")]
            define_macros.append(("SPARSEKERNELS_WITH_CUTLASS", "1"))
        return [
            CUDAExtension(
                "sparsekernels._C",
                sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    return [
        CppExtension(
            "sparsekernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


setup(
    packages=find_packages(include=["sparsekernels", "sparsekernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
