"""N:M-structured matrix format: n weights kept in every group of m along the input dimension.

Storage, shared by every backend (see csrc/cpu/nm.h for the kernels' view of it):

* ``values[out_features, in_features * n / m]``: kept values, group after group, in increasing
  column order inside each group.
* ``positions[out_features, ceil(kept / per_byte)]`` (uint8): the offset (0..m-1) of each kept
  value inside its group, packed ``bits = {2: 1, 4: 2, 8: 4, 16: 4}[m]`` bits per value, low bits
  first (value j in byte ``j // per_byte`` at bit ``(j % per_byte) * bits``).

This portable encoding is what the CPU and Triton kernels read. The sparse tensor cores of NVIDIA
GPUs want 2:4 metadata in their own interleaved layout; the CUDA kernels derive that from this
format (``hardware_metadata`` slot below) rather than replacing it.

Transposed view. When the mask is also N:M along ``out_features`` (a *transposable* mask: n kept in
every row and every column of each m x m tile), ``W.T`` ``[in_features, out_features]`` is itself an
N:M matrix, so ``grad_output @ W = linear(grad_output, W.T)`` is an N:M *forward*.
:meth:`NMMatrix.transposed_pattern` derives W.T's pattern once per mask:

* ``positions_t``: W.T's packed positions (same encoding, rows = input features, groups of m output
  features), fixed while the mask is fixed;
* ``transpose_index`` (int64, one entry per kept weight): W.T's values are a permutation of W's,
  ``values_t.flatten() = values.flatten()[transpose_index]``, so after every optimizer step W.T's
  values cost one gather of nnz elements, no search.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from ..layouts import NM
from ._common import FLOAT_DTYPES, check_dense_weight, check_mask, check_shape_pair, index_dtype_for, is_meta

# NMMatrix.random draws its scores this many at a time (row chunks), so that a large layer never
# holds a dense float score tensor and its argsort at once: peak memory is the packed positions.
_RANDOM_SCORES_PER_CHUNK = 1 << 22

__all__ = [
    "NMMatrix",
    "TransposedPattern",
    "pack_positions",
    "random_transposable_mask",
    "transposability_problem",
    "unpack_positions",
    "validate_positions",
]

unpack_positions = reference.unpack_positions


def pack_positions(offsets: Tensor, m: int) -> Tensor:
    """Pack in-group offsets ``[rows, kept]`` (integers in 0..m-1) into uint8 (see module doc)."""
    bits = reference.NM_BITS_PER_POSITION[m]
    per_byte = 8 // bits
    rows, kept = offsets.shape
    padded = torch.zeros(rows, -(-kept // per_byte) * per_byte, dtype=torch.int32, device=offsets.device)
    padded[:, :kept] = offsets.to(torch.int32)
    shifts = torch.arange(per_byte, device=offsets.device, dtype=torch.int32) * bits
    packed = (padded.reshape(rows, -1, per_byte) << shifts).sum(dim=-1)
    return packed.to(torch.uint8)


def validate_positions(positions: Tensor, out_features: int, kept_per_row: int, n: int, m: int) -> None:
    """Raise ValueError unless ``positions`` is a valid packed N:M pattern.

    Offsets must be strictly increasing inside every group (so each is < m and none repeats), and
    the padding bits of the last byte must be zero. Meta positions (no data) get the dtype and
    shape checks only.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype != torch.uint8:
        raise TypeError(f"positions must be uint8, got {positions.dtype}")
    per_byte = 8 // reference.NM_BITS_PER_POSITION[m]
    expected = (out_features, -(-kept_per_row // per_byte))
    if tuple(positions.shape) != expected:
        raise ValueError(f"positions must have shape {list(expected)}, got {list(positions.shape)}")
    if out_features == 0 or kept_per_row == 0 or is_meta(positions):
        return
    offsets = reference.unpack_positions(positions, m, kept_per_row).reshape(out_features, -1, n)
    if bool((offsets >= m).any()) or bool((offsets[..., 1:] <= offsets[..., :-1]).any()):
        raise ValueError(f"positions must hold {n} strictly increasing offsets in [0, {m}) per group")
    if not torch.equal(pack_positions(offsets.reshape(out_features, -1), m), positions):
        raise ValueError("positions has non-zero padding bits after the last kept value of a row")


def kept_offsets(mask: Tensor, n: int, m: int) -> Tensor:
    """In-group offsets ``[rows, cols / m * n]`` (uint8) of a bool ``[rows, cols]`` mask that keeps
    exactly n of every m; each row's offsets come group after group, increasing inside a group.

    ``masked_select`` walks the mask in row-major order, which is exactly that order, and needs no
    index tensor (``nonzero`` would take 16 bytes per kept weight).
    """
    rows, cols = mask.shape
    in_group = torch.arange(m, dtype=torch.uint8, device=mask.device).expand(rows, cols // m, m)
    return torch.masked_select(in_group, mask.reshape(rows, cols // m, m)).reshape(rows, cols // m * n)


def transposability_problem(mask: Tensor, n: int, m: int) -> Optional[str]:
    """None when the bool ``[out, in]`` mask of an N:M matrix (n of every m along ``in``) also keeps
    n of every m consecutive rows in every column, else what is wrong (for an error message)."""
    out_features, in_features = mask.shape
    if out_features % m:
        return (f"out_features={out_features} is not a multiple of m={m}, so W.T [{in_features}, "
                f"{out_features}] cannot be {n}:{m} along out_features")
    column_counts = mask.reshape(out_features // m, m, in_features).sum(dim=1)  # [out / m, in]
    bad = column_counts != n
    if bool(bad.any()):
        group, column = (int(i) for i in bad.nonzero()[0])
        return (f"the mask is {n}:{m} along in_features but not along out_features: {int(bad.sum())} column "
                f"groups keep a number other than n={n} of their m={m} rows (the first: column {column}, "
                f"rows {group * m}..{group * m + m - 1} keep {int(column_counts[group, column])})")
    return None


def random_transposable_mask(
    out_features: int, in_features: int, n: int, m: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """A random bool ``[out, in]`` mask keeping n of every m along both dimensions (CPU).

    Each m x m tile is the circulant tile (row i keeps columns i, i+1, ..., i+n-1 mod m: n per row
    and per column) with its rows and its columns randomly permuted, which keeps both counts. Works
    for every n:m; random, though not uniform over all transposable tiles (for 2:4 it draws the 72
    tiles whose kept entries form one 8-cycle, not the 18 made of two 2 x 2 blocks).
    """
    NM(n, m, transposable=True).check_shape(out_features, in_features)
    offsets = torch.arange(m, device="cpu")  # whatever the default device
    circulant = (offsets[None, :] - offsets[:, None]) % m < n  # [m, m]
    tiles = (out_features // m) * (in_features // m)
    row_order = torch.rand(tiles, m, generator=generator, device="cpu").argsort(dim=-1)
    col_order = torch.rand(tiles, m, generator=generator, device="cpu").argsort(dim=-1)
    mask_tiles = circulant[row_order[:, :, None], col_order[:, None, :]]  # [tiles, m, m]
    return (
        mask_tiles.reshape(out_features // m, in_features // m, m, m).permute(0, 2, 1, 3)
        .reshape(out_features, in_features)
    )


def _validate_values_and_positions(values: Tensor, positions: Tensor, n: int, m: int) -> None:
    """The constructor's checks: values dtype, the full positions check, one device."""
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    validate_positions(positions, values.shape[0], values.shape[1], n, m)
    if positions.device != values.device:
        raise ValueError(f"positions must be on the device of values ({values.device}), got {positions.device}")


class TransposedPattern(NamedTuple):
    """The pattern of ``W.T`` for a transposable N:M weight W (see the module doc)."""

    transpose_index: Tensor  # int64 [nnz]: values_t.flatten() = values.flatten()[transpose_index]
    positions_t: Tensor  # uint8 [in_features, ceil(out_features * n / m / per_byte)]


class NMMatrix:
    """An N:M-structured ``[out_features, in_features]`` weight: kept values plus packed positions.

    Build one with :meth:`from_dense` (magnitude pruning or an explicit mask) or :meth:`random`;
    :meth:`to_dense` gives the masked dense weight back.
    """

    def __init__(self, values: Tensor, positions: Tensor, n: int, m: int, *, validate: bool = True) -> None:
        NM(n, m)  # validates n and m
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() != 2:
            raise ValueError(f"values must be 2-D [out_features, in_features * n / m], got {tuple(values.shape)}")
        out_features, kept_per_row = values.shape
        if kept_per_row % n:
            raise ValueError(f"values.shape[1]={kept_per_row} must be a multiple of n={n}")
        if validate:
            _validate_values_and_positions(values, positions, n, m)
        self.values = values
        self.positions = positions
        self.n = n
        self.m = m
        # Reserved for the CUDA backend: 2:4 metadata in the sparse tensor core layout, derived from
        # positions on demand and cached here (None until a backend asks for it).
        self.hardware_metadata: Optional[Tensor] = None

    def validate(self) -> None:
        """Raise unless this matrix is valid: every check of the constructor with ``validate=True``.
        For a matrix built with ``validate=False``, converted with :meth:`to` (any dtype), or
        changed in place since; ``SparseLinear`` calls it before adopting a matrix."""
        _validate_values_and_positions(self.values, self.positions, self.n, self.m)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls, weight: Tensor, n: int = 2, m: int = 4, *, mask: Optional[Tensor] = None
    ) -> "NMMatrix":
        """N:M copy of a dense ``weight``.

        Without ``mask``: keep the n largest ``|w|`` of every group of m (ties to the lower column).
        With ``mask``: a bool ``[out, in]`` mask with exactly n True in every group of m; kept
        values are copied as they are (a kept weight may be 0).
        """
        check_dense_weight(weight)
        layout = NM(n, m)
        out_features, in_features = weight.shape
        layout.check_shape(out_features, in_features)
        weight = weight.detach()
        groups = weight.reshape(out_features, in_features // m, m)
        if mask is None:
            scores = groups.abs().float()
            # NaN counts as largest, so a NaN weight is kept and shows in the output, not hidden.
            scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)
        else:
            mask = check_mask(mask, ((out_features, in_features),), "element mask")
            mask_groups = mask.to(weight.device).reshape(out_features, in_features // m, m)
            kept_counts = mask_groups.sum(dim=-1)
            if not bool((kept_counts == n).all()):
                bad = int((kept_counts != n).sum())
                raise ValueError(f"mask must keep exactly n={n} of every m={m} weights; {bad} groups do not")
            scores = mask_groups.float()
        offsets = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :n].sort(dim=-1).values
        values = torch.gather(groups, -1, offsets).reshape(out_features, -1).contiguous()
        return cls(values, pack_positions(offsets.reshape(out_features, -1), m), n, m, validate=False)

    @classmethod
    def random(
        cls,
        shape: tuple[int, int],
        n: int,
        m: int,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
        generator: Optional[torch.Generator] = None,
        transposable: bool = False,
    ) -> "NMMatrix":
        """A uniformly random N:M pattern; values are uninitialised (``torch.empty``).

        ``transposable=True``: a random pattern that is N:M along out_features too
        (:func:`random_transposable_mask`; out_features must be a multiple of m).

        The pattern is drawn on the CPU (whatever the default device), a block of rows at a time
        (a transposable one as a whole bool mask: out x in bytes), and moved to ``device``; on the
        meta device nothing is drawn: the tensors have the right shapes and no data, at any size.
        """
        out_features, in_features = check_shape_pair(shape)
        NM(n, m, transposable=transposable).check_shape(out_features, in_features)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        kept_per_row = in_features // m * n
        values = torch.empty(out_features, kept_per_row, dtype=dtype, device=device)
        per_byte = 8 // reference.NM_BITS_PER_POSITION[m]
        if is_meta(values):
            positions = torch.empty(out_features, -(-kept_per_row // per_byte), dtype=torch.uint8, device="meta")
        elif transposable:
            mask = random_transposable_mask(out_features, in_features, n, m, generator)
            positions = pack_positions(kept_offsets(mask, n, m), m)
        else:
            positions = torch.empty(out_features, -(-kept_per_row // per_byte), dtype=torch.uint8, device="cpu")
            rows_per_chunk = max(1, _RANDOM_SCORES_PER_CHUNK // in_features)
            for start in range(0, out_features, rows_per_chunk):
                rows = min(rows_per_chunk, out_features - start)
                scores = torch.rand(rows, in_features // m, m, generator=generator, device="cpu")
                offsets = scores.argsort(dim=-1)[..., :n].sort(dim=-1).values.reshape(rows, -1)
                positions[start:start + rows] = pack_positions(offsets, m)
        return cls(values, positions.to(values.device), n, m, validate=False)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.values.shape[0], self.values.shape[1] // self.n * self.m))

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    # ------------------------------------------------------------------ conversion
    def column_indices(self) -> Tensor:
        """Input column of every kept value, ``[out_features, kept]`` int64."""
        return reference.nm_column_indices(self.positions, self.n, self.m, self.values.shape[1])

    def to_dense(self) -> Tensor:
        """The masked dense weight ``[out_features, in_features]`` (differentiable in ``values``)."""
        return reference.nm_to_dense(self.values, self.positions, self.n, self.m)

    def mask(self) -> Tensor:
        """Bool ``[out_features, in_features]``: True where a weight is kept (it may still be 0)."""
        ones = torch.ones(self.values.shape, dtype=torch.bool, device=self.device)
        return reference.nm_to_dense(ones, self.positions, self.n, self.m)

    def to(self, *args, **kwargs) -> "NMMatrix":
        """Like ``Tensor.to``: a dtype applies to ``values``, a device to every tensor. The result
        is not validated again (any dtype goes): :meth:`validate` checks it."""
        values = self.values.to(*args, **kwargs)
        return NMMatrix(values, self.positions.to(values.device), self.n, self.m, validate=False)

    # ------------------------------------------------------------------ transposed view
    def is_transposable(self) -> bool:
        """Whether W.T is N:M too (n of every m consecutive output rows kept in every column).

        Reads the whole pattern (host side on a GPU: one synchronisation); call it when a pattern
        is set, not per step.
        """
        return transposability_problem(self.mask(), self.n, self.m) is None

    def transposed_pattern(self) -> TransposedPattern:
        """``(transpose_index, positions_t)``, the pattern of ``W.T`` (see the module doc).

        Raises ValueError, saying which column group breaks it, when the mask is not transposable.
        Computed once per mask (on the pattern's device); every later W.T is one gather. On the
        meta device: meta tensors of the right shapes (transposability cannot be checked there).
        """
        n, m = self.n, self.m
        if is_meta(self.positions):
            out_features, in_features = self.shape
            per_byte = 8 // reference.NM_BITS_PER_POSITION[m]
            return TransposedPattern(
                torch.empty(self.values.numel(), dtype=torch.int64, device="meta"),
                torch.empty(in_features, -(-(out_features // m * n) // per_byte), dtype=torch.uint8, device="meta"),
            )
        mask = self.mask()
        problem = transposability_problem(mask, n, m)
        if problem is not None:
            raise ValueError(f"this {n}:{m} NMMatrix has no N:M transpose: {problem}")
        nnz = self.values.numel()
        # Slot of every kept weight in values.flatten(): values are row-major over the mask.
        slot_dtype = index_dtype_for(nnz)
        slot_of = torch.zeros(mask.shape, dtype=slot_dtype, device=mask.device)
        slot_of.masked_scatter_(mask, torch.arange(nnz, dtype=slot_dtype, device=mask.device))
        # W.T's values are row-major over mask.T: walking the transposed views in that order lists,
        # column by column of W, the slots of its kept rows in increasing row order.
        mask_t = mask.t()
        transpose_index = torch.masked_select(slot_of.t(), mask_t).to(torch.int64)
        positions_t = pack_positions(kept_offsets(mask_t, n, m), m)
        return TransposedPattern(transpose_index, positions_t)

    def t(self) -> "NMMatrix":
        """``W.T`` as an N:M matrix ``[in_features, out_features]`` (values gathered, a copy);
        ValueError when the mask is not transposable."""
        transpose_index, positions_t = self.transposed_pattern()
        values_t = self.values.reshape(-1)[transpose_index].reshape(positions_t.shape[0], -1)
        return NMMatrix(values_t, positions_t, self.n, self.m, validate=False)

    # ------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"NMMatrix(shape={tuple(self.shape)}, n={self.n}, m={self.m}, "
            f"dtype={self.dtype}, device={self.device})"
        )
