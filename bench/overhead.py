"""Host overhead of one ``SparseLinear.forward`` at decode batch sizes: ``python -m bench overhead``.

    python -m bench overhead [--device cpu|cuda] [--shapes 4096x4096] [--layouts b64d0.1,2:4]
                             [--m 1,16] [--dtype bfloat16] [--out DIR]

Issue 4 bounds what an eager call may cost beyond its kernel (15 µs at small M; torch's BSR path
costs about 220 µs per call). For each cell this measures, in inference (``torch.no_grad``):

* ``eager_us``: wall time per call over a batch of back-to-back calls ended by one synchronize: at
  small M the GPU finishes each kernel before the host issues the next call, so this is the host
  cost per call, or the kernel time if that is longer;
* ``kernel_us`` (CUDA): the same call replayed from a CUDA graph, which removes the host;
* ``overhead_us = eager_us - kernel_us``, the figure the budget is about;

for SparseLinear (the eager fast path of sparsekernels/triton/eager.py where it applies), the same
layer with the fast path switched off (``SPARSEKERNELS_EAGER_FAST_PATH=0``: the op path), dense
``nn.Linear``, and torch's BSR (``to_sparse_bsr`` + ``F.linear``) for block layouts. On CPU there is
no kernel time: ``eager_us`` is the whole call. Results go to the terminal and ``overhead.json``.

``--host-only`` measures the host's own Python work per call on any machine, no GPU needed: the
Triton backend's forward launchers run with their kernel launches replaced by a no-op (on CPU the
kernels are defined for the interpreter, and never run), for SparseLinear's fast path and op path,
each also with grad mode on (the forward of training: the weights require grad).
What it leaves out is the launch itself (``_common.launch``, about 2 µs, and Triton's launcher);
the outputs are left unwritten. A tuner of its own that never measures stands in meanwhile
(heuristic configurations, the sparse path), so nothing is tuned on stubs or stored. It tracks
host-cost regressions between GPU visits; the budget is judged on the GPU host with the launch
included.
"""

from __future__ import annotations

import argparse
import json
import importlib
import os
import tempfile
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

import sparsekernels
import sparsekernels.triton
from sparsekernels import BlockSparse, SparseLinear

from .cases import dtype_name, layout_label, parse_dtype, parse_layout, parse_shape
from .environment import collect_environment
from .errors import describe_error
from .report import wide_console
from .timing import TimingConfig, _wall_clock_samples

JSON_NAME = "overhead.json"
DEFAULTS = {"shapes": [(4096, 4096)], "layouts": ["b64d0.1", "2:4"], "m": [1, 16]}
TIMING = TimingConfig(warmup=20, repeats=15, budget_s=1.0)


def _median_us(samples_ms: Sequence[float]) -> float:
    return float(np.median(samples_ms)) * 1e3


