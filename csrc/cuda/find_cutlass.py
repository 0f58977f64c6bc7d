"""Print the CUTLASS include directory shipped by the `nvidia-cutlass` wheel (pinned in requirements.txt).

Used by setup.py (imported) and CMakeLists.txt (run as a script), so both find the headers the same
way. The package is located without importing it (its __init__ pulls in optional tooling): the
wheel installs `cutlass_library/source/include/cutlass/cutlass.h`. Prints nothing and exits 1 when
the headers are not found.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional


def cutlass_include_dir() -> Optional[str]:
    """The directory holding cutlass/cutlass.h and cute/, or None."""
    override = os.environ.get("CUTLASS_INCLUDE_DIR")
    candidates = [override] if override else []
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(path, "source", "include") for path in spec.submodule_search_locations]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "cutlass", "cutlass.h")):
            return os.path.abspath(candidate)
    return None


if __name__ == "__main__":
    found = cutlass_include_dir()
    if found is None:
        sys.exit(1)
    print(found)
