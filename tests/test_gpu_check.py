"""bench/gpu_check.sh's time budget, checked without a GPU: `visit` runs its steps inside VISIT_S,
cutting each step's limit to the time left and skipping what no longer fits, so that one device call
of a 15-minute lease always ends with its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *steps: str, visit_s: str) -> tuple[int, str, str]:
    environment = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, VISIT_S=visit_s)
    result = subprocess.run(["bash", "bench/gpu_check.sh", *steps], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, (tmp_path / "summary.txt").read_text()


def test_a_visit_with_no_time_left_skips_every_step_and_still_writes_its_summary(tmp_path):
    status, _, summary = _run(tmp_path, "visit", visit_s="5")
    assert status == 0
    assert [line.split()[0] for line in summary.splitlines()] == ["info", "build", "tests", "bench", "sanitizer"]
    assert all(" skipped: " in line for line in summary.splitlines())


def test_a_step_limit_is_cut_to_the_time_left(tmp_path):
    status, output, summary = _run(tmp_path, "info", visit_s="45")
    assert status == 0
    limit = int(output.split("=== info (limit ")[1].split("s)")[0])
    assert 20 <= limit <= 45  # info's own limit is 60 s
    assert summary.startswith("info rc=0")
