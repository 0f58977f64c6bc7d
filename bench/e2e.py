"""The e2e suite: a whole GPT (``bench/gpt.py``) with its MLPs sparsified, against the dense model.

``python -m bench --suite e2e`` builds one seeded GPT per variant (``dense``, then each layout of
``--layouts``, default ``b32d0.1`` and ``2:4``); the sparse variants prune the dense model's MLP
linears by magnitude through ``sparsekernels.sparsify_(model, layout, filter_fn=mlp_only)``, so all
variants start from the same weights. Each variant then

1. trains for ``steps`` AdamW steps on a synthetic corpus (a seeded random Markov chain over the byte
   vocabulary: learnable, so the loss falls; identical batches for every variant). Steps after the
   first ``WARMUP_STEPS`` are timed: **training tokens/s** = tokens per step / median step time
   (the 20th and 80th percentiles are kept for ``bench compare``). float16 trains with float32
   master weights and loss scaling (:class:`Float16Trainer`): pure float16 AdamW diverges;
2. reports the **loss after those steps** on a held-out batch (and the loss before training);
3. checks its forward against a copy whose SparseLinear layers are turned back into ``nn.Linear``
   with the masked dense weight (max error relative to the logits' scale, tolerance per dtype): a
   variant outside tolerance is WRONG and gets no speeds, as in the kernel suites;
4. times greedy decoding on a KV cache (:func:`time_decoding`): the prompt's prefill apart, then
   ``new_tokens`` one-token steps, whose linears see ``decode_batch`` rows each (the decode regime):
   **decode tokens/s** = ``decode_batch`` / median time per step.

Memory, honestly: on CUDA ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` over the
training steps (weights, gradients, optimizer state and activations). On CPU there is no equivalent
allocator counter, so it is None; ``state_bytes`` (parameters + gradients + AdamW state, counted
from the tensors, exact on every device) is what shows the memory sparsity saves there. Activations
are the same for every variant: only the weights shrink.

Results go to a table, ``results.json`` (``"e2e"`` records, ``"cells"`` empty) and ``e2e.csv``;
``bench compare`` matches e2e records by (model, variant, dtype) and compares time per token.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor, nn
from tqdm import tqdm

import sparsekernels
from sparsekernels import NM, BlockSparse, SparseLinear
from sparsekernels.layouts import Layout

from .cases import dtype_name, layout_label
from .environment import collect_environment
from .errors import describe_error
from .gpt import GPT, GPTConfig, mlp_only
from .plots import write_plots
from .report import busy_machine_warning, results_file_stem, save_to_results
from .results import Status, finite_or_none, results_json

E2E_SUITE = "e2e"
DENSE = "dense"
DEFAULT_LAYOUTS: tuple[Layout, ...] = (BlockSparse(32, 0.1), NM(2, 4))
WARMUP_STEPS = 2  # untimed training steps (allocator, kernel selection, first-call costs)
SEED = 0
JSON_NAME = "results.json"
CSV_NAME = "e2e.csv"
LEARNING_RATE = 1e-3
DECODE_METHOD = "kv_cache"  # what decode_tokens_per_s times: one-token steps on a KV cache, prefill apart
MARKOV_SUCCESSORS = 4  # each token is followed by one of this many tokens: the loss can fall to ~ln 4

# Max |logits - logits of the densified copy| over the logits' scale. Looser than the single-matmul
# tolerances of bench.correctness: rounding differences compound through every layer.
MODEL_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@dataclass(frozen=True)
class E2EModel:
    """A model size and its workload."""

    config: GPTConfig
    batch: int  # sequences per training step
    seq_len: int  # tokens per training sequence
    steps: int  # training steps (WARMUP_STEPS of them untimed); the loss is read after them
    decode_batch: int
    prompt_len: int
    new_tokens: int  # timed decode steps after the prefill (one token per sequence each)
    decode_repeats: int = 5

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


E2E_MODELS: dict[str, E2EModel] = {
    # For the harness's own tests: seconds.
    "tiny": E2EModel(GPTConfig(d_model=128, n_layers=1, n_heads=2, max_seq_len=32), batch=2, seq_len=32, steps=4,
                     decode_batch=1, prompt_len=4, new_tokens=4, decode_repeats=2),
    # The CPU default: about a minute on 2 cores for dense, b32d0.1 and 2:4.
    "small": E2EModel(GPTConfig(d_model=256, n_layers=2, n_heads=4, max_seq_len=128), batch=8, seq_len=128,
                      steps=30, decode_batch=1, prompt_len=16, new_tokens=32),
    # The CUDA default: MLPs of 1024x4096, the regime where the GPU kernels should pay off.
    "medium": E2EModel(GPTConfig(d_model=1024, n_layers=8, n_heads=16, max_seq_len=512), batch=16, seq_len=512,
                       steps=50, decode_batch=8, prompt_len=64, new_tokens=128),
}  # fmt: skip


@dataclass
class E2EResult:
    """One variant of the model."""

    variant: str  # "dense" or a layout label
    status: Status
    detail: Optional[str] = None
    mlp_density: Optional[float] = None  # kept fraction of the MLP weights (1.0 for dense)
    stored_parameters: Optional[int] = None  # parameter elements (sparse layers store kept values only)
    state_bytes: Optional[int] = None  # parameters + gradients + optimizer state
    peak_memory_bytes: Optional[int] = None  # CUDA max_memory_allocated during training; None on CPU
    train_step_ms: Optional[float] = None  # median over the timed steps
    train_step_p20_ms: Optional[float] = None  # 20th / 80th percentiles: the spread compare allows for
    train_step_p80_ms: Optional[float] = None
    train_tokens_per_s: Optional[float] = None
    prefill_ms: Optional[float] = None  # median time to run the prompt and fill the KV cache
    decode_token_ms: Optional[float] = None  # median over the repeats of time per decode step (one token each)
    decode_token_p20_ms: Optional[float] = None
    decode_token_p80_ms: Optional[float] = None
    decode_method: str = DECODE_METHOD
    decode_tokens_per_s: Optional[float] = None
    train_speedup: Optional[float] = None  # over the dense model
    decode_speedup: Optional[float] = None
    loss_initial: Optional[float] = None  # held-out loss before training
    loss_after_steps: Optional[float] = None  # held-out loss after ``steps`` steps
    max_rel_error: Optional[float] = None  # logits against the densified copy, over their scale
    tolerance: Optional[float] = None
    skipped_steps: Optional[int] = None  # float16: steps whose scaled gradients overflowed (not applied)
    step_losses: list[float] = field(default_factory=list)  # training loss of every step

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["status"] = self.status.value
        return record


# ------------------------------------------------------------------------------------------ data
def markov_corpus(vocab_size: int, sequences: int, length: int, seed: int = SEED) -> Tensor:
    """``[sequences, length]`` int64 tokens from a seeded random Markov chain in which every token has
    MARKOV_SUCCESSORS possible successors (fixed, with random probabilities)."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, MARKOV_SUCCESSORS), generator=generator)
    probabilities = torch.rand(vocab_size, MARKOV_SUCCESSORS, generator=generator) + 0.2
    tokens = torch.empty(sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (sequences,), generator=generator)
    for position in range(1, length):
        previous = tokens[:, position - 1]
        choice = torch.multinomial(probabilities[previous], 1, generator=generator).squeeze(1)
        tokens[:, position] = successors[previous, choice]
    return tokens


