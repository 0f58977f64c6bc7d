"""Keep glibc from returning large blocks to the kernel between timed calls on CPU.

Every op allocates its output. With glibc's default settings a block of 32 MiB or more (the dense
weight gradient of a 4096x4096 float32 layer is 64 MiB) is mapped fresh by each ``malloc`` and
unmapped by its ``free``, so every call first-touches new pages: page faults and the kernel's page
zeroing, several milliseconds, land inside the timed region. That is a property of the allocator,
not of the kernel under test, and it falls unevenly: on dense, whose weight-sized outputs are the
largest, most of all (measured on a 2-core Zen 5 at M = 1: dense grad_weight 25.8 ms with fresh
pages, 2.4 ms without). CUDA's caching allocator never does this, and on CPU jemalloc or tcmalloc,
the usual advice for PyTorch on CPU, mostly do not either.

``steady_cpu_allocator()`` therefore raises glibc's mmap and trim thresholds (``mallopt``) before
anything is measured, so that large blocks come from the heap and freed ones are reused by later
calls instead of going back to the kernel. The heap first grows by a few blocks (torch's 64-byte
aligned requests do not fit the hole a single freed block of the same size leaves, only the
coalesced holes of several), then stops: measured with a 64 MiB block, no page faults per
allocation after ten allocations and about 600 MiB of heap. ``python -m
bench --fresh-pages`` keeps glibc's defaults instead; ``results.json`` records which ran
(``environment.cpu_allocator``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

# mallopt parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Large enough for any weight the suites build (28672x8192 float32 is 0.9 GiB).
_MMAP_THRESHOLD_BYTES = 1 << 30
_TRIM_THRESHOLD_BYTES = (1 << 31) - 1

STEADY = "glibc, mmap threshold 1 GiB, trim threshold 2 GiB (freed blocks reused)"
DEFAULT = "system default"

_setting = DEFAULT


def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and other C libraries have no mallopt, or one that ignores these parameters.
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def steady_cpu_allocator() -> str:
    """Raise glibc's mmap and trim thresholds for this process; returns the allocator setting that
    now holds (``STEADY``, or ``DEFAULT`` where the C library is not glibc or refuses)."""
    global _setting
    libc = _glibc()
    if libc is not None:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        accepted = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
        accepted = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and accepted
        if accepted:
            _setting = STEADY
    return _setting


def allocator_setting() -> str:
    """What this process's allocator does with large freed blocks: ``STEADY`` once
    ``steady_cpu_allocator()`` took effect, else ``DEFAULT``."""
    return _setting
