"""The CUDA arch list setup.py builds for (csrc/cuda/arch_list.py): plain Hopper becomes sm_90a.

Plain Python, no GPU and no CUDA toolkit needed; run by pytest.
"""

from __future__ import annotations

import os
import runpy

import pytest

CUDA_DIR = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
arch_list = runpy.run_path(os.path.join(CUDA_DIR, "arch_list.py"))


def resolve(requested, visible=((9, 0),)):
    return arch_list["cuda_arch_list"](requested, lambda: list(visible))


@pytest.mark.parametrize(
    "requested, expected",
    [
        ("9.0", "9.0a"),
        ("9.0+PTX", "9.0a+PTX"),
        ("Hopper", "9.0a+PTX"),  # torch expands Hopper to 9.0+PTX
        ("8.0 9.0", "8.0;9.0a"),  # space-separated, as torch accepts
        ("Ampere;Hopper", "Ampere;9.0a+PTX"),
        ("native", "9.0a"),  # the visible GPU (an H100 here)
    ],
)
def test_plain_hopper_is_built_as_sm90a(requested, expected):
    assert resolve(requested) == (expected, True)


@pytest.mark.parametrize("requested", ["8.0;9.0a", "9.0a+PTX", "8.0+PTX;8.6", "10.0;12.0+PTX", "Ampere"])
def test_lists_without_plain_hopper_are_kept(requested):
    assert resolve(requested) == (requested, False)


@pytest.mark.parametrize("requested", [None, "", "  "])
def test_unset_or_empty_gives_the_default(requested):
    assert resolve(requested) == ("8.0+PTX;9.0a", False)


def test_native_without_a_gpu_gives_the_default():
    assert resolve("native", visible=()) == ("8.0+PTX;9.0a", False)
    assert resolve("native", visible=((8, 0), (8, 6), (8, 0))) == ("8.0;8.6", False)
