"""The command line.

    python -m bench [--suite quick|full] [--device cpu|cuda] [--shapes 4096x4096,...]
                    [--layouts b64d0.1,2:4,...] [--dtype float32,bfloat16] [--m 1,16,256]
                    [--ops forward,grad_input,grad_weight,train_step] [--peers dense,torch_bsr,...]
                    [--backends triton,cuda]
                    [--repeats N] [--warmup N] [--flush-caches] [--threads N] [--fresh-pages] [--out DIR]
                    [--no-progress] [--resume [--resume-anyway]]
    python -m bench --suite e2e [--device ...] [--layouts b32d0.1,2:4] [--dtype float32] [--model small]
                    [--steps N] [--out DIR]
    python -m bench compare OLD.json NEW.json [--threshold 0.1]
    python -m bench plot RESULTS.json [--out DIR] [--prefix NAME-]
    python -m bench overhead [--device ...] [--shapes ...] [--layouts ...] [--m 1,16] [--dtype ...] [--out DIR]

Run it from the repository root (``bench`` is a package of the repository, not an installed one):
``cd <repo> && python -m bench``.

A run measures the suite's cells (each axis given on the command line replaces the suite's), prints
the table, and writes ``results.json``, ``results.csv`` and the PNG plots (``speedup.png``,
``roofline.png``) under ``--out``. sparsekernels gets one column per backend of ``--backends``
(``sparsekernels[triton]``, ``sparsekernels[cuda]``, ...). It exits with status 1 when a sparsekernels
result is wrong or raised, so that ``make bench`` cannot pass on a broken kernel. ``results.json`` is
rewritten as the run goes and on Ctrl-C or SIGTERM; ``--resume`` continues a cut-off run from it
(:mod:`bench.resume`). The e2e suite
(:mod:`bench.e2e`) measures whole models instead of cells and has its own table and files.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch
from rich.console import Console
from rich.markup import escape

from . import compare, e2e
from .cases import Case, Op, build_cases, dtype_name, layout_label, parse_dtype, parse_layout, parse_shape
from .e2e import E2E_MODELS, E2E_SUITE
from .allocator import steady_cpu_allocator
from .environment import collect_environment
from .implementations import (
    BASELINE,
    IMPLEMENTATIONS,
    OURS,
    PEERS,
    SPARSEKERNELS_BACKENDS,
    Implementation,
    available_peers,
    default_backends,
    is_ours,
    sparsekernels_columns,
)
from .plots import write_plots
from .report import (
    CSV_NAME,
    JSON_NAME,
    print_table,
    results_file_stem,
    save_to_results,
    wide_console,
    write_csv,
    write_json,
)
from .resume import Checkpoint, ResumeError, Resumed, RunRecord
from .resume import load as load_for_resume
from .results import CellResult, Status
from .roofline import peak_for_device
from .runner import run_cells
from .suites import SUITES
from .targets import TargetCell, print_targets, target_cases, target_rows
from .timing import TimingConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
EXIT_INTERRUPTED = 130  # the shell's status for a run stopped by Ctrl-C
ALL_PEERS = "all"  # --peers all: every peer, those that cannot run here showing n/a

Item = TypeVar("Item")


def _comma_list(parse_item: Callable[[str], Item]) -> Callable[[str], list[Item]]:
    """An argparse ``type`` for comma-separated lists; a bad item is reported by argparse."""

    def parse(text: str) -> list[Item]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [parse_item(item) for item in items]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return parse


def _positive_int(text: str) -> int:
    # ArgumentTypeError, not ValueError: argparse prints its message as is, where a ValueError
    # becomes "invalid _positive_int value: '0'" (the function's name).
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {text!r}")
    return value


def _backend_name(text: str) -> str:
    if text not in SPARSEKERNELS_BACKENDS:
        raise ValueError(f"unknown backend {text!r}; sparsekernels backends are {', '.join(SPARSEKERNELS_BACKENDS)}")
    return text


def _peer_name(text: str) -> str:
    if text != ALL_PEERS and text not in PEERS:
        raise ValueError(f"unknown peer {text!r}; peers are {', '.join(PEERS)} (or {ALL_PEERS})")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Is sparse faster for my shape, and by how much? Times sparsekernels against dense "
        "F.linear and other sparse libraries, checking every result against a float32 reference.",
        epilog="Compare two runs: python -m bench compare OLD.json NEW.json [--threshold 0.1]. "
        "Redraw plots: python -m bench plot RESULTS.json [--out DIR]. Host overhead per call at small M: "
        "python -m bench overhead. Details: docs/benchmark.md",
    )
    parser.add_argument("--suite", choices=sorted([*SUITES, E2E_SUITE]), default="quick",
                        help="cells to measure (default quick); e2e: whole sparsified GPT models")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available, else cpu",
    )
    parser.add_argument("--shapes", type=_comma_list(parse_shape), help="weights OUTxIN, e.g. 4096x4096,14336x4096")
    parser.add_argument("--layouts", type=_comma_list(parse_layout), help="e.g. b64d0.1,b64d0.5,2:4 (2:4T: transposable 2:4 mask)")
    parser.add_argument("--dtype", type=_comma_list(parse_dtype), help="e.g. float32,bfloat16 (or fp32,bf16,fp16)")
    parser.add_argument("--m", type=_comma_list(_positive_int), help="rows M of the input, e.g. 1,16,256")
    parser.add_argument("--ops", type=_comma_list(Op), help=f"any of {','.join(op.value for op in Op)}")
    parser.add_argument(
        "--peers",
        type=_comma_list(_peer_name),
        help=f"implementations to compare with, among {','.join(PEERS)}, or {ALL_PEERS} (default: those that run "
        "on the device); dense, the baseline, and sparsekernels are always measured; a peer that cannot run on "
        "the device shows n/a with the reason in results.json",
    )
    parser.add_argument(
        "--backends",
        type=_comma_list(_backend_name),
        help=f"sparsekernels backends to measure, one column each (sparsekernels[<backend>]), among "
        f"{','.join(SPARSEKERNELS_BACKENDS)}; default: every backend that runs on the device (cuda: triton,cuda; "
        "cpu: cpu), or the one SPARSEKERNELS_BACKEND forces",
    )
    parser.add_argument("--repeats", type=_positive_int, help="most timed samples per measurement")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing")
    parser.add_argument("--flush-caches", action="store_true",
                        help="CPU: flush the caches before every timed call (default: warm; see docs/benchmark.md)")
    parser.add_argument("--threads", type=_positive_int, help="torch.set_num_threads before running (CPU)")
    parser.add_argument("--fresh-pages", action="store_true",
                        help="keep glibc's default malloc thresholds, so that every large output is freshly "
                        "mapped and its page faults are timed (default: freed blocks are reused; see "
                        "docs/benchmark.md)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose results.json is in --out: its cells measured by every requested "
        "implementation are kept, the others run, the file gets the union (a first run when there is no file)",
    )
    parser.add_argument(
        "--resume-anyway",
        action="store_true",
        help="with --resume: resume even when results.json was measured with another device, GPU, torch, "
        "triton or git commit",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument(
        "--save",
        action="store_true",
        help="also keep the results (and plots) in bench/results/ under the machine's name and the date, "
        "e.g. h100-80gb-hbm3-2026-11-23.json, ready to commit",
    )
    e2e_options = parser.add_argument_group("e2e suite")
    e2e_options.add_argument("--model", choices=sorted(E2E_MODELS), help="model size (default: small on CPU, "
                             "medium on CUDA)")
    e2e_options.add_argument("--steps", type=_positive_int, help="training steps per model (the loss is "
                             "reported after them)")
    return parser


def _contenders(
    peers: Optional[list[str]], backends: Optional[list[str]], device: torch.device, console: Console
) -> list[type[Implementation]]:
    """dense, one sparsekernels column per backend, then the requested peers (by default: every
    backend and every peer that can run on ``device``)."""
    if peers is None:
        requested = available_peers(device)
    elif ALL_PEERS in peers:
        requested = list(PEERS)
    else:
        requested = peers
    ours = sparsekernels_columns(backends or default_backends(device))
    others = [IMPLEMENTATIONS[name] for name in dict.fromkeys(requested) if name not in (BASELINE, OURS)]
    for cls in (*ours, *others):
        reason = cls.unavailable_reason(device)
        if reason is not None:
            console.print(f"[yellow]{escape(cls.name)} cannot run here ({escape(reason)}): its cells will show n/a[/]",
                          highlight=False)
    return [IMPLEMENTATIONS[BASELINE], *ours, *others]


def _unique(values: Iterable[Item]) -> list[Item]:
    return list(dict.fromkeys(values))


def _summarize_failures(results: Sequence[CellResult], console: Console) -> int:
    """Print how many results were wrong or raised, per implementation; the count of sparsekernels'."""
    failures = Counter(
        (name, measurement.status)
        for result in results
        for name, measurement in result.measurements.items()
        if measurement.status in (Status.WRONG, Status.ERROR)
    )
    for (name, status), count in sorted(failures.items()):
        style = "bold red" if is_ours(name) else "yellow"
        console.print(f"[{style}]{escape(name)}: {count} cells {status.value.upper()}[/]")
    return sum(count for (name, _), count in failures.items() if is_ours(name))


