"""``python -m bench --resume``: a cut-off run continued by a second one (bench/resume.py).

A GPU visit's command may run 10 minutes and the full suite takes hours, so a run must leave what it
measured (on an interrupt, and as it goes, for a run killed outright) and a second run must measure
only what is missing. Four tiny cells on CPU; an implementation that counts the cells it runs and
stops the run after some of them stands in for the time limit.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from bench import cli, implementations, resume
from bench.implementations import Dense

ARGS = [
    "--device", "cpu", "--shapes", "64x64", "--layouts", "b16d0.5,2:4", "--m", "1,4", "--dtype", "float32",
    "--ops", "forward", "--peers", "dense", "--repeats", "2", "--warmup", "0", "--no-progress", "--no-plots",
]  # fmt: skip
CELLS = {("64x64", layout, "float32", rows, "forward") for layout in ("b16d0.5", "2:4") for rows in (1, 4)}
NAMES = ["dense", "sparsekernels[cpu]"]


class Killed(BaseException):
    """A run stopped outright (SIGKILL): nothing in the harness catches it."""


def ctrl_c() -> None:
    raise KeyboardInterrupt


def sigterm() -> None:  # what `timeout` sends by default
    os.kill(os.getpid(), signal.SIGTERM)


def kill() -> None:
    raise Killed


def _key(cell: dict) -> tuple:
    return cell["shape"], cell["layout"], cell["dtype"], cell["M"], cell["op"]


@pytest.fixture
def counting(monkeypatch):
    """Replaces dense (measured on every cell) by a copy that records each cell it runs, as
    (layout, M), and calls ``state["stop"]`` when asked to run cell number ``state["stop_at"]``."""
    state = {"cells": [], "stop_at": None, "stop": ctrl_c}

    class CountingDense(Dense):
        def runner(self, op, inputs):
            if state["stop_at"] is not None and len(state["cells"]) == state["stop_at"]:
                state["stop"]()
            state["cells"].append((self.weight.layout, inputs.x.shape[0]))
            return super().runner(op, inputs)

    monkeypatch.setitem(implementations.IMPLEMENTATIONS, "dense", CountingDense)
    return state


def _read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _statuses(document: dict) -> dict:
    return {_key(cell): {name: cell["results"][name]["status"] for name in NAMES} for cell in document["cells"]}


@pytest.mark.parametrize("stop", [ctrl_c, sigterm, kill], ids=["interrupted", "terminated", "killed"])
def test_a_cut_off_run_resumed_runs_only_the_missing_cells(tmp_path, counting, monkeypatch, stop):
    monkeypatch.setattr(resume, "CHECKPOINT_SECONDS", 0.0)  # results.json rewritten after every cell
    one_shot, cut = tmp_path / "one-shot", tmp_path / "cut"
    assert cli.main([*ARGS, "--out", str(one_shot)]) == 0
    assert len(counting["cells"]) == 4

    counting.update(cells=[], stop_at=2, stop=stop)
    if stop is not kill:  # Ctrl-C, SIGINT or SIGTERM: the harness writes what it has
        assert cli.main([*ARGS, "--out", str(cut)]) == cli.EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the harness's handler is gone
    else:  # killed outright: what the last checkpoint wrote is all there is
        with pytest.raises(Killed):
            cli.main([*ARGS, "--out", str(cut)])
    partial = _read(cut)
    assert partial["run"]["complete"] is False
    assert len(partial["cells"]) == 2
    measured_first = counting["cells"]

    counting.update(cells=[], stop_at=None)
    assert cli.main([*ARGS, "--out", str(cut), "--resume"]) == 0
    assert len(counting["cells"]) == 2 and not set(counting["cells"]) & set(measured_first)
    resumed = _read(cut)
    assert resumed["run"]["complete"] is True
    assert resumed["run"]["resume"]["kept_cells"] == 2 and resumed["run"]["resume"]["ran_cells"] == 2
    assert {_key(cell) for cell in resumed["cells"]} == {_key(cell) for cell in _read(one_shot)["cells"]} == CELLS
    assert _statuses(resumed) == _statuses(_read(one_shot))
    kept = {_key(cell): cell for cell in partial["cells"]}
    assert all(cell == kept[_key(cell)] for cell in resumed["cells"] if _key(cell) in kept)  # kept as they were

    counting.update(cells=[])
    assert cli.main([*ARGS, "--out", str(cut), "--resume"]) == 0  # nothing left to run
    assert counting["cells"] == [] and _read(cut)["cells"] == resumed["cells"]


def test_resume_without_a_file_is_a_first_run_and_reruns_cells_missing_an_implementation(tmp_path, counting):
    assert cli.main([*ARGS, "--out", str(tmp_path), "--resume"]) == 0
    assert len(counting["cells"]) == 4 and _read(tmp_path)["run"]["complete"] is True

    counting.update(cells=[])  # torch_bsr is new: every cell lacks it, so every cell runs again
    with_bsr = [*ARGS, "--peers", "torch_bsr", "--out", str(tmp_path), "--resume"]
    assert cli.main(with_bsr) == 0
    assert len(counting["cells"]) == 4
    assert all("torch_bsr" in cell["results"] for cell in _read(tmp_path)["cells"])


def test_resume_refuses_another_environment_unless_told(tmp_path, counting, capsys):
    assert cli.main([*ARGS, "--out", str(tmp_path)]) == 0
    document = _read(tmp_path)
    document["environment"]["torch"] = "1.0.0"
    document["cells"] = document["cells"][:3]
    (tmp_path / "results.json").write_text(json.dumps(document))

    counting.update(cells=[])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*ARGS, "--out", str(tmp_path), "--resume"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "another environment (torch: '1.0.0' -> " in message and "--resume-anyway" in message
    assert counting["cells"] == []

    assert cli.main([*ARGS, "--out", str(tmp_path), "--resume", "--resume-anyway"]) == 0
    assert len(counting["cells"]) == 1
    resumed = _read(tmp_path)
    assert resumed["run"]["complete"] is True
    assert resumed["run"]["resume"]["environment_mismatches"][0].startswith("torch: '1.0.0' -> ")


def test_environment_mismatches_name_each_field_and_compare_gpus_by_name():
    old = {"device": "cuda", "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550"}, "torch": "2.13",
           "triton": "3.6", "git_commit": "abc", "date_utc": "yesterday"}
    assert resume.environment_mismatches(old, {**old, "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "560"},
                                               "date_utc": "today"}) == []
    new = {**old, "gpu": {"name": "NVIDIA H200"}, "git_commit": "def", "triton": None}
    assert resume.environment_mismatches(old, new) == [
        "gpu: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA H200'", "triton: '3.6' -> None", "git_commit: 'abc' -> 'def'"]
    # CPU runs: another CPU or thread count is another machine, as compare says too
    cpu = {"device": "cpu", "cpu_model": "AMD EPYC", "torch_threads": 2, "gpu": None, "torch": "2.13",
           "triton": "3.6", "git_commit": "abc"}
    assert resume.environment_mismatches(cpu, {**cpu, "cpu_model": "Some Other CPU", "torch_threads": 64}) == [
        "cpu_model: 'AMD EPYC' -> 'Some Other CPU'", "torch_threads: 2 -> 64"]


def test_resume_options_are_refused_where_they_do_not_apply(tmp_path, capsys):
    for argv in ([*ARGS, "--resume-anyway"], ["--suite", "e2e", "--device", "cpu", "--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
    assert "--resume-anyway only applies with --resume" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit):
        cli.main([*ARGS, "--out", str(tmp_path), "--resume"])
    assert "is not a readable results file" in capsys.readouterr().err
