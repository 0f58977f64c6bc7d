"""``python -m bench compare OLD.json NEW.json``: per-cell time ratios and a regression check.

Cells are matched by (shape, layout, dtype, M, op) and implementation. A match is a regression when
NEW's median time exceeds OLD's by more than the noise allowance, or when a result that was correct
in OLD is wrong or an error in NEW. The allowance is noise-aware: the relative spread of each
measurement, (p80 - p20) / median, is added up for OLD and NEW, and the allowance is that sum,
at least ``--threshold`` (default 10%) and at most MAX_NOISE (50%, so a 2x slowdown is always
caught however noisy the machine). The exit status is 1 when there is any regression,
0 otherwise, so CI can run it after a benchmark. Both files should come from the same machine:
differing environments are pointed out, since their ratios say little about the code.

e2e results (``--suite e2e``) are compared the same way: each (model, variant, dtype) gives two rows,
``train`` and ``decode``, whose "time" is milliseconds per token (the inverse of tokens/s).

Files older than ``--backends`` have a single ``sparsekernels`` column: it matches
``sparsekernels[<backend>]``, the backend that file recorded as ``environment.sparsekernels_backend``
(:func:`bench.implementations.results_by_column`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .implementations import results_by_column
from .report import wide_console
from .results import CELL_KEY_FIELDS, Status, cell_key

DEFAULT_THRESHOLD = 0.10
MAX_NOISE = 0.50
ENVIRONMENT_FIELDS_THAT_MATTER = ("device", "cpu_model", "torch_threads", "gpu", "torch")


@dataclass(frozen=True)
class Change:
    """One (cell, implementation) present in both files."""

    cell: tuple
    implementation: str
    old_status: str
    new_status: str
    old_ms: Optional[float]
    new_ms: Optional[float]
    old_spread: float = 0.0  # (p80 - p20) / median of OLD's samples; 0 when unknown
    new_spread: float = 0.0

    def allowance(self, threshold: float) -> float:
        """The slowdown (as a fraction) that still counts as noise for this pair."""
        return min(max(threshold, self.old_spread + self.new_spread), max(threshold, MAX_NOISE))

    @property
    def ratio(self) -> Optional[float]:
        """NEW time / OLD time (above 1: slower)."""
        if self.old_ms is None or self.new_ms is None:
            return None
        return self.new_ms / self.old_ms

    def verdict(self, threshold: float) -> str:
        """slower / faster / same beyond the noise threshold; broken or fixed when correctness changed."""
        if self.new_status != Status.OK.value:
            return "broken"  # OK before (pairs failing in both are not compared)
        if self.old_status != Status.OK.value:
            return "fixed"
        ratio, allowance = self.ratio, self.allowance(threshold)
        if ratio is not None and ratio > 1.0 + allowance:
            return "slower"
        if ratio is not None and ratio < 1.0 / (1.0 + allowance):
            return "faster"
        return "same"

REGRESSIONS = ("slower", "broken")
_VERDICT_STYLE = {"slower": "bold red", "broken": "bold red", "faster": "green", "fixed": "green"}


def _median_ms(measurement: dict[str, Any]) -> Optional[float]:
    timing = measurement.get("timing")
    return timing["median_ms"] if timing else None


def relative_spread(measurement: dict[str, Any]) -> float:
    """(p80 - p20) / median of a measurement's samples; 0 without a timing."""
    timing = measurement.get("timing")
    if not timing or not timing.get("median_ms"):
        return 0.0
    return max(0.0, (timing["p80_ms"] - timing["p20_ms"]) / timing["median_ms"])


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "cells" not in document or not isinstance(document["cells"], list):
        raise ValueError(f"{path} is not a results.json written by python -m bench")
    return document


def compare_documents(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], int, int]:
    """The changes of every (cell, implementation) in both, and the counts found only in OLD / NEW,
    leaving out pairs that are n/a or failing in both (nothing to compare)."""
    old_cells = {cell_key(cell): cell for cell in old["cells"]}
    new_cells = {cell_key(cell): cell for cell in new["cells"]}
    changes = []
    for key in old_cells.keys() & new_cells.keys():
        old_results = results_by_column(old_cells[key], old.get("environment", {}))
        new_results = results_by_column(new_cells[key], new.get("environment", {}))
        for name in old_results.keys() & new_results.keys():
            before, after = old_results[name], new_results[name]
            if Status.OK.value not in (before["status"], after["status"]):
                continue
            changes.append(Change(key, name, before["status"], after["status"], _median_ms(before), _median_ms(after),
                                  relative_spread(before), relative_spread(after)))
    changes.sort(key=lambda change: (change.cell, change.implementation))
    old_e2e, new_e2e = _e2e_rows(old), _e2e_rows(new)
    e2e_changes = [
        Change(key, name, old_e2e[key][name][0], new_e2e[key][name][0], old_e2e[key][name][1], new_e2e[key][name][1])
        for key in old_e2e.keys() & new_e2e.keys()
        for name in old_e2e[key].keys() & new_e2e[key].keys()
        if Status.OK.value in (old_e2e[key][name][0], new_e2e[key][name][0])
    ]
    changes += sorted(e2e_changes, key=lambda change: (change.cell, change.implementation))
    only_old = len(old_cells.keys() - new_cells.keys()) + len(old_e2e.keys() - new_e2e.keys())
    only_new = len(new_cells.keys() - old_cells.keys()) + len(new_e2e.keys() - old_e2e.keys())
    return changes, only_old, only_new


