"""The benchmark harness (bench/): a tiny suite end to end, correctness gating, error capture, compare.

Shapes are tiny so that the whole module runs in seconds on a 2-core CPU; the timings themselves are
not checked, only that every cell is measured, checked and recorded as the harness promises.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bench import cli, compare, implementations
from bench.cases import Op, build_cases, layout_label, parse_dtype, parse_layout, parse_shape
from bench.implementations import Dense, Implementation, Sparsekernels
from bench.metrics import bytes_needed, useful_flops
from bench.report import print_table
from bench.results import Status
from bench.runner import run_cells
from bench.timing import TimingConfig
from bench.workloads import build_weight
from sparsekernels import NM, BlockSparse

CPU = torch.device("cpu")
FAST_TIMING = TimingConfig(warmup=0, repeats=2, budget_s=0.01)
TINY_ARGS = [
    "--device", "cpu", "--shapes", "128x128", "--m", "1,8", "--dtype", "float32", "--layouts", "b16d0.5,2:4",
    "--ops", "forward,grad_input,grad_weight,train_step", "--peers", "torch_bsr", "--repeats", "2", "--warmup", "0",
    "--no-progress",
]  # fmt: skip
TINY_CELLS = {
    ("128x128", layout, "float32", rows, op)
    for layout in ("b16d0.5", "2:4")
    for rows in (1, 8)
    for op in ("forward", "grad_input", "grad_weight", "train_step")
}
ENVIRONMENT_KEYS = {
    "date_utc", "device", "cpu_model", "cpu_count", "torch_threads", "gpu", "python", "torch", "triton",
    "sparsekernels", "sparsekernels_backend", "git_commit",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[int, Path]:
    """Exit status and output directory of the tiny suite, run once through the command line."""
    out = tmp_path_factory.mktemp("bench")
    return cli.main([*TINY_ARGS, "--out", str(out)]), out


def _cell_key(cell: dict) -> tuple:
    return cell["shape"], cell["layout"], cell["dtype"], cell["M"], cell["op"]


# ---------------------------------------------------------------------------------------- end to end
def test_tiny_suite_writes_every_cell_to_json(tiny_run):
    status, out = tiny_run
    assert status == 0
    document = json.loads((out / "results.json").read_text())
    assert ENVIRONMENT_KEYS <= document["environment"].keys()
    assert document["environment"]["device"] == "cpu"
    assert document["run"]["implementations"] == ["dense", "sparsekernels", "torch_bsr"]
    cells = {_cell_key(cell): cell for cell in document["cells"]}
    assert cells.keys() == TINY_CELLS
    for key, cell in cells.items():
        dense, ours, bsr = (cell["results"][name] for name in ("dense", "sparsekernels", "torch_bsr"))
        assert dense["status"] == "ok" and dense["speedup"] == 1.0
        assert ours["status"] == "ok", (key, ours["detail"])
        assert ours["max_rel_error"] <= ours["tolerance"]
        assert ours["timing"]["median_ms"] > 0 and ours["timing"]["samples"] >= 1
        assert ours["speedup"] == pytest.approx(dense["timing"]["median_ms"] / ours["timing"]["median_ms"])
        assert ours["tflops"] > 0 and ours["gbps"] > 0
        bsr_applies = cell["layout"] != "2:4" and cell["op"] in ("forward", "grad_input")
        assert bsr["status"] == ("ok" if bsr_applies else "n/a"), (key, bsr["detail"])


def test_tiny_suite_writes_one_csv_row_per_cell_and_implementation(tiny_run):
    _, out = tiny_run
    with (out / "results.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(TINY_CELLS) * 3
    assert {(row["shape"], row["layout"], row["dtype"], int(row["M"]), row["op"]) for row in rows} == TINY_CELLS
    assert {row["implementation"] for row in rows} == {"dense", "sparsekernels", "torch_bsr"}
    assert all(float(row["median_ms"]) > 0 for row in rows if row["status"] == "ok")


def test_command_line_rejects_unknown_names(tmp_path):
    for bad in (["--layouts", "b63d0.1"], ["--peers", "cublas"], ["--dtype", "int8"], ["--shapes", "4096"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*bad, "--out", str(tmp_path)])
        assert exit_info.value.code == 2


# ------------------------------------------------------------------------ correctness and errors
class OffByOne(Dense):
    """A fast but wrong forward: must be flagged, never credited with a speedup."""

    name = "off_by_one"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


class Exploding(Dense):
    """A peer whose forward raises."""

    name = "exploding"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded\nsecond line of the message")


class Unconvertible(Implementation):
    """A peer that cannot even take the weight."""

    name = "unconvertible"
    ops = frozenset(Op)

    def __init__(self, weight):
        raise ValueError("no such format")


def _tiny_cases(ops=(Op.FORWARD,)):
    cases, misfits = build_cases([(64, 64)], [BlockSparse(16, 0.5), NM(2, 4)], [torch.float32], [1, 4], ops)
    assert not misfits
    return cases


def test_wrong_results_are_flagged_and_get_no_speedup():
    results = list(run_cells(_tiny_cases(), [Dense, Sparsekernels, OffByOne], CPU, FAST_TIMING, progress=False))
    assert len(results) == 4
    for result in results:
        wrong = result.measurements["off_by_one"]
        assert wrong.status is Status.WRONG
        assert wrong.max_rel_error > wrong.tolerance
        assert wrong.timing is None and wrong.speedup is None and wrong.tflops is None
        assert result.measurements["sparsekernels"].status is Status.OK
    console = Console(file=io.StringIO(), width=200)
    print_table(results, ["dense", "sparsekernels", "off_by_one"], {"device": "cpu", "torch_threads": 1}, console)
    lines = [line for line in console.file.getvalue().splitlines() if "64x64" in line]
    assert len(lines) == 4 and all(line.rstrip(" │").endswith("WRONG") for line in lines)


def test_a_raising_peer_records_its_error_and_the_run_goes_on():
    cases = _tiny_cases((Op.FORWARD, Op.GRAD_INPUT))
    contenders = [Dense, Exploding, Unconvertible, Sparsekernels]
    results = list(run_cells(cases, contenders, CPU, FAST_TIMING, progress=False))
    assert [result.case for result in results] == cases
    for result in results:
        exploding = result.measurements["exploding"]
        if result.case.op is Op.FORWARD:
            assert exploding.status is Status.ERROR
            assert exploding.detail == "RuntimeError: kernel exploded"
            assert exploding.speedup is None
        else:
            assert exploding.status is Status.OK  # its other ops still run
        unconvertible = result.measurements["unconvertible"]
        assert unconvertible.status is Status.ERROR
        assert unconvertible.detail == "converting the weight: ValueError: no such format"
        assert result.measurements["sparsekernels"].status is Status.OK


class WrongSparsekernels(Sparsekernels):
    """sparsekernels with a broken forward: the run must fail, not report a speedup."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_wrong_sparsekernels_result_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "sparsekernels", WrongSparsekernels)
    tiny_forward = [*TINY_ARGS, "--ops", "forward", "--m", "4", "--peers", "dense", "--out", str(tmp_path)]
    assert cli.main(tiny_forward) == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert {cell["results"]["sparsekernels"]["status"] for cell in document["cells"]} == {"wrong"}
    assert all(cell["results"]["sparsekernels"]["speedup"] is None for cell in document["cells"])