# ----------------------------------------------------------------------------------------- model
def build_model(spec: E2EModel, layout: Optional[Layout], device: torch.device, dtype: torch.dtype) -> GPT:
    """The seeded GPT, its MLPs pruned into ``layout`` (None: dense), on ``device`` in ``dtype``."""
    torch.manual_seed(SEED)
    model = GPT(spec.config)
    if layout is not None:
        sparsekernels.sparsify_(model, layout, filter_fn=mlp_only)
    return model.to(device=device, dtype=dtype)


def densified_copy(model: nn.Module) -> nn.Module:
    """A copy with every SparseLinear replaced by an ``nn.Linear`` holding its masked dense weight."""
    dense = copy.deepcopy(model)
    replacements = [(name, module) for name, module in dense.named_modules() if isinstance(module, SparseLinear)]
    for name, sparse in replacements:
        weight = sparse.dense_weight().detach()
        linear = nn.Linear(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if sparse.bias is not None:
                linear.bias.copy_(sparse.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent_name) if parent_name else dense, child, linear)
    return dense


def mlp_density(model: nn.Module) -> float:
    """Kept fraction of the MLP weights: SparseLinear layers count their kept values, dense MLP
    linears all their weights."""
    kept = total = 0
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            kept += module.values.numel()
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Linear) and mlp_only(module, name):
            kept += module.weight.numel()
            total += module.weight.numel()
    return kept / total if total else 1.0


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, their gradients and the optimizer's state tensors, in bytes. The optimizer's
    parameters count too where they are not the model's (the float32 master weights of float16)."""
    parameters = {id(p): p for p in model.parameters()}
    for group in optimizer.param_groups:
        parameters.update((id(p), p) for p in group["params"])
    optimizer_state = [value for state in optimizer.state.values() for value in state.values()
                       if isinstance(value, Tensor)]
    parameters = list(parameters.values())
    return tensor_bytes(parameters) + tensor_bytes(p.grad for p in parameters) + tensor_bytes(optimizer_state)


