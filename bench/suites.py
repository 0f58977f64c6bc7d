"""The named benchmark suites: which cells each one measures on each device, and how long it times.

* ``quick`` (``make bench``): the cells the README quotes, in under two minutes on a 2-core CPU or
  one GPU. On CPU: 4096x4096, b64 d0.1 / b64 d0.5 / 2:4, M in {1, 16, 256}, float32 and bfloat16,
  forward. On CUDA: 14336x4096, the same layouts, M in {16, 2048, 8192}, bfloat16, forward.
* ``full``: the LLM projection shapes, every block size and density, every N:M pattern, all three
  dtypes and all four ops (forward, input grad, weight grad, training step). Hours, not minutes.
  2:4 appears twice: ``2:4`` and ``2:4T``, a transposable mask, whose input gradient (and so training
  step) runs the N:M forward on W.T: the Triton N:M kernel in the ``sparsekernels[triton]`` column,
  the CUTLASS 2:4 sparse tensor core GEMM only in ``sparsekernels[cuda]`` (issue 5's target: the
  2:4T train_step cell at M=8192).
* ``targets``: exactly the cells of the performance tables of issues 4 and 5 (14336x4096 bfloat16,
  and 4096x4096 at M in {1, 128, 2048}), each with the speedup over dense it must reach; the run
  prints a second table with the measured ratio, the target and met / missed (:mod:`bench.targets`).
  Not a product of axes: ``--shapes``, ``--dtype`` and ``--m`` replace that part of every cell (to
  run it small), ``--layouts`` and ``--ops`` keep the cells that have one of them.

Each command-line axis (--shapes, --layouts, --dtype, --m, --ops, --repeats, --warmup) overrides the
suite's value, so a suite is a starting point rather than a fixed list.

Adding a suite means adding a function ``(device) -> Grid`` to ``SUITES``; the command line offers
every name found there. The ``e2e`` suite (whole models made sparse with ``sparsekernels.sparsify_``)
is not a grid of (shape, layout, M, op) cells: it lives in :mod:`bench.e2e` with its own runner, and
the command line dispatches to it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sparsekernels import NM, BlockSparse
from sparsekernels.layouts import Layout

from .cases import Op
from .targets import TARGET_CELLS, TargetCell
from .timing import TimingConfig

LLM_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 28672), (28672, 8192), (5120, 13824))
QUICK_LAYOUTS = (BlockSparse(64, 0.1), BlockSparse(64, 0.5), NM(2, 4))


@dataclass(frozen=True)
class Grid:
    """The axes of a suite (their product is its cells) and its timing settings."""

    shapes: tuple[tuple[int, int], ...]
    layouts: tuple[Layout, ...]
    dtypes: tuple[torch.dtype, ...]
    rows: tuple[int, ...]  # values of M
    ops: tuple[Op, ...]
    timing: TimingConfig
    cells: tuple[TargetCell, ...] = ()  # when given, the cells themselves (the axes only describe them)


def quick(device: str) -> Grid:
    if device == "cuda":
        return Grid(
            shapes=((14336, 4096),),
            layouts=QUICK_LAYOUTS,
            dtypes=(torch.bfloat16,),
            rows=(16, 2048, 8192),
            ops=(Op.FORWARD,),
            timing=TimingConfig(warmup=3, repeats=20, budget_s=0.5),
        )
    return Grid(
        shapes=((4096, 4096),),
        layouts=QUICK_LAYOUTS,
        dtypes=(torch.float32, torch.bfloat16),
        rows=(1, 16, 256),
        ops=(Op.FORWARD,),
        timing=TimingConfig(warmup=1, repeats=10, budget_s=0.75),
    )


def full(device: str) -> Grid:
    return Grid(
        shapes=LLM_SHAPES,
        layouts=tuple(
            BlockSparse(block_size, density)
            for block_size in (16, 32, 64, 128)
            for density in (0.05, 0.1, 0.25, 0.5)
        )
        + (NM(2, 4), NM(2, 4, transposable=True), NM(1, 4), NM(2, 8), NM(4, 8)),
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        rows=(1, 16, 128, 2048, 8192),
        ops=tuple(Op),
        timing=TimingConfig(warmup=3, repeats=30, budget_s=2.0),
    )


def targets(device: str) -> Grid:
    cells = TARGET_CELLS

    def axis(values):
        return tuple(dict.fromkeys(values))

    return Grid(
        shapes=axis(cell.shape for cell in cells),
        layouts=axis(cell.layout for cell in cells),
        dtypes=axis(cell.dtype for cell in cells),
        rows=axis(cell.rows for cell in cells),
        ops=axis(cell.op for cell in cells),
        timing=quick(device).timing,
        cells=cells,
    )


SUITES: dict[str, Callable[[str], Grid]] = {"quick": quick, "full": full, "targets": targets}