def _plan(
    args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console
) -> tuple[list[Case], TimingConfig, Optional[dict[Case, list[TargetCell]]]]:
    """The cells and timing settings: the suite's, with each axis given on the command line replaced;
    for the targets suite also the issue cells behind each case (None for the other suites)."""
    grid = SUITES[args.suite](args.device)
    timing = TimingConfig(
        warmup=grid.timing.warmup if args.warmup is None else args.warmup,
        repeats=grid.timing.repeats if args.repeats is None else args.repeats,
        budget_s=grid.timing.budget_s,
        flush_cpu_caches=args.flush_caches,
    )
    behind = None
    if grid.cells:
        cases, behind, misfits = target_cases(grid.cells, args.shapes, args.layouts, args.dtype, args.m, args.ops)
    else:
        cases, misfits = build_cases(
            args.shapes or grid.shapes,
            args.layouts or grid.layouts,
            args.dtype or grid.dtypes,
            args.m or grid.rows,
            args.ops or grid.ops,
        )
    if misfits:
        console.print(f"[yellow]skipped (shape does not fit the layout):[/] {', '.join(misfits)}", highlight=False)
    if not cases:
        parser.error("no cells to measure")
    return cases, timing, behind


def _run_settings(
    args: argparse.Namespace,
    argv: Sequence[str],
    cases: Sequence[Case],
    names: list[str],
    timing: TimingConfig,
    complete: bool,
    resumed: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """What was asked for, stored in results.json next to the results (``cases``: the cells in the
    file, requested or kept by --resume; ``resumed``: what --resume kept, when it did)."""
    return {
        "suite": args.suite,
        "argv": list(argv),
        "complete": complete,
        **({} if resumed is None else {"resume": resumed}),
        "implementations": names,
        "timing": asdict(timing),
        "axes": {
            "shapes": _unique(case.shape_label for case in cases),
            "layouts": _unique(layout_label(case.layout) for case in cases),
            "dtypes": _unique(dtype_name(case.dtype) for case in cases),
            "M": _unique(case.rows for case in cases),
            "ops": _unique(case.op.value for case in cases),
        },
    }


def run(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.resume_anyway and not args.resume:
        parser.error("--resume-anyway only applies with --resume")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.fresh_pages:
        steady_cpu_allocator()
    console = wide_console()
    if args.suite == E2E_SUITE:
        if args.backends is not None:  # the e2e models run SparseLinear on the library's own choice
            parser.error("--backends applies to the cell suites (quick, full, targets), not to --suite e2e "
                         "(use SPARSEKERNELS_BACKEND there)")
        if args.resume:
            parser.error("--resume applies to the cell suites (quick, full, targets), not to --suite e2e")
        args.out.mkdir(parents=True, exist_ok=True)
        return e2e.run_suite(args, argv, device, console)
    cases, timing, behind = _plan(args, parser, console)
    implementations = _contenders(args.peers, args.backends, device, console)
    names = [cls.name for cls in implementations]
    args.out.mkdir(parents=True, exist_ok=True)
    environment = collect_environment(device)
    peak = peak_for_device(device)
    environment["gpu_peak"] = None if peak is None else peak.to_dict()

    record = RunRecord(cases, _resumed(args, parser, console, cases, names, environment))

    def write_files() -> tuple[list[CellResult], Optional[list[dict[str, Any]]], dict[str, Any]]:
        """Write results.json and results.csv with every cell so far; returns the cells, the targets
        suite's verdict rows and the run settings written."""
        results = record.results()
        target_report = None if behind is None else target_rows(results, behind, names)
        settings = _run_settings(args, argv, record.described_cases(), names, timing, record.complete,
                                 record.resume_dict())
        write_json(args.out / JSON_NAME, results, environment, settings, targets=target_report)
        write_csv(args.out / CSV_NAME, results)
        return results, target_report, settings

    checkpoint = Checkpoint(write_files)
    interrupted = False
    try:
        with _sigterm_as_interrupt():
            for result in run_cells(record.to_run, implementations, device, timing, progress=not args.no_progress,
                                    peak=peak):
                record.add(result)
                checkpoint.tick()
    except KeyboardInterrupt:  # keep what was measured: the full suite takes hours
        interrupted = True
        console.print(f"[yellow]interrupted: keeping the {record.ran} of {len(record.to_run)} cells measured[/]")

    results, target_report, settings = write_files()
    print_table(results, names, environment, console)
    if target_report is not None:
        print_targets(target_report, console)
    our_failures = _summarize_failures(results, console)
    console.print(f"wrote {args.out / JSON_NAME} and {args.out / CSV_NAME}", highlight=False)
    if not args.no_plots and results:
        document = {"environment": environment, "run": settings, "cells": [result.to_dict() for result in results]}
        paths = write_plots(document, args.out)
        console.print(f"wrote {', '.join(str(path) for path in paths)}", highlight=False)
    if args.save:
        save_to_results(args.out / JSON_NAME, results_file_stem(environment, args.suite), not args.no_plots, console)
    if interrupted:
        return EXIT_INTERRUPTED
    return 1 if our_failures else 0


def _resumed(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    console: Console,
    cases: Sequence[Case],
    names: list[str],
    environment: dict[str, Any],
) -> Optional[Resumed]:
    """With --resume, what the results file in --out keeps (None without one, or without --resume)."""
    if not args.resume:
        return None
    try:
        resumed = load_for_resume(args.out / JSON_NAME, cases, names, environment, args.resume_anyway)
    except ResumeError as error:
        parser.error(f"--resume: {error}")
    if resumed is None:
        console.print(f"--resume: no {args.out / JSON_NAME} yet, a first run", highlight=False)
    else:
        mismatches = f" (environment differs: {'; '.join(resumed.mismatches)})" if resumed.mismatches else ""
        console.print(f"resuming {resumed.path}: {len(resumed.kept)} of {len(cases)} cells kept, "
                      f"{len(cases) - len(resumed.kept)} to run{escape(mismatches)}", highlight=False)
    return resumed


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``timeout``'s default signal, a machine being shut down) stops the run the way
    Ctrl-C does, so that the cells measured so far are written; the previous handler is restored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def plot_main(argv: Sequence[str]) -> int:
    """``python -m bench plot RESULTS.json``: (re)draw the PNG plots of a results file."""
    parser = argparse.ArgumentParser(prog="python -m bench plot", description="Draw the PNG plots of a results.json.")
    parser.add_argument("results", type=Path, help="a results.json written by python -m bench")
    parser.add_argument("--out", type=Path, help="output directory (default: the results file's directory)")
    parser.add_argument(
        "--prefix",
        help="file name prefix (default: the results file's name and a dash, e.g. cpu-xeon-2026-11-23-, "
        "or none for results.json)",
    )
    args = parser.parse_args(argv)
    try:
        document = compare.load(args.results)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if not document["cells"] and not document.get("e2e"):
        parser.error(f"{args.results} has nothing to plot")
    stem = args.results.stem
    prefix = args.prefix if args.prefix is not None else ("" if stem == "results" else f"{stem}-")
    paths = write_plots(document, args.out or args.results.parent, prefix)
    for path in paths:
        print(f"wrote {path}")
    return 0 if paths else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    if argv[:1] == ["overhead"]:
        from . import overhead

        return overhead.main(argv[1:])
    return run(argv)