# ----------------------------------------------------------------------------------------- pieces
def test_labels_round_trip():
    for text in ("b64d0.1", "b16d0.05", "b128d0.5", "2:4", "1:4", "4:8"):
        assert layout_label(parse_layout(text)) == text
    assert parse_shape("14336x4096") == (14336, 4096)
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32


def test_cells_that_do_not_fit_their_layout_are_skipped():
    cases, misfits = build_cases([(96, 96)], [BlockSparse(32, 0.5), BlockSparse(64, 0.5)], [torch.float32], [1],
                                 [Op.FORWARD])
    assert [layout_label(case.layout) for case in cases] == ["b32d0.5"]
    assert misfits == ["96x96 b64d0.5"]


def test_useful_flops_and_bytes_count_kept_weights_only():
    weight = build_weight(64, 128, BlockSparse(16, 0.25), torch.float32, CPU)
    (case,) = build_cases([(64, 128)], [BlockSparse(16, 0.25)], [torch.float32], [8], [Op.FORWARD])[0]
    kept = 64 * 128 // 4
    assert weight.kept_weights == kept
    assert useful_flops(case, weight) == 2 * 8 * kept
    x_and_y = 8 * (128 + 64) * 4
    assert bytes_needed(case, weight) == x_and_y + kept * 4 + weight.index_bytes


# ---------------------------------------------------------------------------------------- compare
def _compare(tmp_path: Path, old: dict, new: dict, *extra: str) -> int:
    paths = []
    for name, document in (("old.json", old), ("new.json", new)):
        path = tmp_path / name
        path.write_text(json.dumps(document))
        paths.append(str(path))
    return cli.main(["compare", *paths, *extra])


def test_compare_passes_identical_runs_and_catches_a_2x_regression(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    old = json.loads((out / "results.json").read_text())
    assert _compare(tmp_path, old, old) == 0

    slower = copy.deepcopy(old)
    slower["cells"][0]["results"]["sparsekernels"]["timing"]["median_ms"] *= 2
    capsys.readouterr()
    assert _compare(tmp_path, old, slower) == 1
    assert "regressions 1," in capsys.readouterr().out
    assert _compare(tmp_path, old, slower, "--threshold", "1.5") == 0

    broken = copy.deepcopy(old)
    broken["cells"][1]["results"]["sparsekernels"].update(status="wrong", timing=None, speedup=None)
    assert _compare(tmp_path, old, broken) == 1


def test_compare_main_rejects_a_file_that_is_not_results(tmp_path):
    not_results = tmp_path / "other.json"
    not_results.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(not_results), str(not_results)])
    assert exit_info.value.code == 2
