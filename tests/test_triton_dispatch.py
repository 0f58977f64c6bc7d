"""Autotuning (sparsekernels/triton/autotune.py) and the dense-fallback dispatch (dispatch.py).

Both decide on a GPU by timing; here the timing functions and the "may measure" predicate are
injected, so the logic (keys, the disk cache across processes, the disabled paths, corrupted files,
the dense weight cache and its invalidation, gradients through the dense path) runs on CPU tensors
under the Triton interpreter. No assertion depends on real time.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import sparsekernels as sk
from cases import (
    KeyRecorder,
    assert_close,
    check_op_against_dense,
    kept_values_of,
    make_case,
    resolve_heuristic,
    skip_without_triton,
    sparse_linear,
    triton_device,
)
from sparsekernels import NM, BlockSparse, BlockSparseMatrix

DEVICE = triton_device()

pytestmark = skip_without_triton()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("SPARSEKERNELS_AUTOTUNE", "SPARSEKERNELS_TUNE_CACHE", "SPARSEKERNELS_DENSE_FALLBACK"):
        monkeypatch.delenv(name, raising=False)


def autotune():
    from sparsekernels.triton import autotune

    return autotune


def dispatch():
    from sparsekernels.triton import dispatch

    return dispatch


def always(device, tensors):
    return True


class TableTimer:
    """A timer that runs nothing and returns the time listed for each config (ms)."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, fn):
        config = fn.__defaults__[0]  # Tuner._tune binds the candidate as the lambda's default
        self.calls.append(config)
        return self.table[config]


def refuse(fn):
    raise AssertionError("timed although no tuning was expected")


# ------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("rows, bucket", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (8192, 8192)])
def test_m_bucket(rows, bucket):
    assert autotune().m_bucket(rows) == bucket


@pytest.mark.parametrize("density, bucket", [(0.0, 0.05), (0.05, 0.05), (0.1, 0.1), (0.11, 0.2), (0.5, 0.5),
                                             (0.51, 0.7), (0.99, 1.0), (1.0, 1.0)])
def test_density_bucket(density, bucket):
    assert autotune().density_bucket(density) == bucket


def test_launchers_key_by_bucketed_shape(monkeypatch):
    """The forward key of a block weight: M bucket, N, K, block size, density bucket, dtype; batches
    in one power-of-two bucket share it."""
    recorder = KeyRecorder()
    monkeypatch.setattr(autotune(), "tuner", recorder)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")  # CUDA tensors: the sparse kernel only
    matrix = BlockSparseMatrix.random((48, 64), 16, 0.5, dtype=torch.float32).to(DEVICE)  # 6 of 12 blocks
    matrix.values.normal_()  # random() leaves the values uninitialised
    for rows in (5, 8):
        sk.triton.bsr_linear(torch.randn(rows, 64, device=DEVICE), matrix.values, *matrix.index_tensors())
    expected = ("bsr_forward", 8, 48, 64, "b16", 0.5, "torch.float32")
    assert recorder.keys == [expected, expected]
    nm_matrix = make_case(NM(2, 4), torch.float16, DEVICE).matrix
    sk.triton.nm_linear(torch.randn(33, nm_matrix.shape[1], dtype=torch.float16, device=DEVICE), nm_matrix.values,
                        nm_matrix.positions, 2, 4)
    assert recorder.keys[-1] == ("nm_forward", 64, *nm_matrix.shape, "2:4", 0.5, "torch.float16")


# ------------------------------------------------------------------------------------------ tuner
CANDIDATES = [autotune().Config(16, 32, 4, 2), autotune().Config(32, 32, 8, 2), autotune().Config(64, 16, 4, 1)]
HEURISTIC = autotune().Config(16, 16, 4, 2)
KEY = ("bsr_forward", 64, 128, 256, "b32", 0.5, "torch.bfloat16")


