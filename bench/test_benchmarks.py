"""pytest-benchmark variants of the quick suite's cells: ``pytest bench --benchmark-only``.

Each test is one (cell, implementation) of ``python -m bench --suite quick`` on the best device
present, for people who already compare runs with pytest-benchmark (``--benchmark-autosave``,
``--benchmark-compare``).

``sparsekernels`` is the library as a user gets it (the backend it picks for the device); every other
backend that runs there gets its own ``sparsekernels[<backend>]`` tests (on CUDA:
``sparsekernels[cuda]``, the CUDA C++ kernels, beside the Triton ones picked by default).

Like the harness, a test first checks the result against the float32 reference and fails on a wrong
one, so a wrong kernel is never timed, and checks the result of a call made after timing too; a
peer that raises or has nothing for the cell is skipped with the reason.

These are not unit tests: they live in ``bench/``, outside pytest's ``testpaths`` (``tests``), so
``make test`` and CI never collect them; they run only when ``bench`` is named on the command line.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.cases import Case, dtype_name, layout_label
from bench.correctness import check, reference_outputs
from bench.errors import describe_error
from bench.implementations import (
    BASELINE,
    IMPLEMENTATIONS,
    OURS,
    available_peers,
    backend_column,
    default_backends,
    is_ours,
    sparsekernels_columns,
)
from sparsekernels.backend import resolve_backend
from bench.suites import quick
from bench.workloads import SparseWeight, build_inputs, build_weight

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRID = quick(DEVICE.type)
# Backends that run here besides the one the library picks, each forced for its own tests.
OTHER_BACKENDS = [backend for backend in default_backends(DEVICE) if backend != resolve_backend(DEVICE)]
CONTENDERS = {
    **IMPLEMENTATIONS,
    **{cls.name: cls for cls in sparsekernels_columns(OTHER_BACKENDS)},
}
NAMES = [BASELINE, OURS, *map(backend_column, OTHER_BACKENDS),
         *(name for name in available_peers(DEVICE) if name != BASELINE)]
CASES = [
    Case(out_features, in_features, layout, dtype, rows, op)
    for (out_features, in_features) in GRID.shapes
    for dtype in GRID.dtypes
    for layout in GRID.layouts
    for rows in GRID.rows
    for op in GRID.ops
]
PARAMS = [pytest.param(case, name, id=f"{case.shape_label}-{layout_label(case.layout)}-{dtype_name(case.dtype)}-"
                       f"M{case.rows}-{case.op.value}-{name}") for case in CASES for name in NAMES]


@functools.lru_cache(maxsize=1)  # tests of one weight are adjacent: keep one alive, not every weight
def _weight(key: tuple) -> SparseWeight:
    return build_weight(*key, DEVICE)


@pytest.mark.parametrize(("case", "name"), PARAMS)
def test_quick_cell(benchmark, case: Case, name: str) -> None:
    cls = CONTENDERS[name]
    reason = cls.unavailable_reason(DEVICE) or cls.unsupported_reason(case.layout)
    if reason is None and case.op not in cls.ops:
        reason = f"{name} has no {case.op.value}"
    if reason is not None:
        pytest.skip(reason)
    weight = _weight(case.weight_key)
    inputs = build_inputs(weight, case.rows)
    with cls.forced():  # a sparsekernels[<backend>] test's backend, for the whole test (restored after)
        _check_and_time(benchmark, case, name, cls, weight, inputs)


def _check_and_time(benchmark, case: Case, name: str, cls, weight: SparseWeight, inputs) -> None:
    try:
        implementation = cls(weight)
        run, canonical = implementation.runner(case.op, inputs)
        actual = canonical(run())
    except Exception as error:
        if is_ours(name):
            raise
        pytest.skip(f"{name} raised: {describe_error(error)}")
    expected = reference_outputs(case.op, weight, inputs)
    verdict = check(actual, expected, case.dtype)
    assert verdict.correct, f"{name} is wrong on {case}: relative error {verdict.max_rel_error} > {verdict.tolerance}"

    def timed() -> object:
        result = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.group = (
        f"{case.shape_label} {layout_label(case.layout)} {dtype_name(case.dtype)} M={case.rows} {case.op.value}"
    )
    benchmark.extra_info.update(implementation=name, density=weight.matrix.density, max_rel_error=verdict.max_rel_error)
    # pytest-benchmark returns the result of one more call after timing: checked too, as the harness
    # does (a tuner that switched configurations, a stateful implementation).
    later = check(canonical(benchmark(timed)), expected, case.dtype)
    assert later.correct, (
        f"{name} is wrong after timing on {case}: relative error {later.max_rel_error} > {later.tolerance}"
    )
