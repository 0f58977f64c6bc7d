"""Train the small GPT of bench/gpt.py dense and sparse, and compare loss curves and step times.

    python examples/train_sparse_gpt.py --out loss_curves.png            # default: a few minutes on CPU
    python examples/train_sparse_gpt.py --steps 60 --d-model 128 --out /tmp/small.png

Runs (MLP linears only, ``bench.gpt.mlp_only``; attention stays dense):

* ``dense``            nn.Linear everywhere
* ``block-static``     BlockSparse(32, 0.1), fixed random pattern from the magnitude of the init
* ``block-gradual``    BlockSparse(32, 1.0) pruned to 0.1 on the cubic schedule (GradualPruner)
* ``block-rigl``       BlockSparse(32, 0.1) with RigL drop-and-grow
* ``nm-static``        2:4, fixed pattern
* ``nm-rigl``          2:4 with RigL (per-position drop-and-grow inside groups)
* ``nm-srste``         2:4 by SR-STE (dense weights, mask recomputed each step), then finalised

The data is generated here from a seed: a byte-level corpus of sentences from a small grammar plus
arithmetic facts, so that there is structure to learn and nothing to download. The held-out loss is
measured on text from a different seed. Step times (wall and CPU time of this process) are medians
after 3 warm-up steps; on a shared machine, run with ``--threads 1`` and compare the CPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparsekernels as sk  # noqa: E402
from bench.gpt import GPT, GPTConfig, mlp_only  # noqa: E402
from sparsekernels.training import GradualPruner, RigL, finalize_ste_, sparsify_ste_  # noqa: E402

RUNS = ("dense", "block-static", "block-gradual", "block-rigl", "nm-static", "nm-rigl", "nm-srste")

_NOUNS = ["cat", "dog", "bird", "robot", "kernel", "matrix", "river", "teacher", "engine", "garden"]
_ADJECTIVES = ["small", "sparse", "quick", "red", "quiet", "dense", "old", "bright"]
_VERBS = ["sees", "likes", "moves", "builds", "follows", "prunes", "finds", "trains"]


def synthetic_corpus(n_bytes: int, seed: int) -> bytes:
    """Sentences ``the <adj> <noun> <verb> the <noun>.`` and facts ``a+b=c;`` from a seeded generator."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        if rng.random() < 0.7:
            text = (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                    f"the {rng.choice(_NOUNS)}. ")
        else:
            a, b = rng.randrange(100), rng.randrange(100)
            text = f"{a}+{b}={a + b}; "
        parts.append(text)
        size += len(text)
    return "".join(parts).encode()[:n_bytes]


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        chunk = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def build(run: str, config: GPTConfig, steps: int, lr: float):
    torch.manual_seed(0)  # the same initial dense weights for every run
    model = GPT(config)
    hooks = []
    if run.startswith("block-"):
        density = 1.0 if run == "block-gradual" else 0.1
        sk.sparsify_(model, sk.BlockSparse(32, density), filter_fn=mlp_only)
    elif run in ("nm-static", "nm-rigl"):
        sk.sparsify_(model, sk.NM(2, 4), filter_fn=mlp_only)
    elif run == "nm-srste":
        sparsify_ste_(model, 2, 4, filter_fn=mlp_only)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if run == "block-gradual":
        every = max(1, steps // 20)
        hooks.append(GradualPruner(model, 0.1, start_step=every, end_step=max(2 * every, int(0.6 * steps)),
                                   every=every, optimizer=optimizer))
    elif run.endswith("-rigl"):
        hooks.append(RigL(model, optimizer, update_every=max(1, steps // 20), drop_fraction=0.3,
                          end_step=max(2, int(0.75 * steps))))
    return model, optimizer, hooks


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, seq: int, n_batches: int) -> float:
    model.eval()
    stream = batches(data, batch, seq, seed=1234)
    losses = [model(*next(stream))[1].item() for _ in range(n_batches)]
    model.train()
    return sum(losses) / len(losses)


def train(run: str, args, train_data, val_data, config) -> dict:
    model, optimizer, hooks = build(run, config, args.steps, args.lr)
    stream = batches(train_data, args.batch, args.seq, seed=0)
    losses, times, cpu_times = [], [], []
    for step in range(args.steps):
        tokens, targets = next(stream)
        start, cpu_start = time.perf_counter(), time.process_time()
        _, loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for hook in hooks:
            hook.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"  {run:14s} step {step:5d}  loss {loss.item():.4f}  {1000 * times[-1]:7.1f} ms", flush=True)
    if run == "nm-srste":
        finalize_ste_(model)  # evaluate the exported 2:4 SparseLinear model, not the dense weights
    mlp_density = [m.density for m in model.modules() if isinstance(m, sk.SparseLinear)]
    return {
        "run": run,
        "losses": losses,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_loss": evaluate(model, val_data, args.batch, args.seq, args.eval_batches),
        "median_step_ms": 1000 * statistics.median(times[3:] if len(times) > 5 else times),
        # CPU seconds of this process per step: with --threads 1 this is the compute a step takes,
        # much less disturbed than wall time when other jobs share the cores.
        "median_step_cpu_ms": 1000 * statistics.median(cpu_times[3:] if len(cpu_times) > 5 else cpu_times),
        "mlp_density": sum(mlp_density) / len(mlp_density) if mlp_density else 1.0,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for result in results:
        losses = torch.tensor(result["losses"])
        window = max(1, len(losses) // 25)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        label = f"{result['run']} (val {result['val_loss']:.3f}, {result['median_step_cpu_ms']:.0f} CPU ms/step)"
        axis.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (moving average)")
    axis.set_title("Small GPT on a synthetic byte corpus: dense vs sparse MLPs")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the loss-curve PNG")
    parser.add_argument("--json", help="also write the results (losses, times) as JSON here")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=256, help="multiple of 128 (block 32 and 2:4 both fit)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=16, help="held-out batches for the validation loss")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {RUNS}")
    if args.d_model % 128:
        parser.error("--d-model must be a multiple of 128")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPTConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       max_seq_len=args.seq)
    train_data = torch.tensor(list(synthetic_corpus(400_000, seed=0)), dtype=torch.long)
    val_data = torch.tensor(list(synthetic_corpus(50_000, seed=1)), dtype=torch.long)
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {args.steps} steps, d_model={args.d_model}, "
          f"layers={args.layers}, batch={args.batch}x{args.seq}")
    results = []
    for run in runs:
        results.append(train(run, args, train_data, val_data, config))
    print(f"\n{'run':14s} {'MLP density':>11s} {'train loss':>10s} {'val loss':>9s} {'ms/step':>8s} "
          f"{'CPU ms/step':>11s}")
    for result in results:
        print(f"{result['run']:14s} {result['mlp_density']:11.3f} {result['final_train_loss']:10.4f} "
              f"{result['val_loss']:9.4f} {result['median_step_ms']:8.1f} {result['median_step_cpu_ms']:11.1f}")
    plot(results, args.out)
    print(f"loss curves: {args.out}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
