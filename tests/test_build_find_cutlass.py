"""The CUTLASS header lookup and its version pin (csrc/cuda/find_cutlass.py), as CMake and the
Makefile run it.

Plain Python with fake header trees, no CUTLASS, GPU or CUDA toolkit needed; run by pytest.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

CUDA_DIR = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
find_cutlass = runpy.run_path(os.path.join(CUDA_DIR, "find_cutlass.py"))


def fake_cutlass(tmp_path, version):
    include = tmp_path / f"cutlass-{version}" / "include"
    (include / "cutlass").mkdir(parents=True)
    (include / "cutlass" / "cutlass.h").write_text("#pragma once\n")
    major, minor, patch = version.split(".")
    (include / "cutlass" / "version.h").write_text(
        f"#define CUTLASS_MAJOR {major}\n#define CUTLASS_MINOR {minor}\n#define CUTLASS_PATCH {patch} \n"
    )
    return str(include)


def run_finder(include_dir, *args):
    """find_cutlass.py as CMake runs it, with CUTLASS_INCLUDE_DIR set and no wheel on the path."""
    env = dict(os.environ, CUTLASS_INCLUDE_DIR=include_dir, PYTHONNOUSERSITE="1")
    return subprocess.run(
        [sys.executable, "-S", os.path.join(CUDA_DIR, "find_cutlass.py"), *args],
        env=env, capture_output=True, text=True, check=False,
    )


def test_cutlass_headers_of_the_pinned_version_are_found(tmp_path):
    pinned = ".".join(find_cutlass["PINNED_VERSION"].split(".")[:3])
    include = fake_cutlass(tmp_path, pinned)
    result = run_finder(include)
    assert result.returncode == 0 and result.stdout.strip() == os.path.abspath(include)


def test_cutlass_headers_of_another_version_are_refused(tmp_path):
    include = fake_cutlass(tmp_path, "3.9.2")
    result = run_finder(include)
    assert result.returncode == 1 and result.stdout == ""
    assert "version 3.9.2" in result.stderr and find_cutlass["PINNED_SPEC"] in result.stderr


def test_the_makefile_installs_the_pinned_wheel():
    result = run_finder("", "--pinned-spec")
    assert result.stdout.strip() == f"nvidia-cutlass=={find_cutlass['PINNED_VERSION']}"
