"""Measures every implementation on every cell: build the tensors, check the result, time, derive.

Cells sharing a weight (same shape, layout, dtype) are adjacent, so each weight is pruned, and
converted by each implementation, once. For each implementation and cell:

1. run the op once and check it against the float32 reference (this call is also the first warm-up);
2. a wrong result is marked WRONG and not timed, so it can never look fast;
3. a correct one is timed, and the output of a call made after the first is checked too, with the
   same tolerance: the last timed call's (on CUDA: the last eager call's and a CUDA graph replay's),
   or one more call's when the timer hands none back. A tuner that switches configurations after
   the first call, a graph replay that differs from eager execution, or a stateful implementation
   would otherwise be timed wrong and look fast; such a cell is WRONG ("wrong after timing"), with
   no timing;
4. a correct one then gets useful TFLOP/s, GB/s, its speedup over ``dense`` and, on a GPU of the
   peak table (:mod:`bench.roofline`), its percentage of the roofline.

Anything an implementation raises (converting the weight, running, timing) is recorded in its cell
and the run goes on; only KeyboardInterrupt and the like stop it. A sparsekernels column converts
the weight and is checked and timed inside its ``forced()`` context, which forces its backend.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import replace
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from tqdm import tqdm

from .cases import Case, dtype_name
from .correctness import Verdict, check, reference_outputs
from .errors import describe_error
from .implementations import BASELINE, Implementation
from .metrics import bytes_needed, useful_flops
from .results import CellResult, Measurement, Status
from .roofline import Peak, percent_of_roofline
from .timing import Timer, TimingConfig, timer_for

CALL_AFTER_TIMING = "one more call after timing"  # the check's call when the timer hands back no output
from .workloads import Inputs, SparseWeight, build_inputs, build_weight

# An implementation bound to the current weight, or the measurement every cell of it gets instead.
Bound = Union[Implementation, Measurement]


def run_cells(
    cases: Sequence[Case],
    implementations: Sequence[type[Implementation]],
    device: torch.device,
    timing: TimingConfig,
    progress: bool = True,
    peak: Optional[Peak] = None,
) -> Iterator[CellResult]:
    """Measure ``implementations`` (the first must be ``dense``, the baseline) on ``cases``, yielding
    each cell's result as soon as it is complete (so an interrupted run keeps what it measured).
    ``peak``, the device's entry of the peak table, adds the percentage of roofline to each result."""
    if not implementations or implementations[0].name != BASELINE:
        raise ValueError(f"the first implementation must be the baseline {BASELINE!r}")
    timer = timer_for(device, timing)
    with tqdm(total=len(cases), file=sys.stderr, disable=not progress, unit="cell", dynamic_ncols=True) as bar:
        for weight_key, group in itertools.groupby(cases, key=lambda case: case.weight_key):
            group = list(group)
            bar.set_postfix_str(group[0].weight_label)
            for result in _run_weight_group(group, weight_key, implementations, device, timer, peak):
                bar.update()
                yield result
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next weight may be far larger


def _run_weight_group(
    cases: list[Case],
    weight_key: tuple,
    implementations: Sequence[type[Implementation]],
    device: torch.device,
    timer: Timer,
    peak: Optional[Peak],
) -> Iterator[CellResult]:
    try:
        weight = build_weight(*weight_key, device)
    except Exception as error:
        failure = Measurement(Status.ERROR, f"building the weight: {describe_error(error)}")
        for case in cases:
            yield CellResult(case, None, 0, 0, {cls.name: replace(failure) for cls in implementations})
        return
    bound = {cls.name: _bind(cls, weight) for cls in implementations}
    for rows, row_cases in itertools.groupby(cases, key=lambda case: case.rows):
        inputs = build_inputs(weight, rows)
        for case in row_cases:
            yield _run_cell(case, weight, inputs, bound, timer, peak)


def _bind(cls: type[Implementation], weight: SparseWeight) -> Bound:
    # A peer that cannot run on this device at all (torch 2:4 or stk on CPU, stk not installed) was
    # asked for explicitly: its cells say why, as "n/a", rather than stopping the run.
    reason = cls.unavailable_reason(weight.masked_dense.device) or cls.unsupported_reason(weight.layout)
    if reason is not None:
        return Measurement(Status.NOT_APPLICABLE, reason)
    try:
        with cls.forced():
            return cls(weight)
    except Exception as error:
        return Measurement(Status.ERROR, f"converting the weight: {describe_error(error)}")


