"""The tensors of a cell: a pruned weight (sparse and masked dense) and the inputs.

A random dense weight is pruned by magnitude into the layout with sparsekernels' own ``from_dense``
(a transposable N:M layout with ``pruning.transposable_nm_mask``, as ``SparseLinear.from_dense`` does);
its masked dense form is what the dense baseline and the peers start from, so every implementation
multiplies by exactly the same numbers. Random values are drawn from generators seeded by the cell's
label, so two runs (say, before and after a change, for ``bench compare``) see identical tensors.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from sparsekernels import BlockSparse, BlockSparseMatrix, NMMatrix
from sparsekernels.layouts import Layout
from sparsekernels.pruning import magnitude_scores, transposable_nm_mask

from .cases import dtype_name, layout_label


@dataclass
class SparseWeight:
    """One pruned ``[out_features, in_features]`` weight in the forms the implementations need."""

    layout: Layout
    matrix: Union[BlockSparseMatrix, NMMatrix]  # sparsekernels' format
    masked_dense: Tensor  # pruned weights set to zero, in the cell's dtype
    mask: Tensor  # bool [out_features, in_features]: True where a weight is kept

    @property
    def out_features(self) -> int:
        return self.masked_dense.shape[0]

    @property
    def in_features(self) -> int:
        return self.masked_dense.shape[1]

    @property
    def kept_weights(self) -> int:
        return self.matrix.values.numel()

    @property
    def value_bytes(self) -> int:
        return self.matrix.values.numel() * self.matrix.values.element_size()

    @property
    def index_bytes(self) -> int:
        """Bytes of the pattern: the BSR and CSC index tensors, or the packed N:M positions."""
        if isinstance(self.matrix, BlockSparseMatrix):
            return sum(tensor.numel() * tensor.element_size() for tensor in self.matrix.index_tensors())
        return self.matrix.positions.numel() * self.matrix.positions.element_size()


@dataclass
class Inputs:
    x: Tensor  # [M, in_features]
    grad_output: Tensor  # [M, out_features]


def _generator(device: torch.device, label: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(label.encode()))


def build_weight(
    out_features: int, in_features: int, layout: Layout, dtype: torch.dtype, device: torch.device
) -> SparseWeight:
    """A random weight with nn.Linear's scale (std 1/sqrt(in)), pruned by magnitude into ``layout``."""
    label = f"weight {out_features}x{in_features} {layout_label(layout)} {dtype_name(dtype)}"
    dense = torch.randn(out_features, in_features, device=device, generator=_generator(device, label))
    dense = (dense / math.sqrt(in_features)).to(dtype)
    if isinstance(layout, BlockSparse):
        matrix = BlockSparseMatrix.from_dense(dense, layout.block_size, layout.density)
    elif layout.transposable:
        mask = transposable_nm_mask(magnitude_scores(dense), layout.n, layout.m)
        matrix = NMMatrix.from_dense(dense, layout.n, layout.m, mask=mask)
    else:
        matrix = NMMatrix.from_dense(dense, layout.n, layout.m)
    return SparseWeight(layout, matrix, matrix.to_dense(), matrix.mask())


def build_inputs(weight: SparseWeight, rows: int) -> Inputs:
    """Standard normal ``x`` and ``grad_output`` with ``rows`` rows, in the weight's dtype."""
    device, dtype = weight.masked_dense.device, weight.masked_dense.dtype
    generator = _generator(device, f"inputs {weight.out_features}x{weight.in_features} M={rows}")
    x = torch.randn(rows, weight.in_features, device=device, generator=generator).to(dtype)
    grad_output = torch.randn(rows, weight.out_features, device=device, generator=generator).to(dtype)
    return Inputs(x, grad_output)