def _ms_per_token(tokens_per_s: Optional[float]) -> Optional[float]:
    return 1e3 / tokens_per_s if tokens_per_s else None


def _e2e_rows(document: dict[str, Any]) -> dict[tuple, dict[str, tuple[str, Optional[float]]]]:
    """e2e records as ``key -> {implementation: (status, ms per token)}``, with keys shaped like
    cell keys: (``gpt-<model>``, variant, dtype, "-", ``train`` or ``decode``)."""
    rows: dict[tuple, dict[str, tuple[str, Optional[float]]]] = {}
    for record in document.get("e2e", []):
        name = "dense" if record["variant"] == "dense" else "sparsekernels"
        for phase in ("train", "decode"):
            key = (f"gpt-{record['model']}", record["variant"], record["dtype"], "-", phase)
            rows[key] = {name: (record["status"], _ms_per_token(record.get(f"{phase}_tokens_per_s")))}
    return rows


def _environment_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old_environment, new_environment = old.get("environment", {}), new.get("environment", {})
    return [
        f"{field}: {old_environment.get(field)!r} -> {new_environment.get(field)!r}"
        for field in ENVIRONMENT_FIELDS_THAT_MATTER
        if old_environment.get(field) != new_environment.get(field)
    ]


def _format_ms(milliseconds: Optional[float]) -> str:
    return "-" if milliseconds is None else f"{milliseconds:.4g}"


def print_changes(changes: Sequence[Change], threshold: float, console: Console) -> None:
    table = Table(title="NEW vs OLD", caption=f"ratio = NEW time / OLD time; allowed = noise allowance: the two "
                  f"measurements' relative spreads (p80-p20)/median added, within [{threshold:.0%}, "
                  f"{max(threshold, MAX_NOISE):.0%}]")
    for column in CELL_KEY_FIELDS:
        table.add_column(column, justify="right" if column == "M" else "left")
    for column in ("implementation", "OLD ms", "NEW ms", "ratio", "allowed", "verdict"):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    for change in changes:
        verdict = change.verdict(threshold)
        style = _VERDICT_STYLE.get(verdict, "")
        old_ms = _format_ms(change.old_ms) if change.old_status == Status.OK.value else change.old_status
        new_ms = _format_ms(change.new_ms) if change.new_status == Status.OK.value else change.new_status
        ratio = "-" if change.ratio is None else f"{change.ratio:.2f}"
        table.add_row(
            *(str(part) for part in change.cell),
            change.implementation,
            old_ms,
            new_ms,
            ratio,
            f"{change.allowance(threshold):.0%}",
            f"[{style}]{verdict}[/]" if style else verdict,
        )
    console.print(table)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench compare",
        description="Compare two results.json files; exit 1 when NEW regresses against OLD.",
    )
    parser.add_argument("old", type=Path, help="results.json of the reference run")
    parser.add_argument("new", type=Path, help="results.json of the run to check")
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"smallest slowdown counted as a regression, as a fraction (default {DEFAULT_THRESHOLD}); noisier "
        f"measurements get more, up to {MAX_NOISE}",
    )
    args = parser.parse_args(argv)
    if args.threshold < 0:
        parser.error("--threshold must be >= 0")
    try:
        old, new = load(args.old), load(args.new)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    console = wide_console()
    for difference in _environment_differences(old, new):
        console.print(f"[yellow]environments differ[/] {escape(difference)}", highlight=False)
    changes, only_old, only_new = compare_documents(old, new)
    print_changes(changes, args.threshold, console)
    verdicts = [change.verdict(args.threshold) for change in changes]
    regressions = sum(verdict in REGRESSIONS for verdict in verdicts)
    console.print(
        f"compared {len(changes)}: regressions {regressions}, faster {verdicts.count('faster')}, "
        f"fixed {verdicts.count('fixed')}; cells only in OLD {only_old}, only in NEW {only_new}",
        highlight=False,
    )
    return 1 if regressions else 0