def relative_error(actual: Tensor, expected: Tensor) -> Optional[float]:
    """max |actual - expected| / max |expected|, in float32; None when the output is not finite."""
    error = (actual.float() - expected.float()).abs().max().item()
    if not np.isfinite(error):
        return None
    return error / max(expected.float().abs().max().item(), torch.finfo(torch.float32).tiny)


# -------------------------------------------------------------------------------------- training
class Trainer:
    """AdamW steps on the model's own parameters: float32 and bfloat16 (whose float32-sized exponent
    holds AdamW's eps and small squared gradients)."""

    skipped_steps = 0

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    def step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Float16Trainer:
    """float16 training as it is done in practice: mixed precision with float32 master weights.

    Pure float16 AdamW diverges (its eps=1e-8 is 0 in float16 and small squared gradients underflow;
    the loss goes to nan), so the model's float16 parameters only run the forward and backward,
    AdamW updates float32 copies of them, and each step copies the result back. The loss is scaled
    up before the backward so that small float16 gradients do not flush to zero (torch's
    GradScaler: a step whose gradients overflowed is skipped and the scale halved).

    Autocast (float32 parameters cast per op) would not measure the same thing: SparseLinear's ops
    are not on autocast's lists, so the sparse MLPs would run in float32 while the dense ones ran in
    float16. Here both run their float16 kernels."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.parameters]
        self.optimizer = torch.optim.AdamW(self.masters, lr=LEARNING_RATE)
        self.scaler = torch.amp.GradScaler(device.type)
        self.steps = 0

    def step(self, loss: Tensor) -> None:
        for parameter in self.parameters:
            parameter.grad = None
        self.scaler.scale(loss).backward()
        for parameter, master in zip(self.parameters, self.masters):
            master.grad = None if parameter.grad is None else parameter.grad.float()
            parameter.grad = None  # the float32 copy is the one kept
        self.scaler.step(self.optimizer)  # unscales; skips the step when a gradient is inf or nan
        self.scaler.update()
        self.steps += 1
        with torch.no_grad():  # after a skipped step this copies back the unchanged masters
            for parameter, master in zip(self.parameters, self.masters):
                parameter.copy_(master)

    @property
    def skipped_steps(self) -> int:
        """Steps whose gradients overflowed: those AdamW did not count (its step counter is a CPU
        tensor, so reading it does not wait for the device)."""
        state = self.optimizer.state.get(self.masters[0], {})
        return self.steps - int(state["step"]) if "step" in state else self.steps


def make_trainer(model: nn.Module, device: torch.device, dtype: torch.dtype):
    return (Float16Trainer if dtype == torch.float16 else Trainer)(model, device)


# ------------------------------------------------------------------------------------- measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _held_out_loss(model: GPT, tokens: Tensor) -> float:
    model.eval()
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    model.train()
    return loss.item()


def measure_variant(
    spec: E2EModel, layout: Optional[Layout], device: torch.device, dtype: torch.dtype, steps: int, data: Tensor,
    held_out: Tensor, prompt: Tensor,
) -> E2EResult:
    """Train, check, and decode one variant; raises on failure (the caller records it)."""
    variant = DENSE if layout is None else layout_label(layout)
    model = build_model(spec, layout, device, dtype)
    trainer = make_trainer(model, device, dtype)
    data, held_out, prompt = data.to(device), held_out.to(device), prompt.to(device)
    result = E2EResult(variant, Status.OK, mlp_density=mlp_density(model),
                       stored_parameters=sum(p.numel() for p in model.parameters()))
    result.loss_initial = _held_out_loss(model, held_out)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_ms = []
    model.train()
    for step in range(steps):
        batch = data[step % data.shape[0]]
        _synchronize(device)
        start = time.perf_counter()
        _, loss = model(batch[:, :-1], batch[:, 1:])
        trainer.step(loss)
        _synchronize(device)
        if step >= WARMUP_STEPS:
            step_ms.append((time.perf_counter() - start) * 1e3)
        result.step_losses.append(loss.item())
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    result.state_bytes = state_bytes(model, trainer.optimizer)
    result.skipped_steps = trainer.skipped_steps
    result.loss_after_steps = _held_out_loss(model, held_out)

    model.eval()
    result.tolerance = MODEL_TOLERANCE[dtype]
    with torch.no_grad():
        logits = model(held_out[:, :-1])
        expected = densified_copy(model)(held_out[:, :-1])
    result.max_rel_error = relative_error(logits, expected)
    if result.max_rel_error is None or result.max_rel_error > result.tolerance:
        result.status = Status.WRONG
        result.detail = ("non-finite logits" if result.max_rel_error is None else
                         f"logits differ from the densified model by {result.max_rel_error:.2e} of their scale")
        return result  # never timed as fast

    if step_ms:
        result.train_step_ms, result.train_step_p20_ms, result.train_step_p80_ms = _median_p20_p80(step_ms)
        result.train_tokens_per_s = spec.tokens_per_step / (result.train_step_ms * 1e-3)
    prefill_ms, token_ms = time_decoding(model, prompt, spec.new_tokens, spec.decode_repeats, device)
    result.prefill_ms = float(np.median(prefill_ms))
    result.decode_token_ms, result.decode_token_p20_ms, result.decode_token_p80_ms = _median_p20_p80(token_ms)
    result.decode_tokens_per_s = spec.decode_batch / (result.decode_token_ms * 1e-3)
    return result


def _median_p20_p80(samples: Sequence[float]) -> tuple[float, float, float]:
    median, p20, p80 = np.percentile(samples, [50, 20, 80])
    return float(median), float(p20), float(p80)


def time_decoding(
    model: GPT, prompt: Tensor, new_tokens: int, repeats: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Greedy decoding on a KV cache, ``repeats`` times after one untimed run: per run, the prefill's
    milliseconds and the milliseconds per decode step, each step feeding one token per sequence
    (``new_tokens`` steps, timed together: the host may run ahead of the device between them, as it
    does in a serving loop)."""
    prefill_ms, token_ms = [], []
    for run in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        logits, cache = model.prefill(prompt)
        token = logits.argmax(dim=-1, keepdim=True)
        _synchronize(device)
        prefilled = time.perf_counter()
        for _ in range(new_tokens):
            token = model.decode_step(token, cache).argmax(dim=-1, keepdim=True)
        _synchronize(device)
        if run > 0:  # the first run is warm-up (kernel selection, first-call costs)
            prefill_ms.append((prefilled - start) * 1e3)
            token_ms.append((time.perf_counter() - prefilled) * 1e3 / new_tokens)
    return prefill_ms, token_ms


