"""``python -m bench compare OLD.json NEW.json``: per-cell time ratios and a regression check.

Cells are matched by (shape, layout, dtype, M, op) and implementation. Each pair gets a verdict:

* ``slower`` / ``faster`` / ``same``: both correct and timed the same way; ``slower`` when NEW's
  median time exceeds OLD's by more than the noise allowance. The allowance is noise-aware: the
  relative spread of each measurement, (p80 - p20) / median, is added up for OLD and NEW, and the
  allowance is that sum, at least ``--threshold`` (default 10%) and at most MAX_NOISE (50%, so a 2x
  slowdown is always caught however noisy the machine);
* ``broken``: correct in OLD, wrong or an error in NEW; ``fixed``: the reverse;
* ``n/a``: correct on one side, not applicable on the other (a peer uninstalled or added, a layout
  it stopped or started supporting). Listed, not a regression: nothing was measured to compare;
* ``method differs``: both timed, but by different methods (CUDA graphs in one, eager in the
  other; L2 flushed in one only; an e2e decode with and without a KV cache). Listed, not compared:
  the ratio would measure the method change, not the code.

Results NEW lacks are a failure too: an interrupted NEW run (``run.complete`` false) or a correct
result of OLD with no counterpart in NEW (a cell or implementation left out) fails the check unless
``--allow-incomplete`` says that was meant. The exit status is 1 on any ``slower`` or ``broken``
verdict or such a gap, 0 otherwise, so CI can run it after a benchmark. Both files should come from
the same machine: differing environments are pointed out, since their ratios say little about the code.

e2e results (``--suite e2e``) are compared the same way: each (model, variant, dtype) gives two rows,
``train`` and ``decode``, whose "time" is milliseconds per token (the inverse of tokens/s) and whose
spread is that of the step times (decode: of the per-token step times).

Files older than ``--backends`` have a single ``sparsekernels`` column: it matches
``sparsekernels[<backend>]``, the backend that file recorded as ``environment.sparsekernels_backend``
(:func:`bench.implementations.results_by_column`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .report import wide_console
from .implementations import is_ours, results_by_column
from .results import CELL_KEY_FIELDS, ENVIRONMENT_FIELDS_THAT_MATTER, Status, cell_key

DEFAULT_THRESHOLD = 0.10
MAX_NOISE = 0.50
OK, NOT_APPLICABLE = Status.OK.value, Status.NOT_APPLICABLE.value
E2E_PHASES = ("train", "decode")  # the two rows of an e2e record, in place of a cell's op
MISSING_LISTED = 10  # cells with missing results printed one by one; the rest are counted
# What e2e decode timed in files written before the record said (decode_method): the whole context per token.
E2E_DECODE_BEFORE_KV_CACHE = "full_context"


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
    old_method: Optional[str] = None  # how the time was taken (timing_method), None when untimed
    new_method: Optional[str] = None

    def allowance(self, threshold: float) -> float:
        """The slowdown (as a fraction) that still counts as noise for this pair."""
        return min(max(threshold, self.old_spread + self.new_spread), max(threshold, MAX_NOISE))

    @property
    def ratio(self) -> Optional[float]:
        """NEW time / OLD time (above 1: slower)."""
        if self.old_ms is None or self.new_ms is None:
            return None
        return self.new_ms / self.old_ms

    @property
    def comparable(self) -> bool:
        """Both correct and timed the same way: the ratio means something."""
        return self.old_status == self.new_status == OK and self.old_method == self.new_method

    def verdict(self, threshold: float) -> str:
        """slower / faster / same beyond the noise threshold; broken or fixed when correctness changed;
        n/a when one side had nothing to measure; method differs when the timings are not comparable."""
        if self.new_status not in (OK, NOT_APPLICABLE):
            return "broken"  # OK before (pairs failing in both are not compared)
        if self.old_status == OK and self.new_status == NOT_APPLICABLE and is_ours(self.implementation):
            return "broken"  # a peer may come and go; this library losing a cell it ran is a regression
        if NOT_APPLICABLE in (self.old_status, self.new_status):
            return "n/a"
        if self.old_status != OK:
            return "fixed"
        if self.old_method != self.new_method:
            return "method differs"
        ratio, allowance = self.ratio, self.allowance(threshold)
        if ratio is not None and ratio > 1.0 + allowance:
            return "slower"
        if ratio is not None and ratio < 1.0 / (1.0 + allowance):
            return "faster"
        return "same"


REGRESSIONS = ("slower", "broken")
_VERDICT_STYLE = {"slower": "bold red", "broken": "bold red", "faster": "green", "fixed": "green",
                  "n/a": "yellow", "method differs": "yellow"}


@dataclass
class Comparison:
    """Everything compare found between OLD and NEW."""

    changes: list[Change] = field(default_factory=list)
    only_old: int = 0  # cells (and e2e rows) only in OLD
    only_new: int = 0
    # (cell, implementation) pairs correct in OLD and absent from NEW
    missing: list[tuple[tuple, str]] = field(default_factory=list)
    new_incomplete: bool = False  # NEW says its run was interrupted (run.complete false)

    @property
    def gaps(self) -> bool:
        """NEW lacks results OLD has: a failure unless --allow-incomplete."""
        return bool(self.missing) or self.new_incomplete


def _median_ms(measurement: dict[str, Any]) -> Optional[float]:
    timing = measurement.get("timing")
    return timing["median_ms"] if timing else None


def relative_spread(measurement: dict[str, Any]) -> float:
    """(p80 - p20) / median of a measurement's samples; 0 without a timing."""
    timing = measurement.get("timing")
    if not timing:
        return 0.0
    return _spread(timing.get("median_ms"), timing.get("p20_ms"), timing.get("p80_ms"))


