"""Block-sparse matrix format (square blocks of 16, 32, 64 or 128).

Storage, shared by every backend (see csrc/cpu/bsr.h for the kernels' view of it):

* ``values[nnz, b, b]``: the kept blocks, each contiguous and row-major (rows are output features).
  Blocks are ordered block row by block row, by block column inside a row.
* BSR index: ``block_row_offsets[n_block_rows + 1]`` and ``block_col_indices[nnz]``.
* Transposed (CSC) index, built once when the pattern is set: ``block_col_offsets[n_block_cols + 1]``,
  ``block_row_indices[nnz]`` (block row of each entry, column by column) and
  ``block_value_indices[nnz]`` (where that block lives in ``values``). The input gradient walks
  block columns through it without ever copying a transposed weight.

All five index tensors share one dtype: int32 where every index and offset fits, else int64.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..layouts import BLOCK_SIZES
from ..ops._checks import check_index_dtype, check_index_tensors
from ._common import (
    FLOAT_DTYPES,
    check_block_size,
    check_dense_weight,
    check_density,
    check_mask,
    check_shape_pair,
    index_dtype_for,
    is_meta,
)

__all__ = ["BlockSparseMatrix", "build_transposed_index", "validate_bsr_index", "validate_transposed_index"]


def _offsets_from_counts(counts: Tensor, dtype: torch.dtype) -> Tensor:
    offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets.to(dtype)


def build_transposed_index(
    block_row_offsets: Tensor, block_col_indices: Tensor, n_block_cols: int
) -> tuple[Tensor, Tensor, Tensor]:
    """CSC index ``(block_col_offsets, block_row_indices, block_value_indices)`` of a BSR pattern.

    On the meta device (no data) it is three meta tensors of the right shapes and dtype."""
    dtype, device = block_row_offsets.dtype, block_row_offsets.device
    n_block_rows = block_row_offsets.shape[0] - 1
    nnz = block_col_indices.shape[0]
    if is_meta(block_row_offsets):
        return tuple(torch.empty(size, dtype=dtype, device=device) for size in (n_block_cols + 1, nnz, nnz))
    counts = (block_row_offsets[1:] - block_row_offsets[:-1]).to(torch.int64)
    block_rows = torch.repeat_interleave(torch.arange(n_block_rows, device=device), counts, output_size=nnz)
    block_cols = block_col_indices.to(torch.int64)
    # Stable sort by column keeps rows ascending inside each column (BSR order is row-major).
    order = torch.argsort(block_cols, stable=True)
    col_counts = torch.bincount(block_cols, minlength=n_block_cols)
    return (
        _offsets_from_counts(col_counts, dtype),
        block_rows[order].to(dtype),
        order.to(dtype),
    )


def validate_transposed_index(
    block_row_offsets: Tensor,
    block_col_indices: Tensor,
    block_col_offsets: Tensor,
    block_row_indices: Tensor,
    block_value_indices: Tensor,
    n_block_cols: int,
) -> None:
    """Raise unless the CSC index is exactly the one built from the (already valid) BSR index.

    The CSC index is a function of the BSR pattern, so rebuilding it and comparing is the complete
    check (O(nnz log nnz), once when a pattern is set): any corrupted entry would otherwise make the
    input gradient silently wrong.
    """
    given = {
        "block_col_offsets": block_col_offsets,
        "block_row_indices": block_row_indices,
        "block_value_indices": block_value_indices,
    }
    # The BSR index is validated before this is called; still, a non-tensor gets a TypeError naming it.
    check_index_dtype("block_row_offsets", block_row_offsets)
    check_index_dtype("block_col_indices", block_col_indices)
    check_index_tensors(given.items(), block_row_offsets.dtype, block_row_offsets.device, "block_row_offsets")
    expected = build_transposed_index(block_row_offsets, block_col_indices, n_block_cols)
    for (name, tensor), rebuilt in zip(given.items(), expected):
        if tensor.shape != rebuilt.shape:
            raise ValueError(f"{name} must have {rebuilt.shape[0]} entries, got {tensor.shape[0]}")
        if is_meta(tensor):  # no data: the shapes are all there is to check
            continue
        if not torch.equal(tensor, rebuilt):
            raise ValueError(f"{name} is inconsistent with the BSR index (block_row_offsets, block_col_indices)")


def validate_bsr_index(
    block_row_offsets: Tensor,
    block_col_indices: Tensor,
    n_block_rows: int,
    n_block_cols: int,
    nnz: int,
) -> None:
    """Raise ValueError unless the BSR index describes a valid pattern of ``nnz`` blocks.

    Checked once when a pattern is set: offsets start at 0, end at nnz and never decrease; column
    indices are in range and strictly increasing inside each block row (so no block is duplicated).
    The metadata checks are the ops' (ops/_checks.py); the lengths are checked against the block
    counts the caller expects, where the ops can only derive them. Meta tensors have no contents:
    only their metadata is checked.
    """
    for name, tensor in (("block_row_offsets", block_row_offsets), ("block_col_indices", block_col_indices)):
        check_index_dtype(name, tensor)
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    if block_row_offsets.shape[0] != n_block_rows + 1:
        raise ValueError(
            f"block_row_offsets must have n_block_rows + 1 = {n_block_rows + 1} entries, "
            f"got {block_row_offsets.shape[0]}"
        )
    if block_col_indices.shape[0] != nnz:
        raise ValueError(f"block_col_indices must have nnz = {nnz} entries, got {block_col_indices.shape[0]}")
    check_index_tensors(
        (("block_col_indices", block_col_indices),),
        block_row_offsets.dtype, block_row_offsets.device, "block_row_offsets",
    )
    if is_meta(block_row_offsets):
        return
    offsets = block_row_offsets.to(torch.int64)
    if int(offsets[0]) != 0 or int(offsets[-1]) != nnz:
        raise ValueError(
            f"block_row_offsets must start at 0 and end at nnz = {nnz}, "
            f"got {int(offsets[0])} and {int(offsets[-1])}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("block_row_offsets must be non-decreasing")
    if nnz == 0:
        return
    cols = block_col_indices.to(torch.int64)
    if bool((cols < 0).any()) or bool((cols >= n_block_cols).any()):
        raise ValueError(f"block_col_indices must be in [0, n_block_cols = {n_block_cols})")
    # Inside a row, each column must exceed the previous one; at a row start there is no previous.
    row_starts = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
    row_starts[offsets[:-1][offsets[:-1] < nnz]] = True
    increasing = torch.ones(nnz, dtype=torch.bool, device=cols.device)
    increasing[1:] = cols[1:] > cols[:-1]
    if not bool((increasing | row_starts).all()):
        raise ValueError("block_col_indices must be strictly increasing within each block row (sorted, no duplicates)")


class BlockSparseMatrix:
    """A block-sparse ``[out_features, in_features]`` weight: kept blocks plus BSR and CSC indexes.

    Build one with :meth:`from_dense` (magnitude pruning or an explicit mask) or :meth:`random`;
    :meth:`to_dense` gives the masked dense weight back. The tensors are plain attributes, so that
    ops and ``SparseLinear`` can pass them to kernels as they are.
    """

    def __init__(
        self,
        values: Tensor,
        block_row_offsets: Tensor,
        block_col_indices: Tensor,
        shape: tuple[int, int],
        *,
        block_col_offsets: Optional[Tensor] = None,
        block_row_indices: Optional[Tensor] = None,
        block_value_indices: Optional[Tensor] = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        try:
            out_features, in_features = (operator.index(size) for size in shape)
        except (TypeError, ValueError):
            raise TypeError(f"shape must be two ints (out_features, in_features), got {shape!r}") from None
        if values.dim() != 3 or values.shape[1] != values.shape[2]:
            raise ValueError(f"values must have shape [nnz, block_size, block_size], got {tuple(values.shape)}")
        block_size = values.shape[1]
        if validate:
            _validate_values_and_bsr(values, block_row_offsets, block_col_indices, out_features, in_features)
        self.values = values
        self.block_row_offsets = block_row_offsets
        self.block_col_indices = block_col_indices
        self.shape = torch.Size((out_features, in_features))
        transposed = (block_col_offsets, block_row_indices, block_value_indices)
        if any(tensor is None for tensor in transposed):
            if any(tensor is not None for tensor in transposed):
                raise ValueError(
                    "pass all three of block_col_offsets, block_row_indices, block_value_indices, or none"
                )
            transposed = build_transposed_index(block_row_offsets, block_col_indices, in_features // block_size)
        elif validate:
            validate_transposed_index(block_row_offsets, block_col_indices, *transposed, in_features // block_size)
        self.block_col_offsets, self.block_row_indices, self.block_value_indices = transposed

    def validate(self) -> None:
        """Raise unless this matrix is valid: every check of the constructor with ``validate=True``,
        the CSC index included. For a matrix built with ``validate=False``, converted with
        :meth:`to` (any dtype), or changed in place since; ``SparseLinear`` calls it before adopting
        a matrix."""
        _validate_values_and_bsr(
            self.values, self.block_row_offsets, self.block_col_indices, self.shape[0], self.shape[1]
        )
        validate_transposed_index(
            self.block_row_offsets, self.block_col_indices, self.block_col_offsets, self.block_row_indices,
            self.block_value_indices, self.n_block_cols,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_mask(cls, weight: Tensor, block_mask: Tensor) -> "BlockSparseMatrix":
        """Keep the blocks of ``weight`` where ``block_mask[n_block_rows, n_block_cols]`` is True."""
        check_dense_weight(weight)
        if not isinstance(block_mask, Tensor) or block_mask.dim() != 2 or 0 in block_mask.shape:
            raise ValueError(
                f"block_mask must be a non-empty 2-D tensor [n_block_rows, n_block_cols], got {block_mask!r}"
            )
        out_features, in_features = weight.shape
        n_block_rows, n_block_cols = block_mask.shape
        block_size = out_features // n_block_rows
        if block_size not in BLOCK_SIZES or (n_block_rows * block_size, n_block_cols * block_size) != weight.shape:
            raise ValueError(
                f"block_mask of shape {list(block_mask.shape)} does not cut weight of shape {list(weight.shape)} "
                f"into square blocks of {BLOCK_SIZES}"
            )
        block_mask = check_mask(block_mask, ((n_block_rows, n_block_cols),), "block mask")
        if is_meta(block_mask):
            raise ValueError("block_mask is on the meta device, so its kept blocks are unknown; pass a mask with data")
        if is_meta(weight):
            # No values to gather, but the mask fixes the pattern: build it where the mask lives.
            _, _, block_row_offsets, block_col_indices = _bsr_index_from_block_mask(block_mask)
            values = weight.new_empty(block_col_indices.shape[0], block_size, block_size)
            return _moved_to(values, block_row_offsets, block_col_indices, (out_features, in_features))
        block_rows, block_cols, block_row_offsets, block_col_indices = _bsr_index_from_block_mask(
            block_mask.to(weight.device)
        )
        blocks = weight.reshape(n_block_rows, block_size, n_block_cols, block_size).permute(0, 2, 1, 3)
        values = blocks[block_rows, block_cols].contiguous()
        return cls(values, block_row_offsets, block_col_indices, (out_features, in_features), validate=False)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        block_size: int = 64,
        density: Optional[float] = None,
        *,
        mask: Optional[Tensor] = None,
    ) -> "BlockSparseMatrix":
        """Block-sparse copy of a dense ``weight``.

        With ``density``: magnitude pruning keeps the ``round(density * n_blocks)`` blocks (at least
        one) of largest Frobenius norm; ties go to the earlier block in row-major order.
        With ``mask``: a bool block mask ``[out/b, in/b]``, or an element mask ``[out, in]`` that is
        constant inside every block. Kept values are copied as they are (a kept weight may be 0).

        A meta ``weight`` (no data) with ``density`` gives a meta matrix of the right shapes (which
        blocks are kept is unknown, as for :meth:`random` on meta); with a ``mask`` that has data,
        the mask's pattern with meta values.
        """
        check_dense_weight(weight)
        check_block_size(block_size)
        out_features, in_features = weight.shape
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if size % block_size:
                raise ValueError(
                    f"weight.shape[{0 if name == 'out_features' else 1}] ({name}={size}) must be a "
                    f"multiple of block_size={block_size}"
                )
        n_block_rows, n_block_cols = out_features // block_size, in_features // block_size
        weight = weight.detach()
        if (mask is None) == (density is None):
            raise ValueError("pass exactly one of density= (magnitude pruning) or mask= (explicit pattern)")
        if mask is not None:
            mask = check_mask(
                mask, ((n_block_rows, n_block_cols), (out_features, in_features)), "block mask or element mask"
            )
            if mask.shape == (out_features, in_features):
                blocks = mask.reshape(n_block_rows, block_size, n_block_cols, block_size)
                block_mask = blocks.any(dim=3).any(dim=1)
                if not bool((blocks.all(dim=3).all(dim=1) == block_mask).all()):
                    raise ValueError(
                        f"element mask must be constant inside each {block_size}x{block_size} block; "
                        "pass a block mask [out/b, in/b] to choose blocks"
                    )
                mask = block_mask
            return cls.from_block_mask(weight, mask)
        density = check_density(density)
        if is_meta(weight):
            return _meta_matrix((out_features, in_features), block_size, density, weight.dtype)
        scores = (
            weight.reshape(n_block_rows, block_size, n_block_cols, block_size).float().square().sum(dim=(1, 3))
        )
        return cls.from_block_mask(weight, top_blocks_mask(scores, density))

    @classmethod
    def random(
        cls,
        shape: tuple[int, int],
        block_size: int,
        density: float,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "BlockSparseMatrix":
        """A uniformly random pattern with ``round(density * n_blocks)`` blocks (at least one); values
        are uninitialised (``torch.empty``).

        The pattern is drawn on the CPU (whatever the default device) and moved to ``device``; on
        the meta device nothing is drawn: the tensors have the right shapes and no data.
        """
        out_features, in_features = check_shape_pair(shape)
        check_block_size(block_size)
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if size <= 0 or size % block_size:
                raise ValueError(f"{name}={size} must be a positive multiple of block_size={block_size}")
        density = check_density(density)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        values = torch.empty(0, dtype=dtype, device=device)  # resolves the default dtype and device
        if is_meta(values):
            return _meta_matrix((out_features, in_features), block_size, density, values.dtype)
        scores = torch.rand(
            out_features // block_size, in_features // block_size, generator=generator, device="cpu"
        )
        _, _, block_row_offsets, block_col_indices = _bsr_index_from_block_mask(top_blocks_mask(scores, density))
        values = values.new_empty(block_col_indices.shape[0], block_size, block_size)
        return _moved_to(values, block_row_offsets, block_col_indices, (out_features, in_features))

    # ------------------------------------------------------------------ properties
    @property
    def block_size(self) -> int:
        return self.values.shape[-1]

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def n_block_rows(self) -> int:
        return self.shape[0] // self.block_size

    @property
    def n_block_cols(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def density(self) -> float:
        """Fraction of blocks (and so of weights) kept."""
        return self.nnz_blocks / (self.n_block_rows * self.n_block_cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def index_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The five index tensors in op argument order (BSR then CSC)."""
        return (
            self.block_row_offsets,
            self.block_col_indices,
            self.block_col_offsets,
            self.block_row_indices,
            self.block_value_indices,
        )

    # ------------------------------------------------------------------ conversion
    def to_dense(self) -> Tensor:
        """The masked dense weight ``[out_features, in_features]`` (differentiable in ``values``)."""
        return reference.bsr_to_dense(
            self.values, self.block_row_offsets, self.block_col_indices, self.shape[0], self.shape[1]
        )

    def block_mask(self) -> Tensor:
        """Bool ``[n_block_rows, n_block_cols]``: which blocks are kept."""
        ones = torch.ones(self.nnz_blocks, 1, 1, dtype=torch.bool, device=self.device)
        return reference.bsr_to_dense(
            ones, self.block_row_offsets, self.block_col_indices, self.n_block_rows, self.n_block_cols
        )

    def mask(self) -> Tensor:
        """Bool ``[out_features, in_features]``: True where a weight is kept (it may still be 0)."""
        b = self.block_size
        return self.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)

    def to(self, *args, **kwargs) -> "BlockSparseMatrix":
        """Like ``Tensor.to``: a dtype applies to ``values``, a device to every tensor. The result
        is not validated again (any dtype goes): :meth:`validate` checks it."""
        values = self.values.to(*args, **kwargs)
        device = values.device
        return BlockSparseMatrix(
            values,
            self.block_row_offsets.to(device),
            self.block_col_indices.to(device),
            tuple(self.shape),
            block_col_offsets=self.block_col_offsets.to(device),
            block_row_indices=self.block_row_indices.to(device),
            block_value_indices=self.block_value_indices.to(device),
            validate=False,
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={tuple(self.shape)}, block_size={self.block_size}, "
            f"nnz_blocks={self.nnz_blocks}, density={self.density:.4f}, dtype={self.dtype}, device={self.device})"
        )


