"""The benchmark harness (bench/): a tiny suite end to end, correctness gating, error capture, compare.

Shapes are tiny so that the whole module runs in seconds on a 2-core CPU; the timings themselves are
not checked, only that every cell is measured, checked and recorded as the harness promises.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bench import allocator, cli, compare, e2e, implementations, plots, roofline, timing
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
OURS_CPU = "sparsekernels[cpu]"  # sparsekernels' column in a CPU run: one column per backend (--backends)
ENVIRONMENT_KEYS = {
    "date_utc", "device", "cpu_model", "cpu_count", "torch_threads", "cpu_isa", "cpu_allocator", "gpu", "python",
    "torch", "triton", "sparsekernels", "sparsekernels_backend", "git_commit",
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
    assert document["run"]["implementations"] == ["dense", OURS_CPU, "torch_bsr"]
    cells = {_cell_key(cell): cell for cell in document["cells"]}
    assert cells.keys() == TINY_CELLS
    for key, cell in cells.items():
        dense, ours, bsr = (cell["results"][name] for name in ("dense", OURS_CPU, "torch_bsr"))
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
    assert {row["implementation"] for row in rows} == {"dense", OURS_CPU, "torch_bsr"}
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


class RightOnlyOnce(Dense):
    """Right on the first call of each cell, then wrong (state): the first-call check alone misses it."""

    name = "right_only_once"

    def runner(self, op, inputs):
        self.calls = 0
        return super().runner(op, inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x) + (0.0 if self.calls == 1 else 1.0)


def test_a_result_that_goes_wrong_after_the_first_call_is_wrong_and_never_fast():
    results = list(run_cells(_tiny_cases(), [Dense, RightOnlyOnce], CPU, FAST_TIMING, progress=False))
    for result in results:
        wrong = result.measurements["right_only_once"]
        assert wrong.status is Status.WRONG, wrong.detail
        assert wrong.detail.startswith("wrong after timing (the last timed call; the first call was right): error ")
        assert wrong.max_rel_error > wrong.tolerance
        assert wrong.timing is None and wrong.speedup is None and wrong.tflops is None
        assert result.measurements["dense"].status is Status.OK


def test_a_result_right_throughout_is_checked_after_timing_too(monkeypatch):
    """Every call of a correct implementation stays correct: OK; the timed output is checked without
    an extra call when the timer hands it back, and with one more call when it does not."""
    from bench import runner

    checked = []
    real_check = runner.check
    monkeypatch.setattr(runner, "check", lambda *args: checked.append(args[0]) or real_check(*args))
    (result,) = run_cells(_tiny_cases()[:1], [Dense, Sparsekernels], CPU, FAST_TIMING, progress=False)
    assert {m.status for m in result.measurements.values()} == {Status.OK}
    assert len(checked) == 4  # first call and last timed call, for each implementation

    class SilentTimer:  # a timer that does not hand back any timed output
        def measure(self, fn, on_output=None):
            return timing.WallClockTimer(FAST_TIMING).measure(fn)

    monkeypatch.setattr(runner, "timer_for", lambda device, config: SilentTimer())
    (result,) = run_cells(_tiny_cases()[:1], [Dense, RightOnlyOnce], CPU, FAST_TIMING, progress=False)
    wrong = result.measurements["right_only_once"]
    assert wrong.status is Status.WRONG
    assert wrong.detail.startswith(f"wrong after timing ({runner.CALL_AFTER_TIMING}; the first call was right)")


class WrongSparsekernels(Sparsekernels):
    """sparsekernels with a broken forward: the run must fail, not report a speedup."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_wrong_sparsekernels_result_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "sparsekernels", WrongSparsekernels)
    tiny_forward = [*TINY_ARGS, "--ops", "forward", "--m", "4", "--peers", "dense", "--out", str(tmp_path)]
    assert cli.main(tiny_forward) == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert {cell["results"][OURS_CPU]["status"] for cell in document["cells"]} == {"wrong"}
    assert all(cell["results"][OURS_CPU]["speedup"] is None for cell in document["cells"])


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
    slower["cells"][0]["results"][OURS_CPU]["timing"]["median_ms"] *= 2
    capsys.readouterr()
    assert _compare(tmp_path, old, slower) == 1
    assert "regressions 1," in capsys.readouterr().out
    assert _compare(tmp_path, old, slower, "--threshold", "1.5") == 0

    broken = copy.deepcopy(old)
    broken["cells"][1]["results"][OURS_CPU].update(status="wrong", timing=None, speedup=None)
    assert _compare(tmp_path, old, broken) == 1


def test_compare_main_rejects_a_file_that_is_not_results(tmp_path):
    not_results = tmp_path / "other.json"
    not_results.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(not_results), str(not_results)])
    assert exit_info.value.code == 2


def test_compare_allows_the_measured_noise_but_always_catches_2x(tiny_run, tmp_path):
    _, out = tiny_run
    old = json.loads((out / "results.json").read_text())
    timing = old["cells"][0]["results"][OURS_CPU]["timing"]
    timing.update(median_ms=1.0, p20_ms=0.85, p80_ms=1.15)  # 30% spread: a 25% slowdown is noise
    noisy = copy.deepcopy(old)
    noisy["cells"][0]["results"][OURS_CPU]["timing"].update(median_ms=1.25, p20_ms=1.25, p80_ms=1.25)
    assert _compare(tmp_path, old, noisy) == 0
    timing.update(p20_ms=0.1, p80_ms=5.0)  # a huge spread still allows at most compare.MAX_NOISE
    doubled = copy.deepcopy(old)
    doubled["cells"][0]["results"][OURS_CPU]["timing"].update(median_ms=2.0, p20_ms=0.2, p80_ms=10.0)
    assert _compare(tmp_path, old, doubled) == 1