def choose(tuner, runs=None):
    ran = runs if runs is not None else []
    return tuner.choose(KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, ran.append)


def test_tuning_picks_the_fastest_and_a_second_process_reuses_it(tmp_path):
    path = tmp_path / "tune.json"
    timer = TableTimer({HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 5.0})
    first = autotune().Tuner(path=path, timer=timer, measurable=always)
    assert choose(first) == CANDIDATES[1]
    assert timer.calls == [HEURISTIC, *CANDIDATES] and first.tuning_runs == 1
    assert choose(first) == CANDIDATES[1] and len(timer.calls) == 4  # memory: not timed again
    stored = json.loads(path.read_text())
    assert stored["version"] == 1 and len(stored["configs"]) == 1
    assert [name for name in os.listdir(tmp_path)] == ["tune.json"]  # the temporary file was renamed

    # A fresh object is a fresh process: empty memory, same file. It must not time anything.
    second = autotune().Tuner(path=path, timer=refuse, measurable=always)
    assert choose(second) == CANDIDATES[1] and second.tuning_runs == 0
    first.clear_memory()
    assert choose(first) == CANDIDATES[1] and len(timer.calls) == 4


def test_keys_are_per_gpu_and_merged_into_the_file(tmp_path):
    path = tmp_path / "tune.json"
    table = {HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 5.0}
    first = autotune().Tuner(path=path, timer=TableTimer(table), measurable=always)
    second = autotune().Tuner(path=path, timer=TableTimer({**table, CANDIDATES[2]: 0.5}), measurable=always)
    choose(first)
    other_key = KEY[:1] + (128,) + KEY[2:]
    assert second.choose(other_key, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == CANDIDATES[2]
    stored = json.loads(path.read_text())["configs"]
    assert len(stored) == 2  # the second writer kept the first one's entry
    assert all(key.endswith("|cpu") for key in stored)  # the device name is part of the key


def test_tuning_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERNELS_AUTOTUNE", "0")
    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse, measurable=always)
    assert choose(tuner) == HEURISTIC
    assert not (tmp_path / "tune.json").exists()


def test_no_tuning_where_nothing_can_be_measured(tmp_path):
    """The default predicate: CPU tensors (the interpreter) are never tuned."""
    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse)
    assert choose(tuner) == HEURISTIC
    assert not autotune().can_measure(torch.device("cpu"), ())


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "configs": {}}', '{"version": 1, "configs": []}',
                                     '{"version": 1, "configs": {"k": {"tile": 3}}}'],
                         ids=["syntax", "version", "section-type", "entry"])
def test_corrupted_cache_file_is_ignored_with_a_warning(tmp_path, content):
    path = tmp_path / "tune.json"
    path.write_text(content)
    timer = TableTimer({HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 5.0})
    tuner = autotune().Tuner(path=path, timer=timer, measurable=always)
    with pytest.warns(UserWarning, match="ignoring the corrupted tuning cache"):
        assert choose(tuner) == CANDIDATES[1]
    assert json.loads(path.read_text())["version"] == 1  # rewritten, valid


def test_cache_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "cache.json"
    monkeypatch.setenv("SPARSEKERNELS_TUNE_CACHE", str(path))
    timer = TableTimer({HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 5.0})
    assert choose(autotune().Tuner(timer=timer, measurable=always)) == CANDIDATES[1]
    assert path.exists()
    assert autotune().Tuner().path("NVIDIA H100 80GB HBM3") == path
    monkeypatch.delenv("SPARSEKERNELS_TUNE_CACHE")
    assert autotune().Tuner().path("NVIDIA H100 80GB HBM3").name == "triton-tune-NVIDIA-H100-80GB-HBM3.json"


def test_failing_candidate_is_skipped(tmp_path):
    def timer(fn):
        config = fn.__defaults__[0]
        if config == CANDIDATES[1]:
            raise RuntimeError("out of shared memory")
        return {HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[2]: 5.0}[config]

    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=timer, measurable=always)
    with pytest.warns(UserWarning, match="tuning candidate"):
        assert choose(tuner) == CANDIDATES[0]


