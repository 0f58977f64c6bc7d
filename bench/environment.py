"""The machine and software a run measured, stored with its results so numbers can be traced.

CPU model (``/proc/cpuinfo``), core and thread counts, the load average when the run started (other
work on the machine makes CPU timings noisy), the GPU with its driver and CUDA versions,
the torch / triton / python versions, how the C allocator treats large freed blocks
(bench/allocator.py), the sparsekernels backend that ran, the git commit (and whether the tree had
local changes) and the UTC date. Anything unavailable is recorded as None.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

import sparsekernels
from sparsekernels.backend import resolve_backend

from .allocator import allocator_setting

REPO_ROOT = Path(__file__).resolve().parent.parent


def _command_output(*command: str) -> Optional[str]:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_description(device: torch.device) -> Optional[dict[str, Any]]:
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    driver = _command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    return {
        "name": properties.name,
        "capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None,
    }


def collect_environment(device: torch.device) -> dict[str, Any]:
    commit = _command_output("git", "rev-parse", "HEAD")
    changes = _command_output("git", "status", "--porcelain") if commit else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa": sparsekernels.cpu_isa(),
        "cpu_allocator": allocator_setting(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": gpu_description(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "sparsekernels": sparsekernels.__version__,
        "sparsekernels_backend": resolve_backend(device),
        "git_commit": commit or None,
        "git_dirty": None if changes is None else bool(changes),
    }