def test_compare_catches_an_e2e_regression(tmp_path):
    record = {"model": "tiny", "dtype": "float32", "variant": "b32d0.1", "status": "ok",
              "train_tokens_per_s": 1000.0, "decode_tokens_per_s": 50.0}
    old = {"cells": [], "e2e": [record]}
    assert _compare(tmp_path, old, old) == 0
    slower = {"cells": [], "e2e": [{**record, "decode_tokens_per_s": 25.0}]}
    assert _compare(tmp_path, old, slower) == 1
    broken = {"cells": [], "e2e": [{**record, "status": "wrong", "train_tokens_per_s": None}]}
    assert _compare(tmp_path, old, broken) == 1


# ------------------------------------------------------------------------------------------ plots
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, path  # a real picture, not an empty canvas


def test_tiny_suite_writes_speedup_and_roofline_pngs(tiny_run):
    _, out = tiny_run
    for op in ("forward", "grad_input", "grad_weight", "train_step"):  # one speedup plot per op
        _assert_png(out / f"speedup-{op}.png")
    _assert_png(out / "roofline.png")


def test_plot_subcommand_redraws_a_results_file_with_its_name_as_prefix(tiny_run, tmp_path):
    _, out = tiny_run
    named = tmp_path / "cpu-test-2026-01-01.json"
    named.write_text((out / "results.json").read_text())
    assert cli.main(["plot", str(named)]) == 0
    _assert_png(tmp_path / "cpu-test-2026-01-01-speedup-forward.png")
    _assert_png(tmp_path / "cpu-test-2026-01-01-roofline.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2


def test_speedup_series_leaves_out_wrong_results_and_groups_by_layout_family():
    def cell(layout, density, status, speedup):
        return {"layout": layout, "density": density,
                "results": {"dense": {"status": "ok", "speedup": 1.0},
                            "sparsekernels": {"status": status, "speedup": speedup}}}

    cells = [cell("b64d0.5", 0.5, "ok", 2.0), cell("b64d0.1", 0.1, "ok", 5.0), cell("2:4", 0.5, "wrong", None),
             cell("1:4", 0.25, "ok", 1.5)]
    assert plots.speedup_series(cells) == {
        ("sparsekernels", "b64"): [(0.1, 5.0), (0.5, 2.0)],
        ("sparsekernels", "N:4"): [(0.25, 1.5)],
    }


# --------------------------------------------------------------------------------------- roofline
@pytest.mark.parametrize(
    ("gpu_name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ],
)
def test_peak_table_knows_the_gpus_we_quote(gpu_name, model):
    assert roofline.peak_for_gpu(gpu_name).model == model


def test_peak_table_has_no_entry_for_unknown_devices():
    assert roofline.peak_for_gpu("NVIDIA GeForce RTX 4090") is None
    assert roofline.peak_for_gpu(None) is None
    assert roofline.peak_for_device(CPU) is None


def test_roofline_is_bandwidth_bound_below_the_ridge_and_compute_bound_above():
    peak = roofline.H100_SXM
    ridge = roofline.ridge_point(peak, "bfloat16")
    assert ridge == pytest.approx(989.4 / 3.35)
    assert roofline.attainable_tflops(peak, "bfloat16", 10.0) == pytest.approx(33.5)  # 3.35 TB/s * 10 FLOP/B
    assert roofline.attainable_tflops(peak, "bfloat16", 10 * ridge) == pytest.approx(989.4)
    # 1 GFLOP moving 100 MB: intensity 10, roof 33.5 TFLOP/s; achieving 16.75 is 50%.
    assert roofline.percent_of_roofline(peak, "bfloat16", 1e9, 1e8, 16.75) == pytest.approx(50.0)
    assert roofline.percent_of_roofline(None, "bfloat16", 1e9, 1e8, 16.75) is None
    assert roofline.percent_of_roofline(peak, "int8", 1e9, 1e8, 16.75) is None


def test_runner_fills_percent_of_roofline_only_with_a_peak():
    cases = _tiny_cases()[:1]
    fake_peak = roofline.Peak("fake", {"float32": 1e-3}, 1e-3)  # 1 GFLOP/s, 1 GB/s: tiny roofs
    (with_peak,) = run_cells(cases, [Dense, Sparsekernels], CPU, FAST_TIMING, progress=False, peak=fake_peak)
    (without,) = run_cells(cases, [Dense, Sparsekernels], CPU, FAST_TIMING, progress=False)
    measurement = with_peak.measurements["sparsekernels"]
    intensity = with_peak.useful_flops / with_peak.bytes_needed
    expected = 100 * measurement.tflops / min(1e-3, 1e-3 * intensity)
    assert measurement.roofline_pct == pytest.approx(expected)
    assert without.measurements["sparsekernels"].roofline_pct is None


def test_flush_time_is_subtracted_from_cuda_graph_samples():
    assert timing.subtract_flush([1.5, 2.0, 0.4], 0.5) == [1.0, 1.5, timing.MIN_KERNEL_MS]


# ------------------------------------------------------------------------------------------ peers
def test_peers_that_need_cuda_show_na_with_the_reason_on_cpu(tmp_path):
    args = [*TINY_ARGS, "--ops", "forward", "--m", "4", "--peers", "torch_semi_cusparselt,torch_semi_cutlass,stk",
            "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["implementations"] == [
        "dense", OURS_CPU, "torch_semi_cusparselt", "torch_semi_cutlass", "stk"]
    for cell in document["cells"]:
        for name in ("torch_semi_cusparselt", "torch_semi_cutlass", "stk"):
            measurement = cell["results"][name]
            assert measurement["status"] == "n/a" and measurement["timing"] is None
            assert "CUDA" in measurement["detail"] or "not installed" in measurement["detail"]


# -------------------------------------------------------------------------------------------- e2e
TINY_MODEL = e2e.E2E_MODELS["tiny"]


@pytest.fixture(scope="module")
def tiny_e2e() -> list:
    return e2e.run_e2e(TINY_MODEL, [BlockSparse(32, 0.1), NM(2, 4)], CPU, torch.float32)


def test_e2e_measures_dense_and_each_sparse_model(tiny_e2e):
    assert [result.variant for result in tiny_e2e] == ["dense", "b32d0.1", "2:4"]
    dense, block, two_four = tiny_e2e
    for result in tiny_e2e:
        assert result.status is Status.OK, result.detail
        assert result.train_tokens_per_s > 0 and result.decode_tokens_per_s > 0
        assert result.max_rel_error <= result.tolerance
        assert len(result.step_losses) == TINY_MODEL.steps
        assert result.peak_memory_bytes is None  # no allocator counter on CPU: not made up
    assert dense.train_speedup == 1.0 and block.train_speedup == pytest.approx(
        block.train_tokens_per_s / dense.train_tokens_per_s)
    assert dense.loss_after_steps < dense.loss_initial  # the corpus is learnable
    assert dense.mlp_density == 1.0 and two_four.mlp_density == 0.5 and 0.05 < block.mlp_density < 0.15
    # sparse MLPs store fewer values: less parameter + gradient + AdamW state memory
    assert block.state_bytes < two_four.state_bytes < dense.state_bytes


def test_e2e_marks_a_model_that_disagrees_with_its_dense_copy_wrong(monkeypatch):
    real_copy = e2e.densified_copy

    def perturbed_copy(model):
        copy_ = real_copy(model)
        with torch.no_grad():
            copy_.blocks[0].mlp.fc.weight.mul_(3.0)
        return copy_

    monkeypatch.setattr(e2e, "densified_copy", perturbed_copy)
    (dense, wrong) = e2e.run_e2e(TINY_MODEL, [NM(2, 4)], CPU, torch.float32, steps=3)
    assert wrong.status is Status.WRONG and wrong.max_rel_error > wrong.tolerance
    assert wrong.train_tokens_per_s is None and wrong.decode_tokens_per_s is None and wrong.train_speedup is None


def test_e2e_markov_corpus_is_seeded_and_structured():
    tokens = e2e.markov_corpus(64, 8, 50)
    assert torch.equal(tokens, e2e.markov_corpus(64, 8, 50))
    successors = {}
    for row in tokens.tolist():
        for current, following in zip(row, row[1:]):
            successors.setdefault(current, set()).add(following)
    assert max(len(after) for after in successors.values()) <= e2e.MARKOV_SUCCESSORS


def test_e2e_suite_from_the_command_line_writes_json_and_csv(tmp_path):
    args = ["--suite", "e2e", "--device", "cpu", "--model", "tiny", "--steps", "3", "--layouts", "2:4",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["suite"] == "e2e" and document["cells"] == []
    assert [record["variant"] for record in document["e2e"]] == ["dense", "2:4"]
    assert ENVIRONMENT_KEYS <= document["environment"].keys()
    with (tmp_path / "e2e.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["variant"] for row in rows] == ["dense", "2:4"] and all(row["status"] == "ok" for row in rows)
    _assert_png(tmp_path / "e2e.png")


def test_a_busy_cpu_is_pointed_out_next_to_the_timings():
    from bench.report import busy_machine_warning

    assert "busy" in busy_machine_warning({"device": "cpu", "load_average_1min": 3.5, "cpu_count": 2})
    assert busy_machine_warning({"device": "cpu", "load_average_1min": 0.3, "cpu_count": 2}) is None
    assert busy_machine_warning({"device": "cuda", "load_average_1min": 9.0, "cpu_count": 2}) is None


def test_cpu_timer_flushes_the_caches_before_every_timed_call_outside_the_timing(monkeypatch):
    """With --flush-caches each sample is one call right after a flush; the flush's time is not in
    the samples."""
    timer = timing.WallClockTimer(TimingConfig(warmup=2, repeats=4, budget_s=10.0, flush_cpu_caches=True))
    events = []
    clock = [0.0]

    def flush():
        events.append("flush")
        clock[0] += 1.0  # a slow flush: it must not show in the samples

    def call():
        events.append("call")
        clock[0] += 0.002
        return len(events)

    monkeypatch.setattr(timer, "_flush_caches", flush)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    measured = timer.measure(call)
    assert events == ["call", "call"] + ["flush", "call"] * 4  # warm-up, then flush before each call
    assert measured.samples == 4 and measured.median_ms == pytest.approx(2.0) and measured.l2_flushed


def test_cpu_timer_keeps_caches_warm_by_default(monkeypatch):
    timer = timing.WallClockTimer(FAST_TIMING)
    monkeypatch.setattr(timer, "_flush_caches", lambda: pytest.fail("flushed without --flush-caches"))
    assert not timer.measure(lambda: None).l2_flushed


@pytest.mark.parametrize("flags, flushed", [([], False), (["--flush-caches"], True)])
def test_flush_caches_option_reaches_the_timing_config(flags, flushed):
    parser = cli.build_parser()
    _, config, _ = cli._plan(parser.parse_args(["--device", "cpu", *flags]), parser, Console(file=io.StringIO()))
    assert config.flush_cpu_caches is flushed


GLIBC = allocator._glibc() is not None
# Allocates and touches a 64 MiB tensor 20 times and prints the minor page faults per allocation of
# the last 10 (the first ones grow the heap: torch's 64-byte aligned blocks do not fit the hole one
# freed block leaves, only the holes that several leave together).
_FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from bench import allocator
if sys.argv[1] == "steady":
    assert allocator.steady_cpu_allocator() == allocator.STEADY
def allocate():
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(10):
    allocate()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    allocate()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
def test_steady_allocator_reuses_freed_large_blocks_instead_of_faulting_in_fresh_pages():
    def faults(setting: str) -> int:
        completed = subprocess.run([sys.executable, "-c", _FAULTS_PER_ALLOCATION, setting], capture_output=True,
                                   text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
        return int(completed.stdout.strip())

    pages = 64 * 2**20 // 4096
    assert faults("default") > pages // 2  # glibc maps 64 MiB afresh on every malloc
    assert faults("steady") < pages // 100


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is glibc's")
def test_runs_record_the_allocator_setting_and_fresh_pages_keeps_the_default(tiny_run, tmp_path):
    _, out = tiny_run
    assert json.loads((out / "results.json").read_text())["environment"]["cpu_allocator"] == allocator.STEADY
    one_cell = ["--device", "cpu", "--shapes", "32x32", "--m", "1", "--dtype", "float32", "--layouts", "2:4", "--ops",
                "forward", "--peers", "dense", "--repeats", "1", "--warmup", "0", "--no-progress", "--no-plots"]
    subprocess.run([sys.executable, "-m", "bench", *one_cell, "--fresh-pages", "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    assert json.loads((tmp_path / "results.json").read_text())["environment"]["cpu_allocator"] == allocator.DEFAULT


def test_cpu_cache_flush_reads_twice_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 96 * 2**20)
    timer = timing.WallClockTimer(FAST_TIMING)
    timer._flush_caches()
    assert timer._flush_buffer.numel() * 4 == 192 * 2**20
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: None)
    small = timing.WallClockTimer(FAST_TIMING)
    small._flush_caches()
    assert small._flush_buffer.numel() * 4 == timing.CPU_FLUSH_MIN_BYTES


def test_cuda_timer_subtracts_the_flush_measured_once_and_falls_back_to_eager(monkeypatch):
    """The CUDA timer's logic with the device calls replaced (this runs on CPU): graph samples of
    flush + call, minus the flush's own time, measured once; eager time when capture fails."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    timer = timing.CudaTimer(FAST_TIMING)
    graph_calls = []

    def fake_graph_samples(fn):
        graph_calls.append(fn)
        return [0.5, 0.5, 0.5] if fn == timer._flush_l2 else [1.5, 1.75, 2.5]

    monkeypatch.setattr(timer, "_graph_samples", fake_graph_samples)
    first, second = timer.measure(lambda: None), timer.measure(lambda: None)
    assert sum(fn == timer._flush_l2 for fn in graph_calls) == 1 and len(graph_calls) == 3
    for measured in (first, second):
        assert measured.method == "cuda_graph" and measured.l2_flushed
        assert measured.median_ms == pytest.approx(1.25) and measured.eager_median_ms > 0

    def failing_graph_samples(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timer, "_graph_samples", failing_graph_samples)
    fallback = timer.measure(lambda: None)
    assert fallback.method == "eager" and not fallback.l2_flushed
    assert fallback.graph_failure == "RuntimeError: operation not permitted when stream is capturing"
    assert fallback.median_ms == fallback.eager_median_ms


def test_cuda_timer_hands_back_the_last_eager_output_and_a_graph_replays(monkeypatch):
    """On CUDA the eager loop's last output and the output of the last call captured into the graph
    (which every replay rewrites) go to on_output; none from a graph that failed."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    timer = timing.CudaTimer(FAST_TIMING)
    timer._flush_l2 = lambda: None
    calls = []

    def fn():
        calls.append(len(calls))
        return len(calls)

    def fake_graph_samples(graph_fn):
        for _ in range(3):  # capture of the unrolled calls; replays run no Python
            graph_fn()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(timer, "_graph_samples", fake_graph_samples)
    outputs = []
    timer.measure(fn, on_output=lambda label, output: outputs.append((label, output)))
    eager_calls = len(calls) - 3  # then the graph of flush + fn captured fn three times
    assert outputs == [(timing.LAST_EAGER_CALL, eager_calls), (timing.GRAPH_REPLAY, len(calls))]

    def failing_graph_samples(graph_fn):
        graph_fn()
        raise RuntimeError("capture failed")

    monkeypatch.setattr(timer, "_graph_samples", failing_graph_samples)
    outputs.clear()
    assert timer.measure(fn, on_output=lambda label, output: outputs.append(label)).method == "eager"
    assert outputs == [timing.LAST_EAGER_CALL]


def test_a_cell_whose_graph_replay_is_wrong_is_wrong(monkeypatch):
    """The runner on CUDA's timer (device calls replaced): right eagerly, wrong in the graph."""
    from bench import runner

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    in_graph = []

    class WrongInGraph(Dense):
        name = "wrong_in_graph"

        def forward(self, x):
            return super().forward(x) * (2.0 if in_graph else 1.0)

    def fake_graph_samples(graph_fn):
        in_graph.append(True)
        try:
            graph_fn()
        finally:
            in_graph.clear()
        return [1.0, 1.0, 1.0]

    def cuda_timer(device, config):
        timer = timing.CudaTimer(config)
        timer._flush_l2 = lambda: None
        monkeypatch.setattr(timer, "_graph_samples", fake_graph_samples)
        return timer

    monkeypatch.setattr(runner, "timer_for", cuda_timer)
    (result,) = run_cells(_tiny_cases()[:1], [Dense, WrongInGraph], CPU, FAST_TIMING, progress=False)
    assert result.measurements["dense"].status is Status.OK
    assert result.measurements["dense"].timing.method == "cuda_graph"
    wrong = result.measurements["wrong_in_graph"]
    assert wrong.status is Status.WRONG and wrong.timing is None and wrong.speedup is None
    assert wrong.detail.startswith(f"wrong after timing ({timing.GRAPH_REPLAY}; the first call was right)")


def test_table_shows_the_share_of_roofline_when_there_is_one():
    (result,) = run_cells(_tiny_cases()[:1], [Dense, Sparsekernels], CPU, FAST_TIMING, progress=False)
    result.measurements["sparsekernels"].roofline_pct = 42.4
    console = Console(file=io.StringIO(), width=200)
    environment = {"device": "cuda", "torch_threads": 1, "gpu_peak": roofline.H100_SXM.to_dict()}
    print_table([result], ["dense", "sparsekernels"], environment, console)
    output = console.file.getvalue()
    assert " 42%" in output and "H100 SXM roofline" in output


def test_pytest_benchmark_variants_cover_the_quick_cells_and_stay_out_of_make_test():
    import tomllib

    from bench import suites, test_benchmarks

    grid = suites.quick(test_benchmarks.DEVICE.type)
    cells, _ = build_cases(grid.shapes, grid.layouts, grid.dtypes, grid.rows, grid.ops)
    assert set(test_benchmarks.CASES) == set(cells)
    assert len(test_benchmarks.PARAMS) == len(cells) * len(test_benchmarks.NAMES)
    assert test_benchmarks.NAMES[:2] == ["dense", "sparsekernels"]
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]  # bench/ is never collected


def test_results_files_are_named_after_the_machine_and_the_date(tiny_run, tmp_path):
    from bench.report import results_file_stem, save_to_results

    date = "2026-11-23T11:00:00+00:00"
    assert results_file_stem({"gpu": {"name": "NVIDIA H100 80GB HBM3"}, "date_utc": date}, "quick") == (
        "h100-80gb-hbm3-2026-11-23")
    cpu = {"gpu": None, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_count": 2, "date_utc": date}
    assert results_file_stem(cpu, "quick") == "cpu-intel-xeon-2core-2026-11-23"
    assert results_file_stem(cpu, "e2e") == "cpu-intel-xeon-2core-2026-11-23-e2e"
    # every suite but quick names itself, so that one day's runs do not overwrite each other
    assert results_file_stem(cpu, "targets") == "cpu-intel-xeon-2core-2026-11-23-targets"
    assert results_file_stem(cpu, "full") == "cpu-intel-xeon-2core-2026-11-23-full"

    _, out = tiny_run
    console = Console(file=io.StringIO(), width=200)
    saved = save_to_results(out / "results.json", "cpu-test-2026-11-23", True, console, results_dir=tmp_path)
    assert saved == tmp_path / "cpu-test-2026-11-23.json"
    assert json.loads(saved.read_text()) == json.loads((out / "results.json").read_text())
    _assert_png(tmp_path / "cpu-test-2026-11-23-roofline.png")


def test_a_saved_e2e_results_file_gets_one_e2e_in_its_plot_name(tmp_path):
    document = {"cells": [], "run": {"config": {}, "workload": {"steps": 3}, "dtype": "float32"}, "e2e": [
        {"variant": "dense", "status": "ok", "train_tokens_per_s": 10.0, "decode_tokens_per_s": 2.0,
         "train_speedup": 1.0, "decode_speedup": 1.0, "loss_initial": 5.5, "loss_after_steps": 4.0},
        {"variant": "2:4", "status": "wrong", "train_tokens_per_s": None, "decode_tokens_per_s": None,
         "loss_initial": 5.5, "loss_after_steps": 4.2}]}
    assert plots.write_plots(document, tmp_path, "cpu-x-2026-11-23-e2e-") == [tmp_path / "cpu-x-2026-11-23-e2e.png"]
    assert plots.write_plots(document, tmp_path) == [tmp_path / "e2e.png"]
    _assert_png(tmp_path / "e2e.png")


def test_cells_record_the_dispatch_path_taken(monkeypatch):
    """A cell timed while the Triton dispatcher ran records which path (sparse or dense fallback) it took."""
    import types

    from bench import runner

    assert runner._path_taken(None, None) is None
    assert runner._path_taken({"sparse": 3, "dense": 1}, {"sparse": 3, "dense": 1}) is None
    assert runner._path_taken({"sparse": 3, "dense": 1}, {"sparse": 9, "dense": 1}) == "sparse"
    assert runner._path_taken(None, {"sparse": 0, "dense": 2}) == "dense"
    assert runner._path_taken({"sparse": 0, "dense": 0}, {"sparse": 1, "dense": 1}) == "mixed"

    fake = types.SimpleNamespace(path_counts={"sparse": 0, "dense": 5})
    monkeypatch.setitem(sys.modules, "sparsekernels.triton.dispatch", fake)
    assert runner._dispatch_counts() == {"sparse": 0, "dense": 5}
    monkeypatch.delitem(sys.modules, "sparsekernels.triton.dispatch")
    assert runner._dispatch_counts() is None


def test_overhead_subcommand_times_every_contender(tmp_path):
    """python -m bench overhead: one row per contender and cell, times on CPU, kernel time CUDA-only."""
    assert cli.main(["overhead", "--shapes", "64x64", "--layouts", "b16d0.5,2:4", "--m", "1,3",
                     "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "overhead.json").read_text())
    rows = document["rows"]
    assert document["environment"]["device"] == "cpu"
    block = {row["implementation"] for row in rows if row["layout"] == "b16d0.5"}
    assert block == {"SparseLinear", "SparseLinear (op path)", "dense nn.Linear", "torch BSR"}
    assert {row["implementation"] for row in rows if row["layout"] == "2:4"} == block - {"torch BSR"}
    assert len(rows) == 2 * (4 + 3)
    for row in rows:
        assert row["error"] is None and row["eager_us"] > 0, row
        assert row["kernel_us"] is None and row["overhead_us"] is None


def test_overhead_host_only_stubs_the_launches(tmp_path, monkeypatch):
    """--host-only: SparseLinear's two paths on the Triton backend, with grad mode off and on, with the
    forward launches stubbed out (no kernel runs, so no output is written), times recorded, the
    backend restored after."""
    from bench import overhead

    import sparsekernels

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    stubbed = []
    real = overhead.launches_stubbed

    @contextlib.contextmanager
    def counting():
        from sparsekernels.triton import autotune, nm_forward_small_m

        with real():
            stubbed.append(nm_forward_small_m.launch)
            assert not autotune.tuner.measurable(torch.device("cuda"), ())  # never times the stubs
            yield

    monkeypatch.setattr(overhead, "launches_stubbed", counting)
    from sparsekernels.triton import autotune

    previous, previous_tuner = sparsekernels.get_backend(), autotune.tuner
    assert cli.main(["overhead", "--host-only", "--device", "cpu", "--shapes", "64x64", "--layouts", "b16d0.5,2:4",
                     "--m", "2", "--out", str(tmp_path)]) == 0
    assert sparsekernels.get_backend() == previous and autotune.tuner is previous_tuner
    document = json.loads((tmp_path / "overhead.json").read_text())
    assert document["environment"]["host_only"] is True
    assert document["environment"]["sparsekernels_backend"] == "triton"
    rows = document["rows"]
    assert [row["implementation"] for row in rows] == [
        "SparseLinear (host only)", "SparseLinear (op path, host only)", "SparseLinear (grad enabled, host only)",
        "SparseLinear (grad enabled, op path, host only)"] * 2
    for row in rows:
        assert row["error"] is None and row["eager_us"] > 0, row
        assert row["kernel_us"] is None
    assert len(stubbed) == 2 and all(launch(None, (1,)) is None for launch in stubbed)


# ------------------------------------------------------------------- one column per backend (bench-a)
import os  # noqa: E402

from sparsekernels import get_backend, set_backend  # noqa: E402  (kept with the tests that use them)

if not torch.cuda.is_available():
    # The triton column below runs the kernels under the interpreter, which must be on before triton
    # is first imported by any test of the module (as tests/test_triton*.py set it when collected).
    os.environ.setdefault("TRITON_INTERPRET", "1")

class BackendRecording(Sparsekernels):
    """sparsekernels that notes which backend was forced while it ran its forward."""

    seen: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BackendRecording.seen.append((self.name, get_backend()))
        return super().forward(x)


def test_each_backend_gets_a_column_run_with_that_backend_forced(tmp_path, monkeypatch):
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "sparsekernels", BackendRecording)
    monkeypatch.setattr(BackendRecording, "seen", [])
    args = ["--device", "cpu", "--shapes", "64x64", "--m", "4", "--dtype", "float32", "--layouts", "b16d0.5,2:4T",
            "--ops", "forward,grad_input", "--backends", "cpu,reference", "--peers", "dense", "--repeats", "1",
            "--warmup", "0", "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert get_backend() == "auto"  # restored after the run
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["implementations"] == ["dense", "sparsekernels[cpu]", "sparsekernels[reference]"]
    assert {name: backend for name, backend in BackendRecording.seen} == {
        "sparsekernels[cpu]": "cpu", "sparsekernels[reference]": "reference"}
    for cell in document["cells"]:
        assert cell["results"]["sparsekernels[cpu]"]["status"] == "ok"
        reference = cell["results"]["sparsekernels[reference]"]
        if cell["op"] == "forward":
            assert reference["status"] == "ok"
        else:  # the reference backend has no backward ops: n/a, never the C++ kernels under its name
            assert reference["status"] == "n/a" and "has no grad_input" in reference["detail"]


def test_a_backend_that_cannot_run_here_shows_na_with_the_reason(tmp_path):
    args = [*TINY_ARGS, "--ops", "forward", "--m", "4", "--layouts", "2:4", "--backends", "cuda",
            "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["implementations"] == ["dense", "sparsekernels[cuda]", "torch_bsr"]
    for cell in document["cells"]:
        measurement = cell["results"]["sparsekernels[cuda]"]
        assert measurement["status"] == "n/a" and "CUDA tensors only" in measurement["detail"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is set for this module only without a GPU")
def test_triton_backend_column_under_the_interpreter(tmp_path):
    args = ["--device", "cpu", "--shapes", "32x32", "--m", "2", "--dtype", "float32", "--layouts", "b16d0.5",
            "--ops", "forward", "--backends", "triton", "--peers", "dense", "--repeats", "1", "--warmup", "0",
            "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["results"]["sparsekernels[triton]"]["status"] == "ok", cell["results"]["sparsekernels[triton]"]


def test_auto_backend_column_is_the_librarys_own_choice(tmp_path, monkeypatch):
    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "sparsekernels", BackendRecording)
    monkeypatch.setattr(BackendRecording, "seen", [])
    args = ["--device", "cpu", "--shapes", "64x64", "--m", "4", "--dtype", "float32", "--layouts", "b16d0.5",
            "--ops", "forward", "--backends", "auto,cpu", "--peers", "dense", "--repeats", "1", "--warmup", "0",
            "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["implementations"] == ["dense", "sparsekernels[auto]", "sparsekernels[cpu]"]
    assert dict(BackendRecording.seen)["sparsekernels[auto]"] == "auto"
    assert all(cell["results"]["sparsekernels[auto]"]["status"] == "ok" for cell in document["cells"])


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    """A GPU machine without TRITON_INTERPRET cannot run the Triton kernels on CPU tensors: n/a with
    the reason, not an error in every cell."""
    from sparsekernels import triton as triton_backend

    monkeypatch.setattr(triton_backend, "_interpreting", lambda: False)
    assert "TRITON_INTERPRET=1" in implementations.backend_unavailable_reason("triton", CPU)


def test_default_backends_follow_the_device_or_a_forced_backend():
    assert implementations.default_backends(CPU) == ["cpu"]
    set_backend("reference")  # as SPARSEKERNELS_BACKEND=reference does at import
    assert implementations.default_backends(CPU) == ["reference"]


def test_compare_matches_a_legacy_sparsekernels_column_with_its_backend(tiny_run, tmp_path):
    _, out = tiny_run
    new = json.loads((out / "results.json").read_text())
    legacy = copy.deepcopy(new)  # as written before --backends: one "sparsekernels" column
    for cell in legacy["cells"]:
        cell["results"]["sparsekernels"] = cell["results"].pop(OURS_CPU)
    assert legacy["environment"]["sparsekernels_backend"] == "cpu"
    slower = copy.deepcopy(new)
    for cell in slower["cells"]:
        if cell["results"][OURS_CPU]["timing"]:
            cell["results"][OURS_CPU]["timing"].update(median_ms=cell["results"][OURS_CPU]["timing"]["median_ms"] * 3)
    changes = compare.compare_documents(legacy, new).changes
    assert {change.implementation for change in changes} == {"dense", OURS_CPU, "torch_bsr"}
    assert _compare(tmp_path, legacy, slower) == 1


# ------------------------------------------------------------------------- the targets suite (bench-a)
def test_targets_suite_holds_exactly_the_cells_of_issues_4_and_5():
    from bench.targets import TARGET_CELLS

    issue_cells = {
        (cell.case.shape_label, layout_label(cell.layout), cell.rows, cell.op.value):
            {target.backend: target.ratio for target in cell.targets}
        for cell in TARGET_CELLS if cell.targets
    }
    assert issue_cells == {
        ("14336x4096", "b64d0.1", 8192, "forward"): {"triton": 7.0},
        ("14336x4096", "b64d0.1", 16, "forward"): {"triton": 8.0, "cuda": 8.0},
        ("14336x4096", "b64d0.1", 8192, "train_step"): {"triton": 6.0},
        ("14336x4096", "b64d0.5", 8192, "forward"): {"triton": 1.8},
        ("14336x4096", "b128d0.5", 8192, "train_step"): {"triton": 1.6},
        ("14336x4096", "2:4", 8192, "forward"): {"triton": 1.3, "cuda": 1.6},
        ("14336x4096", "2:4", 2048, "forward"): {"cuda": 1.5},
        ("14336x4096", "2:4", 16, "forward"): {"triton": 1.5, "cuda": 1.6},
        ("14336x4096", "2:4T", 8192, "train_step"): {"cuda": 1.3},
    }
    assert all(cell.dtype is torch.bfloat16 for cell in TARGET_CELLS)
    extra = {(cell.case.shape_label, layout_label(cell.layout), cell.rows) for cell in TARGET_CELLS if not cell.targets}
    assert extra == {("4096x4096", layout, rows) for layout in ("b64d0.1", "b64d0.5", "2:4") for rows in (1, 128, 2048)}


def test_targets_give_met_or_missed_per_backend_with_the_peer_of_the_same_run():
    from bench.results import CellResult, Measurement
    from bench.targets import TARGET_CELLS, target_cases, target_rows

    issue_cell = [cell for cell in TARGET_CELLS if cell.case.shape_label == "14336x4096" and cell.rows == 16
                  and cell.layout == BlockSparse(64, 0.1)]
    (case,), behind, _ = target_cases(issue_cell)
    result = CellResult(case, 0.1, 1, 1, {
        "dense": Measurement(Status.OK, speedup=1.0),
        "sparsekernels[triton]": Measurement(Status.OK, speedup=8.5),
        "sparsekernels[cuda]": Measurement(Status.OK, speedup=7.9),
        "torch_bsr": Measurement(Status.OK, speedup=5.0),
    })
    rows = target_rows([result], behind, ["dense", "sparsekernels[triton]", "sparsekernels[cuda]", "torch_bsr"])
    verdicts = {(row["implementation"], row["target"], row["source"]): row["verdict"] for row in rows}
    assert verdicts == {("sparsekernels[triton]", 8.0, "issue 4"): "met",
                        ("sparsekernels[cuda]", 8.0, "issue 5"): "missed"}
    assert all(row["peer"] == "torch_bsr" and row["peer_ratio"] == 5.0 for row in rows)

    # only the triton column measured: the cuda target shows as not measured; a wrong result is no verdict
    result.measurements["sparsekernels[triton]"] = Measurement(Status.WRONG)
    del result.measurements["sparsekernels[cuda]"]
    rows = target_rows([result], behind, ["dense", "sparsekernels[triton]", "torch_bsr"])
    assert [(row["implementation"], row["verdict"]) for row in rows] == [
        ("sparsekernels[triton]", "wrong"), ("sparsekernels[cuda]", "not measured")]

    # the same cell run at another M is not the issue's cell: its ratio is shown, without a verdict
    (scaled_case,), scaled_behind, _ = target_cases(issue_cell, rows=[4])
    scaled = CellResult(scaled_case, 0.1, 1, 1, {"sparsekernels[triton]": Measurement(Status.OK, speedup=9.0)})
    (row, _) = target_rows([scaled], scaled_behind, ["dense", "sparsekernels[triton]"])
    assert (row["ratio"], row["verdict"]) == (9.0, "scaled")
    assert row["issue_cell"] == "14336x4096 b64d0.1 bfloat16 M=16 forward"


def test_targets_suite_runs_small_on_cpu_and_stores_its_verdicts(tmp_path):
    args = ["--suite", "targets", "--device", "cpu", "--shapes", "256x256", "--dtype", "float32", "--m", "4",
            "--peers", "torch_bsr", "--repeats", "1", "--warmup", "0", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["run"]["suite"] == "targets"
    # every issue cell scaled to 256x256 float32 M=4: the equal ones are measured once
    assert {(cell["layout"], cell["op"]) for cell in document["cells"]} == {
        ("b64d0.1", "forward"), ("b64d0.1", "train_step"), ("b64d0.5", "forward"), ("b128d0.5", "train_step"),
        ("2:4", "forward"), ("2:4T", "train_step")}
    assert len(document["cells"]) == 6
    rows = document["targets"]
    assert {row["implementation"] for row in rows} == {OURS_CPU, "sparsekernels[triton]", "sparsekernels[cuda]"}
    for row in rows:
        if row["implementation"] == OURS_CPU:
            assert row["verdict"] == "-" and row["status"] == "ok" and row["ratio"] > 0
        else:  # targets of GPU backends on a CPU run: shown, never judged
            assert row["verdict"] == "not measured" and row["target"] >= 1.3
    assert sum(row["verdict"] == "not measured" for row in rows) == 12  # the 12 targets of the two issues


# ------------------------------------------------------------------ axis dedupe, messages (bench-a)
def test_repeated_axis_values_are_measured_once(tmp_path):
    cases, _ = build_cases([(64, 64), (64, 64)], [parse_layout("b16d0.5"), parse_layout("b16d0.50")],
                           [parse_dtype("fp32"), parse_dtype("float32")], [4, 4], [Op.FORWARD, Op.FORWARD])
    assert len(cases) == 1
    args = ["--device", "cpu", "--shapes", "64x64,64x64", "--m", "4,4", "--dtype", "fp32,float32", "--layouts",
            "b16d0.5,b16d0.50", "--ops", "forward", "--peers", "dense", "--repeats", "1", "--warmup", "0",
            "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert len(document["cells"]) == 1 and document["run"]["axes"]["layouts"] == ["b16d0.5"]


@pytest.mark.parametrize("option", ["--threads", "--repeats", "--m", "--steps"])
def test_a_non_positive_count_names_the_option_and_what_it_expects(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([option, "0"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: expected a positive integer (1 or more), got '0'" in error
    assert "_positive_int" not in error


def test_pytest_benchmark_variants_add_a_column_per_other_backend():
    from bench import test_benchmarks

    # CPU: the cpu backend is the library's own choice; CUDA: triton is, and cuda comes on top when built
    allowed = [[]] if test_benchmarks.DEVICE.type == "cpu" else [[], ["cuda"]]
    assert test_benchmarks.OTHER_BACKENDS in allowed
    ours = [name for name in test_benchmarks.NAMES if implementations.is_ours(name)]
    assert ours == ["sparsekernels", *(f"sparsekernels[{b}]" for b in test_benchmarks.OTHER_BACKENDS)]
    assert all(name in test_benchmarks.CONTENDERS for name in test_benchmarks.NAMES)


def test_backends_is_refused_for_the_e2e_suite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--suite", "e2e", "--backends", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--backends applies to the cell suites" in capsys.readouterr().err