# Float32 tiles are multiplied in TF32 or in full precision by torch's setting (_common.dot_mode), and
# cuBLAS follows the same setting: a choice measured under one must not serve the other.
FLOAT32_KEY = KEY[:-1] + ("torch.float32",)


@pytest.fixture
def tf32():
    """``tf32(True / False)`` sets torch's float32 matmul precision (new API); restored afterwards."""
    previous = torch.backends.cuda.matmul.fp32_precision

    def set_tf32(enabled: bool) -> None:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"

    yield set_tf32
    torch.backends.cuda.matmul.fp32_precision = previous


def test_float32_configurations_are_kept_per_tf32_setting(tmp_path, tf32):
    path = tmp_path / "tune.json"
    tuner = autotune().Tuner(path=path, measurable=always)
    tuner.timer = TableTimer({HEURISTIC: 3.0, CANDIDATES[0]: 1.0, CANDIDATES[1]: 2.0, CANDIDATES[2]: 5.0})
    tf32(True)
    assert tuner.choose(FLOAT32_KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == CANDIDATES[0]
    tf32(False)  # measured again: the TF32 choice says nothing of full-precision tiles
    tuner.timer = TableTimer({HEURISTIC: 3.0, CANDIDATES[0]: 2.0, CANDIDATES[1]: 1.0, CANDIDATES[2]: 5.0})
    assert tuner.choose(FLOAT32_KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == CANDIDATES[1]
    assert tuner.tuning_runs == 2
    tuner.timer = refuse
    tf32(True)
    assert tuner.choose(FLOAT32_KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == CANDIDATES[0]
    stored = json.loads(path.read_text())["configs"]
    assert sorted(key.rsplit("|", 1)[1] for key in stored) == ["ieee", "tf32"]
    fresh = autotune().Tuner(path=path, timer=refuse, measurable=always)  # a second process
    tf32(False)
    assert fresh.choose(FLOAT32_KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == CANDIDATES[1]
    # Half-precision keys do not depend on the setting: tuned once.
    half_timer = TableTimer({HEURISTIC: 1.0, **{candidate: 2.0 for candidate in CANDIDATES}})
    half = autotune().Tuner(path=tmp_path / "half.json", timer=half_timer, measurable=always)
    choose(half)
    tf32(True)
    choose(half)
    assert half.tuning_runs == 1


def test_a_file_from_before_the_tf32_field_stays_readable(tmp_path, tf32):
    """Entries written before float32 keys carried the TF32 setting: half-precision ones still
    serve; float32 ones (measured under an unknown setting) are no longer matched: tuned again."""
    path = tmp_path / "tune.json"
    entry = {"block_rows": 64, "tile": 16, "num_warps": 4, "num_stages": 1}
    path.write_text(json.dumps({"version": 1, "gpu": "cpu", "dispatch": {}, "configs": {
        "|".join(map(str, KEY + ("cpu",))): entry, "|".join(map(str, FLOAT32_KEY + ("cpu",))): entry}}))
    tf32(False)
    timer = TableTimer({HEURISTIC: 1.0, **{candidate: 2.0 for candidate in CANDIDATES}})
    tuner = autotune().Tuner(path=path, timer=timer, measurable=always)
    assert choose(tuner) == CANDIDATES[2] and tuner.tuning_runs == 0
    assert tuner.choose(FLOAT32_KEY, torch.device("cpu"), (), HEURISTIC, lambda: CANDIDATES, None) == HEURISTIC
    assert tuner.tuning_runs == 1


# ------------------------------------------------------------------ every candidate computes the same
class Forced:
    """A tuner that returns the candidate at ``index`` (or the heuristic past the end)."""

    def __init__(self, index):
        self.index, self.seen = index, 0

    def choose(self, key, device, tensors, heuristic, candidates, run):
        options = candidates()
        self.seen = max(self.seen, len(options))
        return options[self.index] if self.index < len(options) else resolve_heuristic(heuristic)


# 20 rows: the candidates with 16 / 32-row tiles (4 per kernel). 300 rows: those with 64-row tiles
# and, from 256 rows on, the 128-row tiles (indices 4-7 of the block and N:M forward, block input
# gradient and N:M kept-value gradient candidates). Candidates come in pairs that differ only in
# num_warps (indices 2k and 2k + 1), which the interpreter ignores: there the 300-row runs take
# one of each pair.
_WARP_PAIR_STEP = 1 if torch.cuda.is_available() else 2
TUNING_CANDIDATE_RUNS = [(20, index) for index in range(4)] + [(300, index) for index in range(0, 8, _WARP_PAIR_STEP)]


@pytest.mark.parametrize("rows, index", TUNING_CANDIDATE_RUNS, ids=[f"rows{r}-{i}" for r, i in TUNING_CANDIDATE_RUNS])
@pytest.mark.parametrize("layout", [BlockSparse(32, 0.5), NM(2, 4)], ids=["block32", "nm2:4"])
def test_every_tuning_candidate_matches_dense(layout, rows, index, monkeypatch):
    """Forward and both gradients with each candidate configuration the tuner may pick."""
    forced = Forced(index)
    monkeypatch.setattr(autotune(), "tuner", forced)
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")
    torch.manual_seed(index)
    case = make_case(layout, torch.float32, DEVICE, features=(96, 128))
    check_op_against_dense(
        case, lambda input, values, bias: sparse_linear(case.matrix, input, values, bias, sk.triton), torch.float32,
        (rows,), with_bias=False, device=DEVICE,
    )
    assert forced.seen >= 2
    assert forced.seen > index  # some kernel ran candidate ``index`` (others fall back to the heuristic)


# ------------------------------------------------------------------------------------------ dispatch
def dispatch_tuner(tmp_path, sparse_ms, dense_ms):
    """A tuner whose timer runs each path once (so both must work) and reports the given times, in
    the order dispatch measures them: sparse, then dense."""
    times = iter([sparse_ms, dense_ms])
    calls = []

    def timer(fn):
        calls.append(fn())
        return next(times)

    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=timer, measurable=always)
    return tuner, calls


def block_problem(requires_grad=False, seed=0):
    torch.manual_seed(seed)
    case = make_case(BlockSparse(16, 0.5), torch.float32, DEVICE, features=(48, 64))
    values = case.matrix.values.detach().clone().requires_grad_(requires_grad)
    return case, values, case.matrix.index_tensors()


@pytest.mark.parametrize("sparse_ms, dense_ms, path", [(2.0, 1.0, "dense"), (1.0, 2.0, "sparse")])
def test_dispatch_takes_the_faster_path_once_measured(tmp_path, sparse_ms, dense_ms, path):
    tuner, calls = dispatch_tuner(tmp_path, sparse_ms, dense_ms)
    case, values, index = block_problem()
    input = torch.randn(5, 64, device=DEVICE)
    bias = torch.randn(48, device=DEVICE)
    before = dict(dispatch().path_counts)
    output = dispatch().bsr_linear(input, values, *index, bias, tuner=tuner)
    assert dispatch().last_path() == path and len(calls) == 2
    assert_close(output, F.linear(input, case.masked, bias), torch.float32, "output")
    assert_close(calls[0], calls[1], torch.float32, "the two measured paths")
    dispatch().bsr_linear(input, values, *index, bias, tuner=tuner)
    assert len(calls) == 2  # decided once
    assert dispatch().path_counts[path] == before[path] + 2
    stored = json.loads((tmp_path / "tune.json").read_text())["dispatch"]
    assert [entry["path"] for entry in stored.values()] == [path]
    fresh = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse, measurable=always)
    dispatch().bsr_linear(input, values, *index, bias, tuner=fresh)
    assert dispatch().last_path() == path


def test_dispatch_disabled_by_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERNELS_DENSE_FALLBACK", "0")
    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse, measurable=always)
    case, values, index = block_problem()
    dispatch().bsr_linear(torch.randn(3, 64, device=DEVICE), values, *index, tuner=tuner)
    assert dispatch().last_path() == "sparse"


def test_dispatch_without_measurement_stays_sparse(tmp_path):
    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse)  # CPU: cannot measure
    case, values, index = block_problem()
    dispatch().bsr_linear(torch.randn(3, 64, device=DEVICE), values, *index, tuner=tuner)
    assert dispatch().last_path() == "sparse"
    assert not (tmp_path / "tune.json").exists()