def _eager_us(fn: Callable[[], object], device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _median_us(_wall_clock_samples(fn, TIMING, synchronize))


def _kernel_us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench_cudagraph

    return _median_us(do_bench_cudagraph(fn, rep=20, return_mode="all"))


def _fast_path_off(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        previous = os.environ.get("SPARSEKERNELS_EAGER_FAST_PATH")
        os.environ["SPARSEKERNELS_EAGER_FAST_PATH"] = "0"
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["SPARSEKERNELS_EAGER_FAST_PATH"]
            else:
                os.environ["SPARSEKERNELS_EAGER_FAST_PATH"] = previous

    return run


def _contenders(layer: SparseLinear, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    dense_weight = layer.dense_weight()
    contenders = {
        "SparseLinear": lambda: layer(x),
        "SparseLinear (op path)": _fast_path_off(lambda: layer(x)),
        "dense nn.Linear": lambda: F.linear(x, dense_weight, layer.bias),
    }
    if isinstance(layer.layout, BlockSparse):
        try:
            with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                bsr = dense_weight.to_sparse_bsr((layer.layout.block_size,) * 2)
            contenders["torch BSR"] = lambda: F.linear(x, bsr, layer.bias)
        except Exception:  # no BSR conversion for this dtype/device: the row says so below
            contenders["torch BSR"] = None
    return contenders


# The launchers a SparseLinear inference forward reaches (each imports ``launch`` by name).
FORWARD_LAUNCHERS = ("bsr_forward", "nm_forward", "nm_forward_small_m")


@contextmanager
def launches_stubbed():
    """Kernel launches of the Triton forward launchers replaced by a no-op (``--host-only``)."""
    with ExitStack() as stack:
        for name in FORWARD_LAUNCHERS:
            module = importlib.import_module(f"sparsekernels.triton.{name}")
            stack.enter_context(mock.patch.object(module, "launch", lambda kernel, grid, *args, **kwargs: None))
        yield


def _grad_enabled(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with grad mode on (the layer's weights require grad): the forward of training, or of an
    eval() model called without no_grad; the graph is dropped with the output."""
    def run() -> object:
        with torch.enable_grad():
            return fn()

    return run


def _host_only_contenders(layer: SparseLinear, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {"SparseLinear (host only)": lambda: layer(x),
            "SparseLinear (op path, host only)": _fast_path_off(lambda: layer(x)),
            "SparseLinear (grad enabled, host only)": _grad_enabled(lambda: layer(x)),
            "SparseLinear (grad enabled, op path, host only)": _grad_enabled(_fast_path_off(lambda: layer(x)))}


def measure_cell(shape: tuple[int, int], layout, rows: int, dtype: torch.dtype, device: torch.device,
                 host_only: bool = False) -> list[dict]:
    out_features, in_features = shape
    torch.manual_seed(0)
    layer = SparseLinear(in_features, out_features, layout, dtype=dtype, device=device).eval()
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    cell = {"shape": f"{out_features}x{in_features}", "layout": layout_label(layout), "M": rows,
            "dtype": dtype_name(dtype)}
    rows_out = []
    contenders = _host_only_contenders(layer, x) if host_only else _contenders(layer, x)
    with torch.no_grad(), (launches_stubbed() if host_only else ExitStack()):
        for name, fn in contenders.items():
            row = {**cell, "implementation": name, "eager_us": None, "kernel_us": None, "overhead_us": None,
                   "error": None}
            try:
                if fn is None:
                    raise RuntimeError("torch cannot convert this weight to BSR here")
                row["eager_us"] = _eager_us(fn, device)
                if device.type == "cuda" and not host_only:
                    row["kernel_us"] = _kernel_us(fn)
                    row["overhead_us"] = max(row["eager_us"] - row["kernel_us"], 0.0)
            except Exception as error:  # a contender that cannot run records why
                row["error"] = describe_error(error)
            rows_out.append(row)
    return rows_out


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def print_rows(rows: list[dict], environment: dict, console) -> None:
    where = (environment.get("gpu") or {}).get("name") if environment["device"] == "cuda" else environment["cpu_model"]
    what = "host Python work (kernel launches stubbed out)" if environment.get("host_only") else "eager call cost"
    table = Table(title=f"{what} on {where}, backend {environment['sparsekernels_backend']} "
                  "(µs per call, no_grad unless grad enabled)")
    for column in ("shape", "layout", "M", "dtype", "implementation", "eager", "kernel", "overhead", "error"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["shape"], row["layout"], str(row["M"]), row["dtype"], row["implementation"],
                      _fmt(row["eager_us"]), _fmt(row["kernel_us"]), _fmt(row["overhead_us"]), row["error"] or "")
    console.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=lambda text: [parse_shape(part) for part in text.split(",")])
    parser.add_argument("--layouts", type=lambda text: [parse_layout(part) for part in text.split(",")])
    parser.add_argument("--m", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--dtype", type=lambda text: [parse_dtype(part) for part in text.split(",")])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--host-only", action="store_true",
                        help="the host's Python work per call on the Triton backend, kernel launches stubbed out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if not args.host_only:
        return _run(args, device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels defined for the interpreter, never run
    reason = sparsekernels.triton.unavailable_reason()
    if reason is not None:
        parser.error(f"--host-only needs the Triton backend: {reason}")
    from sparsekernels.triton import autotune

    previous_backend, previous_tuner = sparsekernels.get_backend(), autotune.tuner
    # A tuner of its own that never measures: timing stubbed launches would store meaningless
    # configurations and dense-fallback decisions, in memory and in the tuning cache file.
    with tempfile.TemporaryDirectory() as scratch:
        autotune.tuner = autotune.Tuner(path=Path(scratch) / "tune.json", measurable=lambda device, tensors: False)
        sparsekernels.set_backend("triton")
        try:
            return _run(args, device)
        finally:
            sparsekernels.set_backend(previous_backend)
            autotune.tuner = previous_tuner


def _run(args, device: torch.device) -> int:
    shapes = args.shapes or DEFAULTS["shapes"]
    layouts = args.layouts or [parse_layout(text) for text in DEFAULTS["layouts"]]
    dtypes = args.dtype or [torch.bfloat16 if device.type == "cuda" else torch.float32]
    environment = collect_environment(device)
    rows = [row for shape in shapes for layout in layouts for m in (args.m or DEFAULTS["m"]) for dtype in dtypes
            for row in measure_cell(shape, layout, m, dtype, device, host_only=args.host_only)]
    environment["host_only"] = args.host_only
    console = wide_console()
    print_rows(rows, environment, console)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / JSON_NAME
    path.write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))
    console.print(f"wrote {path}", highlight=False)
    return 1 if any(row["error"] for row in rows if row["implementation"].startswith("SparseLinear")) else 0
