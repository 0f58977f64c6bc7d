"""Where results go: a ``rich`` table on the terminal, ``results.json`` and ``results.csv``.

The table has one row per cell: the cell, the dense time, then per implementation its time and
speedup over dense. A wrong result shows WRONG (never a time or a speedup), an error shows a
numbered marker whose message is listed under the table, and "n/a" means the implementation has
nothing for that cell. ``results.json`` holds every cell with all its numbers plus the environment
and the run's settings; ``results.csv`` has one row per (cell, implementation), for spreadsheets.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .implementations import BASELINE
from .plots import write_plots
from .results import CellResult, Measurement, Status, results_json

SCHEMA_VERSION = 1
JSON_NAME = "results.json"
CSV_NAME = "results.csv"
REDIRECTED_WIDTH = 200

CSV_MEASUREMENT_FIELDS = (
    "implementation",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "eager_median_ms",
    "samples",
    "timing_method",
    "graph_failure",
    "l2_flushed",
    "speedup",
    "tflops",
    "gbps",
    "roofline_pct",
    "path",
    "max_abs_error",
    "max_rel_error",
    "tolerance",
    "detail",
)


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _slug(text: str) -> str:
    words = re.sub(r"\((r|tm)\)|nvidia|processor|cpu|\bcore\b", " ", text.lower())
    return "-".join(re.findall(r"[a-z0-9]+", words))


def results_file_stem(environment: dict[str, Any], suite: str) -> str:
    """The name a results file gets under ``bench/results/``: the machine and the date, e.g.
    ``h100-80gb-hbm3-2026-11-23`` or ``cpu-intel-xeon-2core-2026-11-23``, then the suite's name for
    every suite but quick (``-e2e``, ``-targets``, ``-full``), so that one day's runs do not overwrite
    each other."""
    gpu = environment.get("gpu")
    if gpu:
        machine = _slug(gpu.get("name") or "gpu")
    else:
        machine = f"cpu-{_slug(environment.get('cpu_model') or 'unknown')}-{environment.get('cpu_count')}core"
        # One CPU model name can hide different vector units (an "AMD EPYC" VM may be Zen 3 with
        # AVX2 only, or Zen 4 with AVX-512): files record the kernels' ISA where the run knew it.
        if environment.get("cpu_isa"):
            machine += f"-{environment['cpu_isa']}"
    stem = f"{machine}-{(environment.get('date_utc') or 'undated')[:10]}"
    return stem if suite == "quick" else f"{stem}-{suite}"


def wide_console() -> Console:
    """A rich console; when output is redirected, lines are 200 columns rather than rich's 80, so
    that table rows stay on one line in logs."""
    console = Console()
    return console if console.is_terminal else Console(width=REDIRECTED_WIDTH)


class _Footnotes:
    """Numbers each distinct error message once, for the list under the table."""

    def __init__(self) -> None:
        self.messages: dict[str, int] = {}

    def mark(self, message: str) -> int:
        return self.messages.setdefault(message, len(self.messages) + 1)


def _format_ms(milliseconds: float) -> str:
    return f"{milliseconds:.3g}" if milliseconds < 1000 else f"{milliseconds:,.0f}"


def _format_speedup(speedup: float) -> str:
    digits = 2 if speedup < 10 else 1 if speedup < 100 else 0
    return f"{speedup:.{digits}f}x"


def _format_measurement(name: str, measurement: Optional[Measurement], footnotes: _Footnotes) -> str:
    if measurement is None or measurement.status is Status.NOT_APPLICABLE:
        return "[dim]n/a[/]"
    if measurement.status is Status.WRONG:
        return "[bold red]WRONG[/]"
    if measurement.status is Status.ERROR or measurement.timing is None:
        return f"[yellow]error \\[{footnotes.mark(f'{name}: {measurement.detail}')}][/]"
    text = _format_ms(measurement.timing.median_ms)
    if measurement.timing.graph_failure is not None:
        note = f"{name}: no CUDA graph time ({measurement.timing.graph_failure}), eager time shown"
        text += f" [yellow]\\[{footnotes.mark(note)}][/]"
    if name != BASELINE and measurement.speedup is not None:
        color = "green" if measurement.speedup >= 1.0 else "red"
        text += f" [{color}]{_format_speedup(measurement.speedup)}[/]"
    if measurement.roofline_pct is not None:
        text += f" [dim]{measurement.roofline_pct:.0f}%[/]"
    if measurement.path == "dense":
        text += " [dim](dense fallback)[/]"
    return text


BUSY_LOAD_FRACTION = 0.5  # a 1-minute load average above this share of the cores makes CPU timings suspect


def busy_machine_warning(environment: dict[str, Any]) -> Optional[str]:
    """A warning when other work was running as the measurement started (CPU timings only)."""
    load, cores = environment.get("load_average_1min"), environment.get("cpu_count")
    if environment.get("device") != "cpu" or load is None or not cores or load < BUSY_LOAD_FRACTION * cores:
        return None
    return (f"the machine was busy (1-minute load average {load:.2f} on {cores} cores when the run started): "
            "CPU timings include waiting for the cores and can be far off; rerun on an idle machine")


def print_table(
    results: Sequence[CellResult], implementation_names: Sequence[str], environment: dict[str, Any], console: Console
) -> None:
    if environment["device"] == "cuda":
        timing_note = "kernel time through CUDA graphs, L2 flushed (eager time in results.json)"
        peak = environment.get("gpu_peak")
        if peak:
            timing_note += f"; n% = share of the {peak['model']} roofline"
    else:
        threads = environment["torch_threads"]
        timing_note = f"wall time on {threads} thread{'' if threads == 1 else 's'}"
        if environment.get("cpu_isa"):
            timing_note += f", {environment['cpu_isa']} kernels"
    table = Table(
        title="sparsekernels benchmark",
        caption=f"median {timing_note}; speedup = dense time / implementation time; "
        "WRONG = outside tolerance of the float32 reference (not timed)",
    )
    for column in ("shape", "layout", "dtype", "M", "op"):
        table.add_column(column, justify="right" if column == "M" else "left")
    for name in implementation_names:
        # escape: "sparsekernels[cuda]" would otherwise be read as rich markup and lose its "[cuda]".
        table.add_column(escape(f"{name} ms" if name == BASELINE else f"{name} ms, speedup"), justify="right")
    footnotes = _Footnotes()
    previous_weight = None
    for result in results:
        if previous_weight is not None and result.case.weight_key != previous_weight:
            table.add_section()
        previous_weight = result.case.weight_key
        cell = result.cell_dict()
        row = [cell["shape"], cell["layout"], cell["dtype"], str(cell["M"]), cell["op"]]
        row += [_format_measurement(name, result.measurements.get(name), footnotes) for name in implementation_names]
        table.add_row(*row)
    console.print(table)
    for message, number in footnotes.messages.items():
        console.print(f"[yellow]\\[{number}][/] {escape(message)}", highlight=False)
    if warning := busy_machine_warning(environment):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)


def write_json(
    path: Path,
    results: Sequence[CellResult],
    environment: dict[str, Any],
    run: dict[str, Any],
    targets: Optional[list[dict[str, Any]]] = None,
) -> None:
    """``targets``: the targets suite's verdict rows (:func:`bench.targets.target_rows`), stored as
    ``"targets"`` when given."""
    document = {
        "schema_version": SCHEMA_VERSION,
        "environment": environment,
        "run": run,
        "cells": [result.to_dict() for result in results],
    }
    if targets is not None:
        document["targets"] = targets
    _replace_atomically(path, results_json(document))


def _replace_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a run killed while writing
    leaves the previous file whole (``--resume`` reads it), never a truncated one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _csv_row(cell: dict[str, Any], name: str, measurement: Measurement) -> dict[str, Any]:
    timing = measurement.timing
    return {
        **cell,
        "implementation": name,
        "status": measurement.status.value,
        "median_ms": timing.median_ms if timing else None,
        "p20_ms": timing.p20_ms if timing else None,
        "p80_ms": timing.p80_ms if timing else None,
        "eager_median_ms": timing.eager_median_ms if timing else None,
        "samples": timing.samples if timing else None,
        "timing_method": timing.method if timing else None,
        "graph_failure": timing.graph_failure if timing else None,
        "l2_flushed": timing.l2_flushed if timing else None,
        "speedup": measurement.speedup,
        "tflops": measurement.tflops,
        "gbps": measurement.gbps,
        "roofline_pct": measurement.roofline_pct,
        "path": measurement.path,
        "max_abs_error": measurement.max_abs_error,
        "max_rel_error": measurement.max_rel_error,
        "tolerance": measurement.tolerance,
        "detail": measurement.detail,
    }


def write_csv(path: Path, results: Sequence[CellResult]) -> None:
    rows = [
        _csv_row(result.cell_dict(), name, measurement)
        for result in results
        for name, measurement in result.measurements.items()
    ]
    cell_fields = list(results[0].cell_dict()) if results else []
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[*cell_fields, *CSV_MEASUREMENT_FIELDS])
    writer.writeheader()
    writer.writerows(rows)
    _replace_atomically(path, text.getvalue())


def save_to_results(
    json_path: Path, stem: str, plots: bool, console: Console, results_dir: Path = RESULTS_DIR
) -> Path:
    """Copy a results.json into ``results_dir`` as ``<stem>.json`` with its plots named ``<stem>-*.png``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    saved = results_dir / f"{stem}.json"
    saved.write_text(json_path.read_text())
    paths = write_plots(json.loads(saved.read_text()), results_dir, f"{stem}-") if plots else []
    console.print(f"saved {', '.join(str(path) for path in (saved, *paths))}", highlight=False)
    return saved
