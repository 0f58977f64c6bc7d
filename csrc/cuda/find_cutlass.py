"""Find the CUTLASS headers of the pinned `nvidia-cutlass` wheel; the pin itself lives here.

Used by setup.py (loaded with runpy) and CMakeLists.txt (run as a script), so both find the headers
the same way, and by the Makefile (`--pinned-spec`), which installs the wheel. The package is located
without importing it (its __init__ pulls in optional tooling): the wheel installs
`cutlass_library/source/include/cutlass/cutlass.h`. CUTLASS_INCLUDE_DIR, when set, is tried first.

Headers are accepted only at the pinned version (cutlass/version.h, major.minor.patch): the 2:4
metadata layouts (sparsekernels/formats/nm24_metadata.py, csrc/cuda/nm24_compress.cu) are derived
from, and tested against, that CUTLASS; other versions are reported on stderr and ignored, which
leaves the GEMMs out of the build rather than risking a silently different layout.

Command line: prints the include directory, or nothing and exits 1 when no headers of the pinned
version are found; `--pinned-spec` prints the pip requirement of the pin.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import Optional

PINNED_VERSION = "4.2.0.0"  # the nvidia-cutlass wheel; its headers say 4.2.0
PINNED_SPEC = f"nvidia-cutlass=={PINNED_VERSION}"


def header_version(include_dir: str) -> Optional[str]:
    """"major.minor.patch" from include_dir/cutlass/version.h, or None when it cannot be read."""
    try:
        with open(os.path.join(include_dir, "cutlass", "version.h"), encoding="utf-8") as header:
            text = header.read()
    except OSError:
        return None
    parts = [re.search(rf"#define\s+CUTLASS_{part}\s+(\d+)", text) for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return ".".join(match.group(1) for match in parts)


def _candidates() -> list:
    override = os.environ.get("CUTLASS_INCLUDE_DIR")
    candidates = [override] if override else []
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(path, "source", "include") for path in spec.submodule_search_locations]
    return candidates


def cutlass_include_dir() -> Optional[str]:
    """The directory holding cutlass/cutlass.h and cute/ at the pinned version, or None."""
    wanted = ".".join(PINNED_VERSION.split(".")[:3])
    for candidate in _candidates():
        if not os.path.isfile(os.path.join(candidate, "cutlass", "cutlass.h")):
            continue
        found = header_version(candidate)
        if found == wanted:
            return os.path.abspath(candidate)
        print(
            f"sparsekernels: ignoring the CUTLASS headers in {candidate}: version {found or 'unknown'}, "
            f"the build is pinned to {wanted} ({PINNED_SPEC}, csrc/cuda/find_cutlass.py)",
            file=sys.stderr,
        )
    return None


if __name__ == "__main__":
    if sys.argv[1:] == ["--pinned-spec"]:
        print(PINNED_SPEC)
        sys.exit(0)
    found = cutlass_include_dir()
    if found is None:
        sys.exit(1)
    print(found)
