"""The performance targets of issues 4 (Triton kernels) and 5 (CUDA kernels), and the verdict of a run.

The ``targets`` suite (``python -m bench --suite targets``) measures exactly the cells of the two
issues' performance tables: weight 14336x4096 in bfloat16 (block 64 at densities 0.1 and 0.5, block
128 at 0.5, 2:4 and transposable 2:4; forward or training step; M of 16, 2048 or 8192), plus the
4096x4096 cells at M in {1, 128, 2048} that issue 4 asks for without a number. Each cell lists the
speedup over dense (cuBLAS, measured in the same run) that a sparsekernels backend must reach:
issue 4's numbers are for the Triton kernels (``sparsekernels[triton]``), issue 5's for the CUDA C++
kernels (``sparsekernels[cuda]``), and the peer each issue quotes (torch BSR, cuSPARSELt, stk) is
reported next to it as measured in the same run.

A verdict (``met`` / ``missed``) is given only for the issue's own cell: when ``--shapes``, ``--dtype``
or ``--m`` replace part of the cells (to run the suite small, on CPU or in tests), the ratios are still
shown but the verdict is ``scaled``. ``--layouts`` and ``--ops`` keep only the cells with those values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparsekernels import NM, BlockSparse
from sparsekernels.layouts import Layout

from .cases import Case, Op, dtype_name, layout_fits, layout_label
from .implementations import backend_column, is_ours
from .results import CellResult, Status


@dataclass(frozen=True)
class Target:
    """Speedup over dense that the column of ``backend`` must reach, and where the number comes from."""

    backend: str
    ratio: float
    source: str  # "issue 4" or "issue 5"


@dataclass(frozen=True)
class TargetCell:
    """One cell of an issue's table: what is measured, its targets, and the peer the issue quotes."""

    shape: tuple[int, int]
    layout: Layout
    dtype: torch.dtype
    rows: int
    op: Op
    targets: tuple[Target, ...] = ()
    peer: Optional[str] = None

    @property
    def case(self) -> Case:
        return Case(*self.shape, self.layout, self.dtype, self.rows, self.op)


ISSUE_4, ISSUE_5 = "issue 4", "issue 5"
LARGE = (14336, 4096)
SMALL = (4096, 4096)
BF16 = torch.bfloat16
FORWARD, TRAIN_STEP = Op.FORWARD, Op.TRAIN_STEP
BLOCK64_D01, BLOCK64_D05, BLOCK128_D05 = BlockSparse(64, 0.1), BlockSparse(64, 0.5), BlockSparse(128, 0.5)
NM24, NM24T = NM(2, 4), NM(2, 4, transposable=True)

# Ordered so that the cells of one weight are adjacent (the runner builds each weight once) and the
# cells with a target come first: a run stopped early (the GPU check's time limit) keeps them.
TARGET_CELLS: tuple[TargetCell, ...] = (
    TargetCell(LARGE, BLOCK64_D01, BF16, 8192, FORWARD, (Target("triton", 7.0, ISSUE_4),), "torch_bsr"),
    TargetCell(LARGE, BLOCK64_D01, BF16, 16, FORWARD,
               (Target("triton", 8.0, ISSUE_4), Target("cuda", 8.0, ISSUE_5)), "torch_bsr"),
    TargetCell(LARGE, BLOCK64_D01, BF16, 8192, TRAIN_STEP, (Target("triton", 6.0, ISSUE_4),), "stk"),
    TargetCell(LARGE, BLOCK64_D05, BF16, 8192, FORWARD, (Target("triton", 1.8, ISSUE_4),), "torch_bsr"),
    TargetCell(LARGE, BLOCK128_D05, BF16, 8192, TRAIN_STEP, (Target("triton", 1.6, ISSUE_4),), "stk"),
    TargetCell(LARGE, NM24, BF16, 8192, FORWARD,
               (Target("triton", 1.3, ISSUE_4), Target("cuda", 1.6, ISSUE_5)), "torch_semi_cusparselt"),
    TargetCell(LARGE, NM24, BF16, 2048, FORWARD, (Target("cuda", 1.5, ISSUE_5),), "torch_semi_cusparselt"),
    TargetCell(LARGE, NM24, BF16, 16, FORWARD,
               (Target("triton", 1.5, ISSUE_4), Target("cuda", 1.6, ISSUE_5)), "torch_semi_cusparselt"),
    TargetCell(LARGE, NM24T, BF16, 8192, TRAIN_STEP, (Target("cuda", 1.3, ISSUE_5),)),
    *(
        TargetCell(SMALL, layout, BF16, rows, FORWARD, (), peer)
        for layout, peer in ((BLOCK64_D01, "torch_bsr"), (BLOCK64_D05, "torch_bsr"), (NM24, "torch_semi_cusparselt"))
        for rows in (1, 128, 2048)
    ),
)