def test_float32_dispatch_decisions_are_kept_per_tf32_setting(tmp_path, tf32):
    """cuBLAS and the kernels both multiply float32 in TF32 when torch allows it: a decision measured
    under TF32 is measured again under full precision, and each is stored under its own key."""
    times = iter([2.0, 1.0, 1.0, 2.0])  # (sparse, dense) under TF32, then under full precision
    measured = []
    tuner = autotune().Tuner(path=tmp_path / "tune.json", timer=lambda fn: (measured.append(1), next(times))[1],
                             measurable=always)
    case, values, index = block_problem()
    input = torch.randn(5, 64, device=DEVICE)
    tf32(True)
    assert dispatch().bsr_path(input, values, index, tuner) == "dense"
    tf32(False)
    assert dispatch().bsr_path(input, values, index, tuner) == "sparse"
    tf32(True)
    assert dispatch().bsr_path(input, values, index, tuner) == "dense" and len(measured) == 4
    stored = json.loads((tmp_path / "tune.json").read_text())["dispatch"]
    assert {key.rsplit("|", 1)[1]: entry["path"] for key, entry in stored.items()} == {"tf32": "dense",
                                                                                        "ieee": "sparse"}


# The CUDA C++ op as a third candidate. dispatch.cuda_candidate is patched so that CPU tensors see
# it; the "cuda" path then calls torch.ops.sparsekernels.* on CPU tensors, which runs the C++ CPU
# kernel: a real op with the same schema, so the routing and the results can be checked here.
@pytest.fixture
def cuda_competes(monkeypatch):
    monkeypatch.setattr(dispatch(), "cuda_candidate", lambda input, values: True)


