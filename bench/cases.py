"""One benchmark cell, and the text forms of its parts.

A cell is (weight shape, layout, dtype, M, op): everything that decides what is computed, nothing
about who computes it, so that every implementation is measured on the same cells. Labels such as
``b64d0.1``, ``2:4``, ``4096x4096`` and ``bfloat16`` are both what the command line accepts and
what the table and result files show, so a cell read from ``results.json`` can be asked for again.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

import torch

from sparsekernels import NM, BlockSparse
from sparsekernels.layouts import Layout


class Op(str, Enum):
    """What a cell computes, with ``W`` the masked ``[out, in]`` weight and ``x`` the ``[M, in]`` input."""

    FORWARD = "forward"  # y = x @ W.T
    GRAD_INPUT = "grad_input"  # dx = dy @ W
    GRAD_WEIGHT = "grad_weight"  # dW = dy.T @ x, on the kept weights
    TRAIN_STEP = "train_step"  # forward, then dx and dW through autograd


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

_BLOCK_LABEL = re.compile(r"^b(\d+)d(\d*\.?\d+)$")
_NM_LABEL = re.compile(r"^(\d+):(\d+)(T?)$")
_SHAPE_LABEL = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Case:
    """One cell: ``op`` for a ``[out_features, in_features]`` weight in ``layout`` and M = ``rows``."""

    out_features: int
    in_features: int
    layout: Layout
    dtype: torch.dtype
    rows: int  # M: rows of the input (tokens in a batch)
    op: Op

    @property
    def weight_key(self) -> tuple[int, int, Layout, torch.dtype]:
        """Cells with equal keys share one pruned weight (built once by the runner)."""
        return self.out_features, self.in_features, self.layout, self.dtype

    @property
    def shape_label(self) -> str:
        return f"{self.out_features}x{self.in_features}"

    @property
    def weight_label(self) -> str:
        return f"{self.shape_label} {layout_label(self.layout)} {dtype_name(self.dtype)}"


def layout_label(layout: Layout) -> str:
    """``b64d0.1`` for BlockSparse(64, 0.1), ``2:4`` for NM(2, 4), ``2:4T`` for NM(2, 4, transposable=True)."""
    if isinstance(layout, BlockSparse):
        return f"b{layout.block_size}d{layout.density:g}"
    return f"{layout.n}:{layout.m}{'T' if layout.transposable else ''}"


def parse_layout(text: str) -> Layout:
    """Inverse of :func:`layout_label`; raises ValueError on anything else."""
    text = text.strip()
    if match := _BLOCK_LABEL.match(text):
        return BlockSparse(int(match[1]), float(match[2]))
    if match := _NM_LABEL.match(text):
        return NM(int(match[1]), int(match[2]), transposable=bool(match[3]))
    raise ValueError(
        f"layout {text!r} is neither b<block>d<density> (e.g. b64d0.1) nor n:m (e.g. 2:4; 2:4T for a "
        "transposable mask)"
    )


def parse_shape(text: str) -> tuple[int, int]:
    """``4096x14336`` -> (out_features, in_features) = (4096, 14336)."""
    match = _SHAPE_LABEL.match(text.strip())
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise ValueError(f"shape {text!r} is not <out_features>x<in_features> (e.g. 4096x4096)")
    return int(match[1]), int(match[2])


def parse_dtype(text: str) -> torch.dtype:
    name = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise ValueError(f"dtype {text!r} is not one of {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_fits(layout: Layout, out_features: int, in_features: int) -> bool:
    try:
        layout.check_shape(out_features, in_features)
    except ValueError:
        return False
    return True


def build_cases(
    shapes: Iterable[tuple[int, int]],
    layouts: Iterable[Layout],
    dtypes: Iterable[torch.dtype],
    rows: Iterable[int],
    ops: Iterable[Op],
) -> tuple[list[Case], list[str]]:
    """Every cell of the grid, ordered shape, dtype, layout, M, op (cells sharing a weight are
    adjacent), and a description of each (shape, layout) pair dropped because it does not fit.
    Repeated values of an axis count once, compared after parsing (``fp32`` is ``float32``,
    ``b16d0.50`` is ``b16d0.5``), so that no cell is measured twice."""
    shapes, layouts, dtypes, rows, ops = (list(dict.fromkeys(axis)) for axis in (shapes, layouts, dtypes, rows, ops))
    misfits = [
        f"{out_features}x{in_features} {layout_label(layout)}"
        for (out_features, in_features), layout in itertools.product(shapes, layouts)
        if not layout_fits(layout, out_features, in_features)
    ]
    cases = [
        Case(out_features, in_features, layout, dtype, row_count, op)
        for (out_features, in_features), dtype, layout, row_count, op in itertools.product(
            shapes, dtypes, layouts, rows, ops
        )
        if layout_fits(layout, out_features, in_features)
    ]
    return cases, misfits
