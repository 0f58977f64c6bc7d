"""The CUDA arch list setup.py builds for: TORCH_CUDA_ARCH_LIST, with plain Hopper made sm_90a.

The sparse wgmma of the Hopper 2:4 GEMM (nm24_gemm_sm90.cu) exists only in the arch-specific target
sm_90a. Built for plain sm_90, CUTLASS compiles the kernel to a stub that writes nothing, so
nm24_gemm_sm90.cu refuses to compile for it (#error). An arch list that names 9.0 ("9.0", "9.0+PTX",
"Hopper", or "native" on an H100) therefore gets 9.0a in its place: sm_90a code runs on every
compute capability 9.0 GPU, so nothing is lost for the other kernels, except that compute_90a PTX,
unlike compute_90 PTX, does not JIT-compile for later GPUs (list 8.0+PTX for that; the default does).

The list syntax is torch.utils.cpp_extension's (torch 2.13): entries separated by ";" or spaces,
"X.Y", "X.Ya" or either with "+PTX", and named archs, of which only "Hopper" (= "9.0+PTX") names 9.0.
Loaded by setup.py with runpy (no package import); tested by tests/test_build_arch_list.py.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

# Ampere and Hopper SASS (what the 2:4 sparse tensor core kernels need), plus compute_80 PTX so that
# the decode kernels JIT-compile on later GPUs (where the GEMMs are not taken).
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"


def _hopper_arch_specific(entry: str) -> str:
    """One list entry, with 9.0 (or "Hopper") replaced by 9.0a; others unchanged."""
    ptx = entry.endswith("+PTX")
    arch = entry[: -len("+PTX")] if ptx else entry
    if arch == "Hopper":
        arch, ptx = "9.0", True
    if arch == "9.0":
        arch = "9.0a"
    return arch + ("+PTX" if ptx else "")


def cuda_arch_list(
    requested: Optional[str], visible_capabilities: Callable[[], Iterable[Tuple[int, int]]]
) -> Tuple[str, bool]:
    """The arch list to build for, given TORCH_CUDA_ARCH_LIST (None or "" when unset), and whether
    a 9.0 entry was replaced by 9.0a.

    Unset or empty gives DEFAULT_ARCH_LIST; "native" the capabilities of the visible GPUs
    (`visible_capabilities()`, (major, minor) pairs; the default list when there is none), as torch
    would pick them.
    """
    requested = (requested or "").strip()
    if not requested:
        return DEFAULT_ARCH_LIST, False
    if requested == "native":
        entries = sorted({f"{major}.{minor}" for major, minor in visible_capabilities()})
        if not entries:
            return DEFAULT_ARCH_LIST, False
    else:
        entries = [entry for entry in requested.replace(" ", ";").split(";") if entry]
    resolved = [_hopper_arch_specific(entry) for entry in entries]
    return ";".join(resolved), resolved != entries