def _validate_values_and_bsr(
    values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor, out_features: int, in_features: int
) -> None:
    """The constructor's checks of ``values`` (dtype, block size, shape) and of the BSR index."""
    block_size = values.shape[1]
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if size <= 0 or size % block_size:
            raise ValueError(f"{name}={size} must be a positive multiple of block_size={block_size}")
    validate_bsr_index(
        block_row_offsets, block_col_indices, out_features // block_size, in_features // block_size,
        values.shape[0],
    )
    if block_row_offsets.device != values.device:
        raise ValueError(
            f"block_row_offsets must be on the device of values ({values.device}), got {block_row_offsets.device}"
        )


def _moved_to(
    values: Tensor, block_row_offsets: Tensor, block_col_indices: Tensor, shape: tuple[int, int]
) -> BlockSparseMatrix:
    """A matrix of ``values`` with a valid BSR index built elsewhere (the CPU, a mask's device): the
    CSC index is built there too, then all five move to ``values``' device (which may be meta)."""
    transposed = build_transposed_index(block_row_offsets, block_col_indices, shape[1] // values.shape[-1])
    block_col_offsets, block_row_indices, block_value_indices = (tensor.to(values.device) for tensor in transposed)
    return BlockSparseMatrix(
        values,
        block_row_offsets.to(values.device),
        block_col_indices.to(values.device),
        shape,
        block_col_offsets=block_col_offsets,
        block_row_indices=block_row_indices,
        block_value_indices=block_value_indices,
        validate=False,
    )


def _meta_matrix(shape: tuple[int, int], block_size: int, density: float, dtype: torch.dtype) -> BlockSparseMatrix:
    """A meta-device matrix keeping ``max(1, round(density * n_blocks))`` blocks: the shapes and
    index dtype of a real one, no data (nothing is drawn, so any size is free)."""
    n_block_rows, n_block_cols = shape[0] // block_size, shape[1] // block_size
    nnz = max(1, round(density * n_block_rows * n_block_cols))
    index_dtype = index_dtype_for(nnz, n_block_rows, n_block_cols)
    values = torch.empty(nnz, block_size, block_size, dtype=dtype, device="meta")
    block_row_offsets = torch.empty(n_block_rows + 1, dtype=index_dtype, device="meta")
    block_col_indices = torch.empty(nnz, dtype=index_dtype, device="meta")
    return BlockSparseMatrix(values, block_row_offsets, block_col_indices, shape, validate=False)


def _bsr_index_from_block_mask(block_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(block_rows, block_cols) as int64 in row-major order, plus the BSR offsets and column indices."""
    n_block_rows, n_block_cols = block_mask.shape
    block_rows, block_cols = block_mask.nonzero(as_tuple=True)
    dtype = index_dtype_for(block_rows.shape[0], n_block_rows, n_block_cols)
    counts = torch.bincount(block_rows, minlength=n_block_rows)
    return block_rows, block_cols, _offsets_from_counts(counts, dtype), block_cols.to(dtype)


def top_blocks_mask(scores: Tensor, density: float) -> Tensor:
    """Bool mask of the ``max(1, round(density * scores.numel()))`` highest scores (stable ties)."""
    keep = max(1, round(density * scores.numel()))
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:keep]] = True
    return mask.reshape(scores.shape)