def _run_cell(
    case: Case, weight: SparseWeight, inputs: Inputs, bound: dict[str, Bound], timer: Timer, peak: Optional[Peak]
) -> CellResult:
    result = CellResult(case, weight.matrix.density, useful_flops(case, weight), bytes_needed(case, weight))
    expected: Optional[tuple[torch.Tensor, ...]] = None

    def reference() -> tuple[torch.Tensor, ...]:
        nonlocal expected
        if expected is None:
            expected = reference_outputs(case.op, weight, inputs)
        return expected

    for name, implementation in bound.items():
        if isinstance(implementation, Measurement):
            result.measurements[name] = replace(implementation)
        elif case.op not in implementation.ops:
            result.measurements[name] = Measurement(Status.NOT_APPLICABLE, f"{name} has no {case.op.value}")
        else:
            with implementation.forced():  # a sparsekernels column's backend, for the check and the timing
                result.measurements[name] = _measure(implementation, case, inputs, reference, timer)
    _derive(result, peak)
    return result


def _measure(
    implementation: Implementation,
    case: Case,
    inputs: Inputs,
    reference: Callable[[], tuple[torch.Tensor, ...]],
    timer: Timer,
) -> Measurement:
    try:
        run, canonical = implementation.runner(case.op, inputs)
        verdict = check(canonical(run()), reference(), case.dtype)
    except Exception as error:
        return Measurement(Status.ERROR, describe_error(error))
    if not verdict.correct:
        return Measurement(Status.WRONG, _wrong_detail(verdict), **_errors(verdict))
    verdicts: list[tuple[str, Verdict]] = [("the first call", verdict)]

    def check_timed_output(label: str, output: object) -> None:
        verdicts.append((label, check(canonical(output), reference(), case.dtype)))

    paths_before = _dispatch_counts()
    try:
        timing = timer.measure(run, on_output=check_timed_output)
        path = _path_taken(paths_before, _dispatch_counts())
        if len(verdicts) == 1:
            check_timed_output(CALL_AFTER_TIMING, run())
    except Exception as error:
        return Measurement(Status.ERROR, f"timing: {describe_error(error)}", **_errors(verdict))
    for label, later in verdicts[1:]:
        if not later.correct:
            detail = f"wrong after timing ({label}; the first call was right): {_wrong_detail(later)}"
            return Measurement(Status.WRONG, detail, **_errors(later))
    return Measurement(Status.OK, timing=timing, path=path, **_errors(*(later for _, later in verdicts)))


def _wrong_detail(verdict: Verdict) -> str:
    if verdict.max_rel_error is None:
        return "non-finite output"
    return f"error {verdict.max_rel_error:.2e} of the output scale > tolerance {verdict.tolerance:.0e}"


def _errors(*verdicts: Verdict) -> dict[str, Optional[float]]:
    """The measurement's error fields: the largest errors over ``verdicts`` (all of them finite)."""
    return {
        "max_abs_error": max(verdict.max_abs_error for verdict in verdicts),
        "max_rel_error": max(verdict.max_rel_error for verdict in verdicts),
        "tolerance": verdicts[0].tolerance,
    }


def _dispatch_counts() -> Optional[dict[str, int]]:
    """The Triton dispatcher's path counters, when it has been loaded (CUDA runs only)."""
    dispatch = sys.modules.get("sparsekernels.triton.dispatch")
    return None if dispatch is None else dict(dispatch.path_counts)


def _path_taken(before: Optional[dict[str, int]], after: Optional[dict[str, int]]) -> Optional[str]:
    """Which dispatch path ran while a cell was timed: "sparse", "cuda", "dense", "mixed", or None."""
    if after is None:
        return None
    taken = [path for path, count in after.items() if count > (before or {}).get(path, 0)]
    if not taken:
        return None
    return taken[0] if len(taken) == 1 else "mixed"


def _derive(result: CellResult, peak: Optional[Peak] = None) -> None:
    """Fill TFLOP/s, GB/s, the speedup over dense and the % of roofline of every correct, timed
    measurement."""
    baseline = result.measurements.get(BASELINE)
    baseline_ms = baseline.timing.median_ms if baseline is not None and baseline.timing is not None else None
    for measurement in result.measurements.values():
        if measurement.status is not Status.OK or measurement.timing is None:
            continue
        seconds = measurement.timing.median_ms * 1e-3
        measurement.tflops = result.useful_flops / seconds / 1e12
        measurement.gbps = result.bytes_needed / seconds / 1e9
        measurement.roofline_pct = percent_of_roofline(
            peak, dtype_name(result.case.dtype), result.useful_flops, result.bytes_needed, measurement.tflops
        )
        if baseline_ms is not None:
            measurement.speedup = baseline_ms / measurement.timing.median_ms