def timed_in_order(tmp_path, times: dict):
    """A tuner whose timer runs each candidate once and reports ``times`` in the order given (the
    order dispatch measures them: sparse, cuda, dense)."""
    reported = iter(times.values())
    calls = []

    def timer(fn):
        calls.append(fn())
        return next(reported)

    return autotune().Tuner(path=tmp_path / "tune.json", timer=timer, measurable=always), calls


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=["block16", "nm2:4"])
@pytest.mark.parametrize("times, path", [
    ({"sparse": 3.0, "cuda": 1.0, "dense": 2.0}, "cuda"),
    ({"sparse": 1.0, "cuda": 3.0, "dense": 2.0}, "sparse"),
    ({"sparse": 3.0, "cuda": 2.0, "dense": 1.0}, "dense"),
], ids=["cuda", "sparse", "dense"])
def test_dispatch_takes_the_fastest_of_three(layout, times, path, tmp_path, cuda_competes):
    tuner, calls = timed_in_order(tmp_path, times)
    torch.manual_seed(2)
    case = make_case(layout, torch.float32, DEVICE, features=(48, 64))
    before = dict(dispatch().path_counts)

    def op(input, values, bias):
        return sparse_linear(case.matrix, input, values, bias, dispatch(), tuner=tuner)

    # Every path matches dense on the masked weight, forward and backward (input, values, bias).
    check_op_against_dense(case, op, torch.float32, (2, 5), with_bias=True, device=DEVICE)
    assert dispatch().last_path() == path and len(calls) == 3
    for measured in calls[1:]:
        assert_close(measured, calls[0], torch.float32, "the measured paths")
    op(torch.randn(2, 5, 64, device=DEVICE), case.matrix.values, None)
    assert len(calls) == 3  # decided once
    assert dispatch().path_counts[path] == before[path] + 2
    stored = json.loads((tmp_path / "tune.json").read_text())["dispatch"]
    assert [sorted(entry) for entry in stored.values()] == [["cuda_ms", "dense_ms", "path", "sparse_ms"]]
    assert [entry["path"] for entry in stored.values()] == [path]


