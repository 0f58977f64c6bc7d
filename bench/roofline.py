"""Peak throughput of the GPUs we quote, and where a measurement sits under its roofline.

A cell's roofline is ``attainable = min(peak TFLOP/s, arithmetic intensity * peak bandwidth)``, with
the arithmetic intensity its useful FLOPs over the bytes it must move (both from
:mod:`bench.metrics`); "% of roofline" is the achieved useful TFLOP/s over that. 100% means the
implementation runs as fast as the hardware allows for the work the *sparse* problem needs.

The peaks are the vendors' datasheet numbers for dense math (no 2:4 "sparse" doubling: useful FLOPs
already count only the kept weights, so a 2:4 kernel that reaches the sparse tensor-core rate shows
up at the dense peak of useful FLOPs). float32 uses the non-tensor-core FP32 rate, because the
harness checks float32 results at a tolerance TF32 cannot meet. Unknown GPUs and CPUs have no entry:
their cells get no percentage rather than a made-up one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks of one GPU model: dense TFLOP/s per dtype and memory bandwidth."""

    model: str
    tflops: dict[str, float]  # by dtype name ("bfloat16", "float16", "float32")
    memory_tbps: float  # HBM bandwidth, TB/s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Peak":
        return cls(record["model"], dict(record["tflops"]), float(record["memory_tbps"]))


def _peak(model: str, half_tflops: float, fp32_tflops: float, memory_tbps: float) -> Peak:
    return Peak(model, {"bfloat16": half_tflops, "float16": half_tflops, "float32": fp32_tflops}, memory_tbps)


# Dense tensor-core BF16/FP16, FP32 (CUDA cores), HBM bandwidth; NVIDIA datasheets.
H100_SXM = _peak("H100 SXM", 989.4, 66.9, 3.35)
H100_PCIE = _peak("H100 PCIe", 756.0, 51.2, 2.0)
H200 = _peak("H200 SXM", 989.4, 66.9, 4.8)
A100_SXM_80GB = _peak("A100 SXM 80GB", 312.0, 19.5, 2.039)
A100_PCIE_80GB = _peak("A100 PCIe 80GB", 312.0, 19.5, 1.935)
A100_40GB = _peak("A100 40GB", 312.0, 19.5, 1.555)

PEAKS = (H100_SXM, H100_PCIE, H200, A100_SXM_80GB, A100_PCIE_80GB, A100_40GB)


def peak_for_gpu(name: Optional[str]) -> Optional[Peak]:
    """The peak entry for a CUDA device name as torch reports it (``NVIDIA H100 80GB HBM3``,
    ``NVIDIA H100 PCIe``, ``NVIDIA A100-SXM4-40GB``, ...), or None for a model not in the table."""
    if not name:
        return None
    text = name.upper().replace("-", " ")
    if "H200" in text:
        return H200
    if "H100" in text:
        if "PCIE" in text:
            return H100_PCIE
        if "NVL" in text:
            return None  # a different clock and memory; not in the table
        return H100_SXM  # "H100 80GB HBM3" and "H100 SXM5" are the SXM part
    if "A100" in text:
        if "40GB" in text:
            return A100_40GB
        return A100_PCIE_80GB if "PCIE" in text else A100_SXM_80GB
    return None


def peak_for_device(device: torch.device) -> Optional[Peak]:
    if device.type != "cuda":
        return None
    return peak_for_gpu(torch.cuda.get_device_name(device))


def arithmetic_intensity(flops: float, bytes_moved: float) -> Optional[float]:
    """FLOPs per byte; None when nothing is moved."""
    return flops / bytes_moved if bytes_moved > 0 else None


def attainable_tflops(peak: Peak, dtype: str, intensity: float) -> Optional[float]:
    """The roofline at ``intensity`` FLOP/byte: the lesser of the compute peak and bandwidth * intensity
    (TB/s * FLOP/byte = TFLOP/s). None for a dtype the table has no peak for."""
    compute = peak.tflops.get(dtype)
    if compute is None:
        return None
    return min(compute, peak.memory_tbps * intensity)


def ridge_point(peak: Peak, dtype: str) -> Optional[float]:
    """The intensity (FLOP/byte) where the memory roof meets the compute roof."""
    compute = peak.tflops.get(dtype)
    return None if compute is None else compute / peak.memory_tbps


def percent_of_roofline(
    peak: Optional[Peak], dtype: str, flops: float, bytes_moved: float, achieved_tflops: float
) -> Optional[float]:
    """Achieved over attainable TFLOP/s, in percent; None without a peak for this device and dtype."""
    if peak is None:
        return None
    intensity = arithmetic_intensity(flops, bytes_moved)
    if intensity is None:
        return None
    roof = attainable_tflops(peak, dtype, intensity)
    return None if not roof else 100.0 * achieved_tflops / roof
