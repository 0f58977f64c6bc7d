"""What the runner produces: one :class:`CellResult` per cell, one :class:`Measurement` per
implementation in it, and their plain-dict form (the rows of ``results.json`` and ``results.csv``),
and :func:`results_json`, the one way result documents become JSON text. ``from_dict`` reads a
cell of ``results.json`` back (``--resume`` keeps the cells an earlier run measured)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from .cases import Case, Op, dtype_name, layout_label, parse_dtype, parse_layout, parse_shape
from .timing import Timing

# The environment fields that make two runs' timings comparable: compare warns when they differ,
# and --resume refuses to merge runs that differ in them (or in the git commit).
ENVIRONMENT_FIELDS_THAT_MATTER = ("device", "cpu_model", "torch_threads", "cpu_isa", "cpu_allocator", "gpu", "torch",
                                  "triton")


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

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Measurement:
        """Inverse of :meth:`to_dict` (fields this version does not know are left out)."""
        known = {name: record[name] for name in _field_names(cls) if name in record}
        known["status"] = Status(record["status"])
        if known.get("timing") is not None:
            known["timing"] = Timing(**{name: value for name, value in known["timing"].items()
                                        if name in _field_names(Timing)})
        return cls(**known)


def _field_names(cls: type) -> set[str]:
    return {item.name for item in fields(cls)}


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

    @classmethod
    def from_dict(cls, cell: dict[str, Any]) -> CellResult:
        """Inverse of :meth:`to_dict`; raises ValueError or KeyError on a cell it cannot read."""
        case = Case(*parse_shape(cell["shape"]), parse_layout(cell["layout"]), parse_dtype(cell["dtype"]),
                    int(cell["M"]), Op(cell["op"]))
        measurements = {name: Measurement.from_dict(record) for name, record in cell["results"].items()}
        return cls(case, cell["density"], cell["useful_flops"], cell["bytes_needed"], measurements)


CELL_KEY_FIELDS = ("shape", "layout", "dtype", "M", "op")


def cell_key(cell: dict[str, Any]) -> tuple:
    """What identifies a cell in a results file (to match cells of two runs)."""
    return tuple(cell[name] for name in CELL_KEY_FIELDS)


def case_key(case: Case) -> tuple:
    """:func:`cell_key` of the cell ``case`` describes."""
    return case.shape_label, layout_label(case.layout), dtype_name(case.dtype), case.rows, case.op.value


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (nan, inf) in it, at any depth, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def results_json(document: dict[str, Any]) -> str:
    """A results document as strict JSON text. A non-finite number (a loss that diverged, an error
    that overflowed) is written as null: strict JSON has no nan, and refusing it would throw the
    whole run's measurements away."""
    return json.dumps(finite_or_none(document), indent=2, allow_nan=False) + "\n"