def test_a_cuda_op_that_refuses_is_no_candidate(tmp_path, cuda_competes, monkeypatch):
    def refuses(*args):
        raise RuntimeError("nm_linear: no CUDA kernel for this dtype")

    monkeypatch.setattr(dispatch(), "bsr_cuda", refuses)
    tuner, calls = timed_in_order(tmp_path, {"sparse": 2.0, "dense": 1.0})
    case, values, index = block_problem()
    dispatch().bsr_linear(torch.randn(3, 64, device=DEVICE), values, *index, tuner=tuner)
    assert dispatch().last_path() == "dense" and len(calls) == 2
    stored = json.loads((tmp_path / "tune.json").read_text())["dispatch"]
    assert [sorted(entry) for entry in stored.values()] == [["dense_ms", "path", "sparse_ms"]]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   torch.AcceleratorError("an illegal memory access was encountered")],
                         ids=["oom", "accelerator"])
def test_a_transient_cuda_failure_is_raised_not_stored(tmp_path, cuda_competes, monkeypatch, error):
    """Out of memory or a poisoned context while measuring says nothing about the candidate: the
    error propagates and no decision without the CUDA op lands in the tuning file."""
    def fails(*args):
        raise error

    monkeypatch.setattr(dispatch(), "bsr_cuda", fails)
    tuner, _ = timed_in_order(tmp_path, {"sparse": 2.0, "dense": 1.0})
    case, values, index = block_problem()
    with pytest.raises(type(error)):
        dispatch().bsr_linear(torch.randn(3, 64, device=DEVICE), values, *index, tuner=tuner)
    assert not (tmp_path / "tune.json").exists()


def test_a_cuda_decision_is_not_read_without_the_cuda_candidate(tmp_path, monkeypatch):
    """The candidates are part of the key: a process whose build has no CUDA kernels (or with the
    backend forced to triton) does not take a stored "cuda" decision."""
    monkeypatch.setattr(dispatch(), "cuda_candidate", lambda input, values: True)
    tuner, _ = timed_in_order(tmp_path, {"sparse": 3.0, "cuda": 1.0, "dense": 2.0})
    case, values, index = block_problem()
    input = torch.randn(3, 64, device=DEVICE)
    dispatch().bsr_linear(input, values, *index, tuner=tuner)
    assert dispatch().last_path() == "cuda"
    monkeypatch.setattr(dispatch(), "cuda_candidate", lambda input, values: False)
    reader = autotune().Tuner(path=tmp_path / "tune.json", timer=refuse)  # reads the file, cannot measure
    monkeypatch.setattr(reader, "_reads_file", lambda device: True)
    dispatch().bsr_linear(input, values, *index, tuner=reader)
    assert dispatch().last_path() == "sparse"


