"""The e2e suite's model and measurements: the KV cache of bench/gpt.py, float16 training, decode
timing in the decode regime, the spread of the timings, and result files that survive a diverged run.

The models are tiny (seconds on a 2-core CPU); timings are not checked, only what is measured and kept.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import sparsekernels
from bench import cli, e2e
from bench.gpt import GPT, GPTConfig, mlp_only
from bench.report import write_json
from bench.results import Measurement, Status, results_json
from sparsekernels import NM

CPU = torch.device("cpu")
TINY_MODEL = e2e.E2E_MODELS["tiny"]


def _model(layout=None, max_seq_len: int = 16) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=128, n_layers=2, n_heads=2, max_seq_len=max_seq_len))
    if layout is not None:
        sparsekernels.sparsify_(model, layout, filter_fn=mlp_only)
    return model.eval()


# --------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("layout", [None, NM(2, 4)], ids=["dense", "2:4"])
def test_decode_steps_on_the_kv_cache_give_the_full_forwards_logits(layout):
    """Teacher-forced: a prefill of 3 tokens, then one token per step; every step's logits equal the
    last position's logits of the whole sequence run without a cache."""
    model = _model(layout)
    tokens = torch.randint(256, (3, 12), generator=torch.Generator().manual_seed(1))
    logits, cache = model.prefill(tokens[:, :3])
    torch.testing.assert_close(logits, model(tokens[:, :3])[:, -1], rtol=1e-5, atol=1e-5)
    for position in range(3, tokens.shape[1]):
        logits = model.decode_step(tokens[:, position : position + 1], cache)
        torch.testing.assert_close(logits, model(tokens[:, : position + 1])[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.length == tokens.shape[1]


def test_a_multi_token_chunk_after_the_cache_is_causal():
    model = _model()
    tokens = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(2))
    _, cache = model.prefill(tokens[:, :4])
    logits = model._cached_logits(tokens[:, 4:], cache)  # 5 queries after 4 cached keys
    torch.testing.assert_close(logits, model(tokens)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [None, NM(2, 4)], ids=["dense", "2:4"])
def test_greedy_decoding_with_the_cache_gives_the_uncached_tokens(layout):
    """12 new tokens after a 6-token prompt run past max_seq_len=16: the cached steps, then the
    sliding window, must pick the tokens the uncached path picks."""
    model = _model(layout)
    prompt = torch.randint(256, (2, 6), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 12)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, model.generate(prompt, 12, use_cache=False))


def test_the_cache_refuses_more_positions_than_max_seq_len():
    model = _model(max_seq_len=8)
    _, cache = model.prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)


def test_decode_timing_feeds_the_mlps_one_row_per_sequence():
    """The decode regime: after the prefill, every timed step's MLP linears see batch rows (M = 3
    here), not the whole context."""
    model = _model(NM(2, 4))
    rows_seen = []
    model.blocks[0].mlp.fc.register_forward_hook(lambda module, inputs, output: rows_seen.append(inputs[0].shape[:-1]))
    prompt = torch.randint(256, (3, 5), generator=torch.Generator().manual_seed(4))
    prefill_ms, token_ms = e2e.time_decoding(model, prompt, new_tokens=4, repeats=2, device=CPU)
    assert len(prefill_ms) == len(token_ms) == 2 and all(ms > 0 for ms in prefill_ms + token_ms)
    per_run = [torch.Size([3, 5])] + [torch.Size([3, 1])] * 4
    assert rows_seen == per_run * 3  # one untimed run, then the two timed ones


# ------------------------------------------------------------------------------ float16, files
def test_e2e_trains_float16_with_master_weights_and_writes_its_files(tmp_path):
    """Pure float16 AdamW turned the loss into nan and the nan made the JSON writer throw the run away."""
    args = ["--suite", "e2e", "--device", "cpu", "--model", "tiny", "--steps", "5", "--dtype", "float16",
            "--layouts", "2:4", "--no-progress", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    dense, sparse = document["e2e"]
    for record in (dense, sparse):
        assert record["status"] == "ok", record["detail"]
        assert all(math.isfinite(loss) for loss in record["step_losses"])
        assert record["loss_after_steps"] < record["loss_initial"]
        assert record["skipped_steps"] == 0
        # float16 weights plus float32 masters, their gradients and two AdamW moments: 18 bytes each
        assert record["state_bytes"] >= 18 * record["stored_parameters"]
        # the spread compare allows for, and decode timed per step on the KV cache
        assert record["train_step_p20_ms"] <= record["train_step_ms"] <= record["train_step_p80_ms"]
        assert record["decode_token_p20_ms"] <= record["decode_token_ms"] <= record["decode_token_p80_ms"]
        assert record["decode_method"] == "kv_cache" and record["prefill_ms"] > 0
        assert record["decode_tokens_per_s"] == pytest.approx(TINY_MODEL.decode_batch / record["decode_token_ms"] * 1e3)
    with (tmp_path / "e2e.csv").open(newline="") as file:
        assert [row["status"] for row in csv.DictReader(file)] == ["ok", "ok"]


def test_a_float16_step_whose_gradients_overflow_is_skipped_and_counted():
    model = _model().half()
    trainer = e2e.Float16Trainer(model, CPU)
    tokens = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(5))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    trainer.step(loss)
    weights = [parameter.clone() for parameter in model.parameters()]
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    trainer.step(loss * math.inf)  # inf gradients: AdamW must not see them
    assert trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 2.0**15
    assert all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))


def test_results_json_writes_non_finite_numbers_as_null():
    document = {"loss": math.nan, "rows": [math.inf, 1.5, {"error": -math.inf}], "name": "nan"}
    assert json.loads(results_json(document)) == {"loss": None, "rows": [None, 1.5, {"error": None}], "name": "nan"}


def test_a_diverged_e2e_run_still_writes_its_files(tmp_path, monkeypatch):
    diverged = e2e.E2EResult("dense", Status.WRONG, "non-finite logits", loss_initial=5.5,
                             loss_after_steps=math.nan, step_losses=[5.5, math.inf, math.nan])
    monkeypatch.setattr(e2e, "run_e2e", lambda *args, **kwargs: [diverged])
    args = ["--suite", "e2e", "--device", "cpu", "--model", "tiny", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0  # only a sparse variant's failure fails the run
    (record,) = json.loads((tmp_path / "results.json").read_text())["e2e"]
    assert record["loss_after_steps"] is None and record["step_losses"] == [5.5, None, None]
    with (tmp_path / "e2e.csv").open(newline="") as file:
        assert next(csv.DictReader(file))["loss_after_steps"] == ""


def test_a_kernel_result_with_a_non_finite_error_is_still_written(tmp_path):
    """The kernel suites' writer goes through the same helper."""
    wrong = Measurement(Status.WRONG, "output outside tolerance", max_abs_error=math.inf, max_rel_error=math.nan)
    result = type("Result", (), {"to_dict": lambda self: {"results": {"sparsekernels": wrong.to_dict()}}})()
    write_json(tmp_path / "results.json", [result], {}, {})
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["results"]["sparsekernels"]["max_rel_error"] is None