def _spread(median: Optional[float], p20: Optional[float], p80: Optional[float]) -> float:
    if not median or p20 is None or p80 is None:
        return 0.0
    return max(0.0, (p80 - p20) / median)


def timing_method(measurement: dict[str, Any]) -> Optional[str]:
    """How a measurement was timed: ``wall_clock``, ``eager`` or ``cuda_graph``, with ``+l2_flush``
    when the caches were flushed before every call (CUDA graphs; CPU with ``--flush-caches``); None
    when it was not timed."""
    timing = measurement.get("timing")
    if not timing:
        return None
    return timing["method"] + ("+l2_flush" if timing.get("l2_flushed") else "")


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "cells" not in document or not isinstance(document["cells"], list):
        raise ValueError(f"{path} is not a results.json written by python -m bench")
    return document


def compare_documents(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """The changes of every (cell, implementation) in both, leaving out pairs that are n/a or failing
    in both (nothing to compare), and what OLD has that NEW lacks."""
    rows = {}
    for name, document in (("old", old), ("new", new)):
        rows[name] = {cell_key(cell): results_by_column(cell, document.get("environment", {}))
                      for cell in document["cells"]}
        rows[name].update(_e2e_rows(document))
    comparison = Comparison(new_incomplete=new.get("run", {}).get("complete", True) is False)
    for key, old_results in rows["old"].items():
        new_results = rows["new"].get(key, {})
        for name, before in old_results.items():
            after = new_results.get(name)
            if after is None:
                if before["status"] == OK:
                    comparison.missing.append((key, name))
                continue
            if OK not in (before["status"], after["status"]):
                continue
            comparison.changes.append(Change(
                key, name, before["status"], after["status"], _median_ms(before), _median_ms(after),
                relative_spread(before), relative_spread(after), timing_method(before), timing_method(after)))
    # cells first, then e2e rows (their keys end in train / decode, not an op)
    comparison.changes.sort(key=lambda change: (change.cell[-1] in E2E_PHASES, change.cell, change.implementation))
    comparison.missing.sort(key=lambda item: (item[0][-1] in E2E_PHASES, item))
    comparison.only_old = len(rows["old"].keys() - rows["new"].keys())
    comparison.only_new = len(rows["new"].keys() - rows["old"].keys())
    return comparison



def _e2e_rows(document: dict[str, Any]) -> dict[tuple, dict[str, dict[str, Any]]]:
    """e2e records as ``key -> {implementation: measurement}``, shaped like cells and their results:
    keys (``gpt-<model>``, variant, dtype, "-", ``train`` or ``decode``), measurements whose timing
    is milliseconds per token, with the spread of the step times."""
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for record in document.get("e2e", []):
        name = "dense" if record["variant"] == "dense" else "sparsekernels"
        for phase in E2E_PHASES:
            key = (f"gpt-{record['model']}", record["variant"], record["dtype"], "-", phase)
            rows[key] = {name: {"status": record["status"], "timing": _e2e_timing(record, phase)}}
    return rows


def _e2e_timing(record: dict[str, Any], phase: str) -> Optional[dict[str, Any]]:
    tokens_per_s = record.get(f"{phase}_tokens_per_s")
    if not tokens_per_s:
        return None
    stats = ("step_ms", "step_p20_ms", "step_p80_ms") if phase == "train" else (
        "token_ms", "token_p20_ms", "token_p80_ms")
    median, p20, p80 = (record.get(f"{phase}_{stat}") for stat in stats)
    ms_per_token = 1e3 / tokens_per_s
    # A step's time is a fixed number of tokens' time: its percentiles scale like its median.
    # Files from before the percentiles were kept give no spread (the allowance is --threshold).
    scale = ms_per_token / median if median and p20 is not None and p80 is not None else None
    method = "wall_clock" if phase == "train" else record.get("decode_method", E2E_DECODE_BEFORE_KV_CACHE)
    return {"median_ms": ms_per_token, "p20_ms": p20 * scale if scale else ms_per_token,
            "p80_ms": p80 * scale if scale else ms_per_token, "method": method}


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
        if verdict == "method differs":
            verdict += f" ({change.old_method} -> {change.new_method})"
        old_ms = _format_ms(change.old_ms) if change.old_status == OK else change.old_status
        new_ms = _format_ms(change.new_ms) if change.new_status == OK else change.new_status
        ratio = "-" if change.ratio is None or not change.comparable else f"{change.ratio:.2f}"
        table.add_row(
            *(str(part) for part in change.cell),
            change.implementation,
            old_ms,
            new_ms,
            ratio,
            f"{change.allowance(threshold):.0%}" if change.comparable else "-",
            f"[{style}]{escape(verdict)}[/]" if style else verdict,
        )
    console.print(table)


def print_gaps(comparison: Comparison, allowed: bool, console: Console) -> None:
    """What NEW lacks, and whether it fails the check."""
    consequence = "allowed by --allow-incomplete" if allowed else "fails the check (--allow-incomplete allows it)"
    if comparison.new_incomplete:
        console.print(f"[bold yellow]NEW is an interrupted run[/] (run.complete is false): {consequence}",
                      highlight=False)
    if comparison.missing:
        console.print(f"[bold yellow]NEW lacks {len(comparison.missing)} result(s) that OLD measured correctly[/]: "
                      f"{consequence}", highlight=False)
        by_cell: dict[tuple, list[str]] = {}
        for key, name in comparison.missing:
            by_cell.setdefault(key, []).append(name)
        for key, names in list(by_cell.items())[:MISSING_LISTED]:
            cell = " ".join(str(part) for part in key)
            console.print(f"  missing: {escape(cell)}: {escape(', '.join(names))}", highlight=False)
        if len(by_cell) > MISSING_LISTED:
            console.print(f"  ... and {len(by_cell) - MISSING_LISTED} more cells", highlight=False)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench compare",
        description="Compare two results.json files; exit 1 when NEW regresses against OLD or lacks results it has.",
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
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="pass even when NEW is an interrupted run or lacks results OLD measured (a smaller grid on purpose)",
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
    comparison = compare_documents(old, new)
    print_changes(comparison.changes, args.threshold, console)
    print_gaps(comparison, args.allow_incomplete, console)
    verdicts = [change.verdict(args.threshold) for change in comparison.changes]
    regressions = sum(verdict in REGRESSIONS for verdict in verdicts)
    console.print(
        f"compared {len(verdicts)}: regressions {regressions}, faster {verdicts.count('faster')}, "
        f"fixed {verdicts.count('fixed')}, n/a {verdicts.count('n/a')}, not compared (timing method differs) "
        f"{verdicts.count('method differs')}; cells only in OLD {comparison.only_old}, only in NEW "
        f"{comparison.only_new}, results missing in NEW {len(comparison.missing)}",
        highlight=False,
    )
    failed = regressions or (comparison.gaps and not args.allow_incomplete)
    return 1 if failed else 0