def test_cuda_candidate_rule(monkeypatch):
    """The CUDA op competes for CUDA tensors, outside autograd recording, when the extension has
    CUDA kernels and the backend is not forced (a forced "triton" means the Triton kernel)."""
    from types import SimpleNamespace

    from sparsekernels import backend

    def operand(device, requires_grad=False):
        return SimpleNamespace(device=torch.device(device), requires_grad=requires_grad)

    candidate = dispatch().cuda_candidate
    monkeypatch.setattr(dispatch(), "_cuda_kernels_built", lambda: True)
    monkeypatch.setattr(backend, "_forced", "auto")
    assert candidate(operand("cuda"), operand("cuda")) and not candidate(operand("cpu"), operand("cpu"))
    # Not where autograd records the call (the backward would follow the forward's path).
    assert not candidate(operand("cuda", True), operand("cuda"))
    assert not candidate(operand("cuda"), operand("cuda", True))
    with torch.no_grad():
        assert candidate(operand("cuda", True), operand("cuda", True))
    monkeypatch.setattr(backend, "_forced", "triton")
    assert not candidate(operand("cuda"), operand("cuda"))
    monkeypatch.setattr(backend, "_forced", "auto")
    monkeypatch.setattr(dispatch(), "_cuda_kernels_built", lambda: False)
    assert not candidate(operand("cuda"), operand("cuda"))


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=["block16", "nm2:4"])
def test_dense_path_gradients_reach_kept_values_only(tmp_path, layout):
    tuner, _ = dispatch_tuner(tmp_path, 2.0, 1.0)
    torch.manual_seed(1)
    case = make_case(layout, torch.float32, DEVICE, features=(48, 64))
    values = case.matrix.values.detach().clone().requires_grad_()
    input = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    bias = torch.randn(48, device=DEVICE, requires_grad=True)
    output = sparse_linear(case.matrix, input, values, bias, dispatch(), tuner=tuner)
    assert dispatch().last_path() == "dense"
    weight = case.masked.float().requires_grad_()
    expected = F.linear(input.detach(), weight, bias.detach())
    grad_output = torch.randn_like(expected)
    output.backward(grad_output)
    expected.backward(grad_output)
    assert_close(output, expected, torch.float32, "output")
    assert_close(input.grad, grad_output @ case.masked.float(), torch.float32, "grad input")
    assert values.grad.shape == values.shape
    assert_close(values.grad, kept_values_of(case, weight.grad), torch.float32, "grad values")
    assert_close(bias.grad, grad_output.sum((0, 1)), torch.float32, "grad bias")


def test_dense_weight_cache_is_reused_and_invalidated(tmp_path):
    tuner, _ = dispatch_tuner(tmp_path, 2.0, 1.0)
    case, values, index = block_problem()
    input = torch.randn(4, 64, device=DEVICE)
    built = []
    original = dispatch().reference.bsr_to_dense

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    dispatch().clear_dense_cache()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch().reference, "bsr_to_dense", counting)
        with torch.no_grad():
            first = dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 2  # one for the measurement (not kept), one cached for the dense path
            dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 2  # reused
            values.mul_(2)  # in-place: bumps the version counter
            second = dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 3
            assert_close(second, 2 * first, torch.float32, "output after values changed")
            index[1].copy_(index[1])  # an in-place write to the index invalidates too
            dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 4
            dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 4
            index = tuple(tensor.clone() for tensor in index)  # new index objects (as set_pattern makes)
            dispatch().bsr_linear(input, values, *index, tuner=tuner)
            assert len(built) == 5
        # Autograd needs the values' gradient: rebuilt (differentiably) at every call, not cached.
        values.requires_grad_()
        dispatch().bsr_linear(input, values, *index, tuner=tuner)
        dispatch().bsr_linear(input, values, *index, tuner=tuner)
        assert len(built) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU routing")
def test_front_end_keeps_cpu_tensors_on_the_sparse_op(monkeypatch):
    """Without a GPU the front end calls the sparse op directly (dispatch is for CUDA tensors)."""
    monkeypatch.setattr(dispatch(), "bsr_linear", refuse)
    case, values, index = block_problem()
    input = torch.randn(3, 64)
    assert_close(sk.triton.bsr_linear(input, values, *index), F.linear(input, case.masked), torch.float32, "output")
