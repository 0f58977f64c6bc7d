"""The CPU kernels' instruction set (csrc/cpu/isa.h): one decision per process, reported by
``sparsekernels.cpu_isa()``, capped (never raised) by ``SPARSEKERNELS_CPU_ISA``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import sparsekernels as sk

LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")


def _isa_in_child(cap: str | None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "SPARSEKERNELS_CPU_ISA"}
    if cap is not None:
        environment["SPARSEKERNELS_CPU_ISA"] = cap
    return subprocess.run(
        [sys.executable, "-c", "import sparsekernels as sk; print(sk.cpu_isa())"],
        env=environment, capture_output=True, text=True, timeout=120, check=True,
    )


@pytest.fixture(scope="module")
def uncapped() -> str:
    return _isa_in_child(None).stdout.strip()


def test_cpu_isa_names_a_level():
    assert sk.cpu_isa() in LEVELS
    assert sk.cpu_isa() == sk.cpu_isa()  # decided once


@pytest.mark.parametrize("cap", LEVELS)
def test_the_environment_variable_caps_the_level_and_never_raises_it(cap, uncapped):
    capped = _isa_in_child(cap).stdout.strip()
    assert capped == LEVELS[min(LEVELS.index(cap), LEVELS.index(uncapped))]


def test_an_unknown_level_is_reported_and_ignored(uncapped):
    result = _isa_in_child("avx1024")
    assert result.stdout.strip() == uncapped
    assert "SPARSEKERNELS_CPU_ISA=avx1024 is not one of generic, avx2, avx512, avx512_bf16, amx" in result.stderr


def test_benchmark_results_record_the_level():
    import torch

    from bench.environment import collect_environment
    from bench.report import results_file_stem

    environment = collect_environment(torch.device("cpu"))
    assert environment["cpu_isa"] == sk.cpu_isa()
    cpu = {"gpu": None, "cpu_model": "AMD EPYC", "cpu_count": 2, "date_utc": "2026-12-07T02:00:00+00:00"}
    assert results_file_stem({**cpu, "cpu_isa": "avx2"}, "quick") == "cpu-amd-epyc-2core-avx2-2026-12-07"
    assert results_file_stem(cpu, "quick") == "cpu-amd-epyc-2core-2026-12-07"  # files of earlier runs