def run_e2e(
    spec: E2EModel,
    layouts: Sequence[Layout],
    device: torch.device,
    dtype: torch.dtype,
    steps: Optional[int] = None,
    progress: bool = False,
) -> list[E2EResult]:
    """Measure the dense model, then each layout; a variant that raises records its error."""
    steps = spec.steps if steps is None else steps
    vocab = spec.config.vocab_size
    corpus = markov_corpus(vocab, steps * spec.batch + spec.batch + spec.decode_batch, spec.seq_len + 1)
    data = corpus[: steps * spec.batch].view(steps, spec.batch, spec.seq_len + 1)
    held_out = corpus[steps * spec.batch : steps * spec.batch + spec.batch]
    prompt = corpus[-spec.decode_batch :, : spec.prompt_len]
    if spec.prompt_len + spec.new_tokens > spec.config.max_seq_len:
        raise ValueError(f"prompt_len + new_tokens must be <= max_seq_len={spec.config.max_seq_len} (the KV cache's "
                         f"size), got {spec.prompt_len} + {spec.new_tokens}")
    results = []
    variants = tqdm((None, *layouts), file=sys.stderr, disable=not progress, unit="model", dynamic_ncols=True)
    for layout in variants:
        variant = DENSE if layout is None else layout_label(layout)
        variants.set_postfix_str(variant)
        try:
            result = measure_variant(spec, layout, device, dtype, steps, data, held_out, prompt)
        except Exception as error:
            result = E2EResult(variant, Status.ERROR, describe_error(error))
        results.append(result)
    _derive_speedups(results)
    return results