def target_cases(
    cells: Sequence[TargetCell],
    shapes: Optional[Iterable[tuple[int, int]]] = None,
    layouts: Optional[Iterable[Layout]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    rows: Optional[Iterable[int]] = None,
    ops: Optional[Iterable[Op]] = None,
) -> tuple[list[Case], dict[Case, list[TargetCell]], list[str]]:
    """The cases to measure, the issue cells behind each, and the (shape, layout) pairs that do not fit.

    ``shapes``, ``dtypes`` and ``rows`` replace that part of every cell; ``layouts`` and ``ops`` keep the
    cells that have one of them. Cells that become equal are measured once (their targets are merged)."""
    shapes, dtypes, rows = (None if axis is None else list(dict.fromkeys(axis)) for axis in (shapes, dtypes, rows))
    layouts, ops = (None if axis is None else set(axis) for axis in (layouts, ops))
    behind: dict[Case, list[TargetCell]] = {}
    misfits: list[str] = []
    for cell in cells:
        if (layouts is not None and cell.layout not in layouts) or (ops is not None and cell.op not in ops):
            continue
        for out_features, in_features in shapes or [cell.shape]:
            if not layout_fits(cell.layout, out_features, in_features):
                misfits.append(f"{out_features}x{in_features} {layout_label(cell.layout)}")
                continue
            for dtype in dtypes or [cell.dtype]:
                for row_count in rows or [cell.rows]:
                    case = Case(out_features, in_features, cell.layout, dtype, row_count, cell.op)
                    behind.setdefault(case, []).append(cell)
    first_of_weight: dict[tuple, int] = {}
    for index, case in enumerate(behind):
        first_of_weight.setdefault(case.weight_key, index)
    cases = sorted(behind, key=lambda case: first_of_weight[case.weight_key])  # stable: weights adjacent
    return cases, behind, list(dict.fromkeys(misfits))


def _verdict(measurement, target: Optional[Target], scaled: bool) -> str:
    if target is None:
        return "-"
    if measurement is None:
        return "not measured"
    if measurement.status is not Status.OK or measurement.speedup is None:
        return measurement.status.value
    if scaled:
        return "scaled"
    return "met" if measurement.speedup >= target.ratio else "missed"


def target_rows(
    results: Sequence[CellResult], behind: dict[Case, list[TargetCell]], implementation_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (measured cell, sparsekernels column, target): the column's speedup over dense, the
    target and the verdict, the quoted peer's speedup. A column that a target names but the run did
    not measure gets a row too (``not measured``), so that missing evidence shows."""
    rows = []
    for result in results:
        cells = behind.get(result.case)
        if not cells:
            continue
        targets = [(cell, target) for cell in cells for target in cell.targets]
        columns = [name for name in implementation_names if is_ours(name)]
        columns += [backend_column(target.backend) for _, target in targets]
        peer = next((cell.peer for cell in cells if cell.peer), None)
        peer_measurement = result.measurements.get(peer) if peer else None
        for column in dict.fromkeys(columns):
            measurement = result.measurements.get(column)
            mine = [(cell, target) for cell, target in targets if backend_column(target.backend) == column]
            for cell, target in mine or [(cells[0], None)]:
                scaled = cell.case != result.case
                rows.append({
                    **{name: value for name, value in result.cell_dict().items()
                       if name in ("shape", "layout", "dtype", "M", "op")},
                    "implementation": column,
                    "status": "not measured" if measurement is None else measurement.status.value,
                    "ratio": None if measurement is None else measurement.speedup,
                    "path": None if measurement is None else measurement.path,
                    "target": None if target is None else target.ratio,
                    "source": None if target is None else target.source,
                    "issue_cell": None if target is None else _cell_label(cell.case),
                    "verdict": _verdict(measurement, target, scaled),
                    "peer": peer,
                    "peer_status": None if peer is None else (
                        "not measured" if peer_measurement is None else peer_measurement.status.value),
                    "peer_ratio": None if peer_measurement is None else peer_measurement.speedup,
                })
    return rows


def _cell_label(case: Case) -> str:
    return f"{case.shape_label} {layout_label(case.layout)} {dtype_name(case.dtype)} M={case.rows} {case.op.value}"


_VERDICT_STYLE = {"met": "green", "missed": "bold red", "wrong": "bold red", "error": "yellow"}


def _ratio(value: Optional[float], status: Optional[str]) -> str:
    if value is not None:
        return f"{value:.2f}x"
    return status or "-"


def print_targets(rows: Sequence[dict[str, Any]], console: Console) -> None:
    table = Table(title="targets (issues 4 and 5)", caption="ratio = dense time / sparsekernels time in this run; "
                  "met when ratio >= target; scaled: not the issue's cell (--shapes/--dtype/--m), no verdict")
    for column in ("shape", "layout", "dtype", "M", "op", "column", "ratio", "target", "verdict", "peer ratio"):
        table.add_column(column, justify="right" if column in ("M", "ratio", "target", "peer ratio") else "left")
    for row in rows:
        ratio = _ratio(row["ratio"], row["status"]) + (" (dense fallback)" if row["path"] == "dense" else "")
        target = "-" if row["target"] is None else f">= {row['target']:g}x ({row['source']})"
        style = _VERDICT_STYLE.get(row["verdict"], "")
        verdict = escape(row["verdict"])
        peer = "-" if row["peer"] is None else f"{row['peer']} {_ratio(row['peer_ratio'], row['peer_status'])}"
        table.add_row(row["shape"], row["layout"], row["dtype"], str(row["M"]), row["op"],
                      escape(row["implementation"]), escape(ratio), target,
                      f"[{style}]{verdict}[/]" if style else verdict, escape(peer))
    console.print(table)
    verdicts = [row["verdict"] for row in rows]
    console.print(f"targets met {verdicts.count('met')}, missed {verdicts.count('missed')}, "
                  f"not measured {verdicts.count('not measured')}", highlight=False)
