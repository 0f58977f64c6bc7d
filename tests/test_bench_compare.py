"""``python -m bench compare``'s verdicts beyond slower / faster: a result that became n/a, an
interrupted or smaller NEW run, a change of timing method, and the spread of e2e timings.

The documents are built here (no benchmark runs): only their structure matters to compare.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import cli, compare


def _timing(median_ms: float, method: str = "wall_clock", spread: float = 0.0, l2_flushed: bool = False) -> dict:
    return {"median_ms": median_ms, "p20_ms": median_ms * (1 - spread / 2), "p80_ms": median_ms * (1 + spread / 2),
            "samples": 5, "method": method, "l2_flushed": l2_flushed}


def _measurement(status: str = "ok", **timing) -> dict:
    return {"status": status, "timing": _timing(**timing) if status == "ok" else None}


def _document(rows=(1, 16, 256), complete: bool = True, method: str = "wall_clock") -> dict:
    """A quick-suite-like file: one cell per M, each with dense, sparsekernels and torch_bsr."""
    cells = [
        {"shape": "4096x4096", "layout": "b64d0.1", "dtype": "float32", "M": rows_, "op": "forward",
         "results": {name: _measurement(median_ms=median, method=method)
                     for name, median in (("dense", 2.0), ("sparsekernels", 1.0), ("torch_bsr", 3.0))}}
        for rows_ in rows
    ]
    return {"run": {"suite": "quick", "complete": complete}, "cells": cells}


def _compare(tmp_path: Path, old: dict, new: dict, *extra: str) -> int:
    paths = []
    for name, document in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(document))
        paths.append(str(tmp_path / name))
    return cli.main(["compare", *paths, *extra])


def _verdicts(old: dict, new: dict) -> dict:
    return {(change.cell[3], change.cell[4], change.implementation): change.verdict(compare.DEFAULT_THRESHOLD)
            for change in compare.compare_documents(old, new).changes}


# --------------------------------------------------------------------------------------------- n/a
def test_a_peer_that_became_not_applicable_is_listed_but_not_a_regression(tmp_path, capsys):
    old = _document()
    new = copy.deepcopy(old)
    new["cells"][0]["results"]["torch_bsr"] = {"status": "n/a", "detail": "stk is not installed", "timing": None}
    assert _verdicts(old, new)[(1, "forward", "torch_bsr")] == "n/a"
    capsys.readouterr()
    assert _compare(tmp_path, old, new) == 0
    output = capsys.readouterr().out
    assert "regressions 0," in output and "n/a 1," in output
    assert _compare(tmp_path, new, old) == 0  # and back: a peer that became available
    assert _verdicts(new, old)[(1, "forward", "torch_bsr")] == "n/a"


def test_this_library_losing_a_cell_it_ran_is_broken(tmp_path):
    """A peer may come and go (n/a); a sparsekernels column that ran a cell and now cannot (a CUDA
    build without its kernels, say) is a regression."""
    old = _document()
    ours = next(name for name in old["cells"][0]["results"] if name.startswith("sparsekernels"))
    new = copy.deepcopy(old)
    new["cells"][0]["results"][ours] = {"status": "n/a", "detail": "this build has no CUDA kernels", "timing": None}
    assert _verdicts(old, new)[(1, "forward", ours)] == "broken"
    assert _compare(tmp_path, old, new) == 1
    assert _verdicts(new, old)[(1, "forward", ours)] == "n/a"  # gaining one is not


def test_a_result_that_became_wrong_or_an_error_is_still_broken(tmp_path):
    old = _document()
    for status in ("wrong", "error"):
        new = copy.deepcopy(old)
        new["cells"][1]["results"]["sparsekernels"] = {"status": status, "timing": None}
        assert _verdicts(old, new)[(16, "forward", "sparsekernels")] == "broken"
        assert _compare(tmp_path, old, new) == 1


# ------------------------------------------------------------------------------ incomplete / missing
def test_an_interrupted_new_run_fails_unless_allowed(tmp_path, capsys):
    """/tmp/audit-6/partial.json: run.complete false and 8 of 9 cells missing passed with exit 0."""
    old = _document()
    partial = _document(rows=(1,), complete=False)
    capsys.readouterr()
    assert _compare(tmp_path, old, partial) == 1
    output = capsys.readouterr().out
    assert "interrupted run" in output and "NEW lacks 6 result(s)" in output and "regressions 0," in output
    assert _compare(tmp_path, old, partial, "--allow-incomplete") == 0

    complete_flag_only = _document(complete=False)  # every cell there, but the run says it was cut short
    assert _compare(tmp_path, old, complete_flag_only) == 1
    assert _compare(tmp_path, old, complete_flag_only, "--allow-incomplete") == 0


def test_results_missing_from_new_fail_unless_allowed(tmp_path):
    old = _document()
    fewer_cells = _document(rows=(1, 16))
    assert compare.compare_documents(old, fewer_cells).missing == [
        (("4096x4096", "b64d0.1", "float32", 256, "forward"), name) for name in ("dense", "sparsekernels", "torch_bsr")]
    assert _compare(tmp_path, old, fewer_cells) == 1
    assert _compare(tmp_path, old, fewer_cells, "--allow-incomplete") == 0

    fewer_peers = copy.deepcopy(old)
    del fewer_peers["cells"][2]["results"]["torch_bsr"]
    assert _compare(tmp_path, old, fewer_peers) == 1

    # a result OLD did not have either is not missing; nor are cells only in NEW
    old_without_peer = copy.deepcopy(old)
    old_without_peer["cells"][2]["results"]["torch_bsr"] = {"status": "n/a", "timing": None}
    assert _compare(tmp_path, old_without_peer, fewer_peers) == 0
    assert _compare(tmp_path, fewer_cells, old) == 0


# ---------------------------------------------------------------------------------- timing method
def test_a_change_of_timing_method_is_listed_and_not_compared(tmp_path, capsys):
    old = _document(method="cuda_graph")
    eager = _document(method="eager")
    for cell in eager["cells"]:  # eager includes host overhead: far slower, but not a regression
        for measurement in cell["results"].values():
            measurement["timing"]["median_ms"] *= 3
    assert set(_verdicts(old, eager).values()) == {"method differs"}
    capsys.readouterr()
    assert _compare(tmp_path, old, eager) == 0
    output = capsys.readouterr().out
    assert "method differs (cuda_graph -> eager)" in output
    assert "not compared (timing method differs) 9;" in output

    flushed = _document(method="cuda_graph")
    for cell in flushed["cells"]:
        for measurement in cell["results"].values():
            measurement["timing"]["l2_flushed"] = True
    assert set(_verdicts(old, flushed).values()) == {"method differs"}
    assert compare.timing_method(flushed["cells"][0]["results"]["dense"]) == "cuda_graph+l2_flush"


# -------------------------------------------------------------------------------------------- e2e
E2E_RECORD = {
    "model": "tiny", "dtype": "float32", "variant": "2:4", "status": "ok",
    "train_step_ms": 100.0, "train_step_p20_ms": 85.0, "train_step_p80_ms": 115.0, "train_tokens_per_s": 640.0,
    "decode_token_ms": 4.0, "decode_token_p20_ms": 3.4, "decode_token_p80_ms": 4.6, "decode_tokens_per_s": 250.0,
    "decode_method": "kv_cache",
}  # fmt: skip


def _e2e(**changes) -> dict:
    return {"cells": [], "e2e": [{**E2E_RECORD, **changes}]}


def test_e2e_rows_get_the_noise_allowance_of_their_measured_spread(tmp_path):
    """Both phases have a 30% spread (p80 - p20 over the median) in OLD and none in NEW: a 25%
    slowdown is within the 30% allowance, a 2x slowdown is not. Before the spread was kept, e2e rows
    got the flat 10% and a noisy CPU gave false regressions."""
    old = _e2e()
    (decode, train) = sorted(compare.compare_documents(old, old).changes, key=lambda change: change.cell[-1])
    assert decode.cell[-1] == "decode" and decode.old_spread == pytest.approx(0.3)
    assert train.cell[-1] == "train" and train.old_spread == pytest.approx(0.3)
    assert train.old_ms == pytest.approx(1e3 / 640.0)
    slower = _e2e(train_step_p20_ms=125.0, train_step_p80_ms=125.0, train_tokens_per_s=512.0,
                  decode_token_p20_ms=5.0, decode_token_p80_ms=5.0, decode_tokens_per_s=200.0)
    assert _compare(tmp_path, old, slower) == 0
    doubled = _e2e(train_tokens_per_s=320.0, decode_tokens_per_s=125.0)
    assert _compare(tmp_path, old, doubled) == 1


def test_e2e_decode_without_a_kv_cache_is_not_compared_with_decode_on_one(tmp_path, capsys):
    before_cache = {key: value for key, value in E2E_RECORD.items()
                    if not key.startswith("decode_token") and key != "decode_method"}
    old = {"cells": [], "e2e": [{**before_cache, "decode_tokens_per_s": 25.0}]}  # full context per token: slow
    capsys.readouterr()
    assert _compare(tmp_path, _e2e(), old) == 0  # NEW 10x slower, but timed another way
    assert "method differs (kv_cache -> full_context)" in capsys.readouterr().out


def test_an_e2e_record_missing_from_new_fails_unless_allowed(tmp_path):
    old = {"cells": [], "e2e": [E2E_RECORD, {**E2E_RECORD, "variant": "dense"}]}
    new = _e2e()
    assert _compare(tmp_path, old, new) == 1
    assert _compare(tmp_path, old, new, "--allow-incomplete") == 0