def _derive_speedups(results: list[E2EResult]) -> None:
    dense = next((result for result in results if result.variant == DENSE and result.status is Status.OK), None)
    for result in results:
        if dense is None or result.status is not Status.OK:
            continue
        if result.train_tokens_per_s and dense.train_tokens_per_s:
            result.train_speedup = result.train_tokens_per_s / dense.train_tokens_per_s
        if result.decode_tokens_per_s and dense.decode_tokens_per_s:
            result.decode_speedup = result.decode_tokens_per_s / dense.decode_tokens_per_s


# ---------------------------------------------------------------------------------------- output
def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _rate(value: Optional[float], speedup: Optional[float]) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}"
    if speedup is not None:
        color = "green" if speedup >= 1 else "red"
        text += f" [{color}]{speedup:.2f}x[/]"
    return text


def print_e2e_table(results: Sequence[E2EResult], title: str, console: Console) -> None:
    table = Table(title=title, caption="speedups over the dense model; memory in MiB; loss on a held-out batch")
    for column in ("variant", "MLP density", "train tok/s", "decode tok/s", "peak mem", "state mem",
                   "loss before -> after", "max error", "status"):
        table.add_column(column, justify="left" if column in ("variant", "status") else "right")
    for result in results:
        status = {Status.OK: "ok", Status.WRONG: "[bold red]WRONG[/]"}.get(result.status, "[yellow]error[/]")
        loss = ("-" if result.loss_after_steps is None
                else f"{result.loss_initial:.3f} -> {result.loss_after_steps:.3f}")
        table.add_row(
            result.variant,
            "-" if result.mlp_density is None else f"{result.mlp_density:.3f}",
            _rate(result.train_tokens_per_s, result.train_speedup),
            _rate(result.decode_tokens_per_s, result.decode_speedup),
            _mib(result.peak_memory_bytes),
            _mib(result.state_bytes),
            loss,
            "-" if result.max_rel_error is None else f"{result.max_rel_error:.1e}",
            status,
        )
    console.print(table)
    for result in results:
        if result.detail:
            console.print(f"[yellow]{escape(result.variant)}:[/] {escape(result.detail)}", highlight=False)


