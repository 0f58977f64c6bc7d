"""``--resume``: continue a cut-off run from the ``results.json`` it left, instead of starting over.

A GPU visit allows 10 minutes per command; the full suite takes hours. A run writes its
``results.json`` as it goes (:class:`Checkpoint`) and on Ctrl-C / SIGINT / SIGTERM, so a cut-off run
leaves the cells it measured. ``--resume`` reads them back: a requested cell already there with a
final status for every requested implementation is kept as it is; every other requested cell runs;
the file is rewritten with the union (cells of the old file that this run did not ask for are kept
too), ``run.complete`` true once every requested cell is in. :class:`RunRecord` holds a run's
cells, kept and new.

Cells measured in another environment would mix numbers that cannot be compared, so resuming is
refused when the file records another device, GPU, torch, triton or git commit, naming the field,
unless ``--resume-anyway`` (the mismatches are then recorded in ``run.resume``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cases import Case
from .results import ENVIRONMENT_FIELDS_THAT_MATTER, CellResult, Status, case_key, cell_key

# A measurement with one of these statuses is final: resuming does not run it again.
FINAL_STATUSES = frozenset(status.value for status in Status)  # ok, wrong, error, n/a
# What must be equal in the old file's environment and this run's (the GPU by its name): what compare
# checks, and the code itself.
RESUMED_ENVIRONMENT_FIELDS = (*ENVIRONMENT_FIELDS_THAT_MATTER, "git_commit")
CHECKPOINT_SECONDS = 20.0  # results.json is rewritten at most this often while a run goes on


class ResumeError(ValueError):
    """The old results file cannot be resumed from; the message says why."""


@dataclass
class Resumed:
    """What an earlier run left that this one keeps."""

    path: Path
    kept: dict[tuple, CellResult]  # requested cells measured already, by cell key
    others: list[CellResult]  # cells of the old file this run did not ask for (kept in the union)
    # Requested cells lacking an implementation of this run: run again, kept until they have been.
    incomplete: dict[tuple, CellResult] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)  # environment fields that differ (--resume-anyway)

    def to_run_dict(self, ran: int) -> dict[str, Any]:
        """``run.resume`` of the rewritten file."""
        return {"from": str(self.path), "kept_cells": len(self.kept), "ran_cells": ran,
                "environment_mismatches": self.mismatches}


def _gpu_name(gpu: Any) -> Any:
    return gpu.get("name") if isinstance(gpu, dict) else gpu


def environment_mismatches(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"field: old -> new"`` for each field of RESUMED_ENVIRONMENT_FIELDS that differs."""
    differences = []
    for name in RESUMED_ENVIRONMENT_FIELDS:
        before, after = old.get(name), new.get(name)
        if name == "gpu":
            before, after = _gpu_name(before), _gpu_name(after)
        if before != after:
            differences.append(f"{name}: {before!r} -> {after!r}")
    return differences


def load(
    path: Path, cases: Sequence[Case], names: Sequence[str], environment: dict[str, Any], anyway: bool
) -> Optional[Resumed]:
    """The cells of ``path`` to keep for a run of ``cases`` by ``names``; None when there is no file
    yet (a first run). Raises ResumeError on a file that is not a cell run's results, or (unless
    ``anyway``) that was measured in another environment."""
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text())
        cells = [CellResult.from_dict(cell) for cell in document["cells"]]
        old_environment = document["environment"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResumeError(f"{path} is not a readable results file ({type(error).__name__}: {error})") from error
    if document.get("e2e") is not None:
        raise ResumeError(f"{path} holds e2e results; --resume continues the cell suites (quick, full, targets)")
    mismatches = environment_mismatches(old_environment, environment)
    if mismatches and not anyway:
        raise ResumeError(
            f"{path} was measured in another environment ({'; '.join(mismatches)}): resuming would mix "
            "its cells with this run's; use another --out, or --resume-anyway to keep them all the same"
        )
    requested = {case_key(case) for case in cases}
    kept: dict[tuple, CellResult] = {}
    incomplete: dict[tuple, CellResult] = {}
    others: list[CellResult] = []
    for cell, result in zip(document["cells"], cells):
        key = cell_key(cell)
        if key not in requested:
            others.append(result)
        elif all(cell["results"].get(name, {}).get("status") in FINAL_STATUSES for name in names):
            kept[key] = result
        else:
            incomplete[key] = result
    return Resumed(path, kept, others, incomplete=incomplete, mismatches=mismatches)


class RunRecord:
    """The cells of a run so far: those ``--resume`` kept (or None, a fresh run) and those measured
    now, and the cells of the old file that this run did not ask for."""

    def __init__(self, cases: Sequence[Case], resumed: Optional[Resumed]) -> None:
        self.cases = list(cases)
        self.resumed = resumed
        self.measured: dict[tuple, CellResult] = {} if resumed is None else {**resumed.incomplete, **resumed.kept}
        self.final: set[tuple] = set() if resumed is None else set(resumed.kept)  # every result in: kept or run
        self.others: list[CellResult] = [] if resumed is None else list(resumed.others)
        self.to_run = [case for case in self.cases if case_key(case) not in self.final]
        self.ran = 0

    def add(self, result: CellResult) -> None:
        key = case_key(result.case)
        self.measured[key] = result
        self.final.add(key)
        self.ran += 1

    def results(self) -> list[CellResult]:
        """The requested cells measured so far (kept or new), in the run's order, then the others."""
        return [self.measured[key] for key in map(case_key, self.cases) if key in self.measured] + self.others

    def described_cases(self) -> list[Case]:
        """The cells the file describes: those requested, then the others kept."""
        return [*self.cases, *(result.case for result in self.others)]

    @property
    def complete(self) -> bool:
        return all(case_key(case) in self.final for case in self.cases)

    def resume_dict(self) -> Optional[dict[str, Any]]:
        return None if self.resumed is None else self.resumed.to_run_dict(self.ran)


class Checkpoint:
    """Calls ``write`` when CHECKPOINT_SECONDS have passed since the last write: results.json grows
    as the run goes, so that a run killed outright (SIGKILL, a lost machine) still leaves its cells
    for ``--resume``, at the cost of at most one rewrite of the file per CHECKPOINT_SECONDS."""

    def __init__(self, write: Callable[[], None]) -> None:
        self.write = write
        self.last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self.last >= CHECKPOINT_SECONDS:
            self.write()
            self.last = time.monotonic()
