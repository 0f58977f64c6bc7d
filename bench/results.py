"""What the runner produces: one :class:`CellResult` per cell, one :class:`Measurement` per
implementation in it, and their plain-dict form (the rows of ``results.json`` and ``results.csv``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional

from .cases import Case, dtype_name, layout_label
from .timing import Timing


class Status(str, Enum):
    OK = "ok"  # correct and timed
    WRONG = "wrong"  # output outside tolerance: not timed, no speedup
    ERROR = "error"  # raised (conversion, the op, or its timing); the message is in ``detail``
    NOT_APPLICABLE = "n/a"  # this implementation has nothing for this op / layout


@dataclass
class Measurement:
    """One implementation on one cell."""

    status: Status
    detail: Optional[str] = None  # error message, or why the cell is n/a or wrong
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    tolerance: Optional[float] = None
    timing: Optional[Timing] = None
    speedup: Optional[float] = None  # dense time / this time; only for correct results
    tflops: Optional[float] = None  # useful TFLOP/s
    gbps: Optional[float] = None  # needed GB/s
    roofline_pct: Optional[float] = None  # useful TFLOP/s over the roofline, % (GPUs of the peak table)
    path: Optional[str] = None  # sparsekernels on CUDA: "sparse" or "dense" (the dense fallback), else None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        record["timing"] = None if self.timing is None else asdict(self.timing)
        return record


@dataclass
class CellResult:
    case: Case
    density: Optional[float]  # kept fraction of the weight (block counts are rounded); None if unbuilt
    useful_flops: int
    bytes_needed: int
    measurements: dict[str, Measurement] = field(default_factory=dict)  # by implementation name

    def cell_dict(self) -> dict[str, Any]:
        """The cell's identity and size, as stored in the result files."""
        case = self.case
        return {
            "shape": case.shape_label,
            "out_features": case.out_features,
            "in_features": case.in_features,
            "layout": layout_label(case.layout),
            "density": self.density,
            "dtype": dtype_name(case.dtype),
            "M": case.rows,
            "op": case.op.value,
            "useful_flops": self.useful_flops,
            "bytes_needed": self.bytes_needed,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.cell_dict(),
            "results": {name: measurement.to_dict() for name, measurement in self.measurements.items()},
        }


CELL_KEY_FIELDS = ("shape", "layout", "dtype", "M", "op")


def cell_key(cell: dict[str, Any]) -> tuple:
    """What identifies a cell in a results file (to match cells of two runs)."""
    return tuple(cell[name] for name in CELL_KEY_FIELDS)