def write_e2e_csv(path: Path, results: Sequence[E2EResult], model: str, dtype: str) -> None:
    rows = []
    for result in results:
        record = result.to_dict()
        record.pop("step_losses")
        rows.append(finite_or_none({"model": model, "dtype": dtype, **record}))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def e2e_document(
    results: Sequence[E2EResult], environment: dict[str, Any], model: str, spec: E2EModel, dtype: str, steps: int,
    argv: Sequence[str],
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "environment": environment,
        "run": {
            "suite": E2E_SUITE,
            "argv": list(argv),
            "model": model,
            "config": asdict(spec.config),
            "workload": {**{k: v for k, v in asdict(spec).items() if k != "config"}, "steps": steps,
                         "warmup_steps": WARMUP_STEPS, "learning_rate": LEARNING_RATE},
            "dtype": dtype,
        },
        "cells": [],
        "e2e": [{"model": model, "dtype": dtype, **result.to_dict()} for result in results],
    }


def run_suite(args: argparse.Namespace, argv: Sequence[str], device: torch.device, console: Console) -> int:
    """``python -m bench --suite e2e``: measure, print, write; exit 1 when a sparse variant failed."""
    ignored = [option for option in ("shapes", "m", "ops", "peers", "repeats", "warmup") if getattr(args, option)]
    if ignored:
        console.print(f"[yellow]the e2e suite ignores {', '.join('--' + option for option in ignored)}[/]")
    model = args.model or ("medium" if device.type == "cuda" else "small")
    spec = E2E_MODELS[model]
    dtypes = args.dtype or [torch.bfloat16 if device.type == "cuda" else torch.float32]
    if len(dtypes) > 1:
        console.print(f"[yellow]e2e measures one dtype: using {dtype_name(dtypes[0])}[/]")
    dtype = dtypes[0]
    layouts = args.layouts or list(DEFAULT_LAYOUTS)
    steps = args.steps or spec.steps
    if steps <= WARMUP_STEPS:
        console.print(f"[yellow]--steps {steps}: no timed step (the first {WARMUP_STEPS} are warm-up)[/]")
    environment = collect_environment(device)
    results = run_e2e(spec, layouts, device, dtype, steps, progress=not args.no_progress)
    config = spec.config
    title = (f"e2e: GPT d_model={config.d_model} layers={config.n_layers}, {dtype_name(dtype)}, batch {spec.batch}x"
             f"{spec.seq_len}, {steps} steps; decode {spec.decode_batch}x{spec.new_tokens} tokens")
    print_e2e_table(results, title, console)
    if warning := busy_machine_warning(environment):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    document = e2e_document(results, environment, model, spec, dtype_name(dtype), steps, argv)
    (args.out / JSON_NAME).write_text(results_json(document))
    write_e2e_csv(args.out / CSV_NAME, results, model, dtype_name(dtype))
    console.print(f"wrote {args.out / JSON_NAME} and {args.out / CSV_NAME}", highlight=False)
    if not args.no_plots:
        (path,) = write_plots(document, args.out)
        console.print(f"wrote {path}", highlight=False)
    if args.save:
        save_to_results(args.out / JSON_NAME, results_file_stem(environment, E2E_SUITE), not args.no_plots, console)
    failed = [result for result in results if result.variant != DENSE and result.status is not Status.OK]
    return 1 if failed else 0
