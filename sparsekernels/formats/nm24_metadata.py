"""2:4 metadata for NVIDIA sparse tensor cores: a pure-PyTorch reference of the hardware layouts.

Why: the sparse tensor cores (``mma.sp`` on sm_80, sparse ``wgmma`` on sm_90a) read a 2:4 weight as
kept values plus 2-bit indices in a fixed, interleaved order. The CUDA kernels of ``csrc/cuda``
(``nm24_compress.cu``) produce these layouts on the GPU; this module is the CPU reference they are
checked against, and documents the layouts in one place. Only 16-bit storage (bfloat16, float16)
is covered: 32-bit (tf32) and 8-bit inputs use other metadata shapes.

Terms. The sparse operand is the weight ``W[rows, cols]`` (``rows = out_features``, ``cols =
in_features``), 2:4 along ``cols``. In CUTLASS terms it is operand A, ``M = rows``, ``K = cols``,
K-major ("row-major A"), which is how ``y = x @ W.T`` maps onto a sparse GEMM (``y.T = W @ x.T``).

Kept values: ``values[rows, cols / 2]``, the two kept weights of every group of 4 in increasing
column order. This is the compressed A of CUTLASS (sm_80 ``SparseGemm`` with row-major A, and the
sm_90 ``Sm90GemmSparseConfig`` K-major ``fill_layoutA``) and exactly ``NMMatrix.values`` for n=2,
m=4.

Nibble (one group of 4): ``i0 | i1 << 2`` with ``i0 < i1`` the in-group offsets of the two kept
values (``mma.sp::ordered_metadata`` requires the order). Valid nibbles: 0x4, 0x8, 0xC, 0x9, 0xD, 0xE.

Natural metadata ("natural"): ``uint16[rows, cols / 16]`` (stored as int16 bit patterns since
torch has few uint16 ops); word ``(r, w)`` holds the groups ``4w .. 4w+3`` of row ``r``, group
``4w + j`` in bits ``4j .. 4j+3``. This is CUTLASS's un-reordered E tensor (``Gemm::ElementE`` =
uint16 for 16-bit A on sm_80, ``kElementsPerElementE`` = 8 kept values per word). The project's
``NMMatrix.positions`` for 2:4 (2 bits per kept value, low bits first) is bit-for-bit this layout:
byte ``b`` holds groups ``2b`` and ``2b+1`` as nibbles, so the positions bytes read as
little-endian uint16 words *are* the natural words (``natural_metadata_from_positions``).

sm_80 layout ("sm80"): what ``cutlass::gemm::device::SparseGemm`` (CUTLASS 2.x, 16-bit A) reads,
i.e. the natural words passed through ``cutlass::reorder_meta`` (tools/util/host_reorder.h) into
``cutlass::layout::ColumnMajorInterleaved<2>`` (``Gemm::LayoutE``). Natural word ``(r, w)`` goes
to row ``r' = 32*(r // 32) + 4*(r % 8) + (r % 32) // 8`` (rows interleaved so ``ldmatrix`` feeds
the ``m16n8k32`` metadata registers), column ``w' = w``; then the 2x2 blocks are transposed where
``r'`` and ``w'`` differ in parity (``r'`` even and ``w'`` odd: ``r' += 1, w' -= 1``; ``r'`` odd and
``w'`` even: ``r' -= 1, w' += 1``). Storage offset (in words) of ``(r', w')``:
``(w' // 2) * (2 * rows) + 2 * r' + w' % 2``. Needs ``rows % 32 == 0`` and ``cols % 32 == 0``.
This matches ``torch.sparse.SparseSemiStructuredTensorCUTLASS`` for 16-bit dtypes.

sm_90 layouts ("sm90", "sm90_k64", "sm90_k32"): what the CUTLASS 3.x sparse collective
(``sm90_sparse_mma_tma_gmma_ss_warpspecialized``, config ``cutlass::Sm90GemmSparseConfig`` with
16-bit A) reads. The builder (``sm90_sparse_gmma_builder.inl``) sets ``MinTileShapeK`` to
``min(tile K, 128)``, and the metadata layout depends on it through ``NumK = MinTileShapeK / 32``:
"sm90" is NumK = 4 (kernels with a K tile of 128 or more, as in CUTLASS's example 62),
"sm90_k64" NumK = 2, "sm90_k32" NumK = 1. ``fill_layoutE`` tiles the logical ``(rows, cols)``
space with the atom ``TensorEAtom_16bit`` = ordered layout of shape ``((8, 2, 4), (16, 2, NumK))``
with orders ``((3, 1, 5), (0, 4, 2))``: a 64 x 32*NumK block of logical elements (128*NumK words).
Counted in words, with ``w = col // 16``, ``v = w % (2 * NumK)`` and ``R = rows`` rounded up to 64,
natural word ``(r, w)`` lives at
``(r % 16) // 8 + 2 * (v // 2) + 2 * NumK * (r % 8) + 16 * NumK * (v % 2)
+ 32 * NumK * ((r % 64) // 16) + 128 * NumK * (r // 64) + 2 * NumK * R * (w // (2 * NumK))``;
inside a word the nibbles keep the natural order (column ``c`` of the word's 16 in nibble
``c // 4``, low nibble first, as CUTLASS's sm90 compressor stores its ``uint4_t`` chunks). Atoms are laid along rows first, then along columns, so the buffer
holds ``R * C / 16`` words with ``C = cols`` rounded up to ``32 * NumK``; padding rows/columns
hold nibble 0x4 (offsets 0, 1) with zero values.

On CUDA tensors, :func:`compress_24` and :func:`hardware_metadata` run the GPU kernels of
``csrc/cuda/nm24_compress.cu`` (ops ``sparsekernels::nm24_compress`` and
``sparsekernels::nm24_metadata_from_positions``, present in CUDA builds); everywhere else, and as the
reference the GPU tests compare against, the PyTorch code below.

CAVEAT: these layouts are derived from the CUTLASS 4.2.0 headers (pinned in
csrc/cuda/find_cutlass.py) and tested here only for self-consistency (compress -> expand round trips, permutations are
bijections, agreement of ``natural`` with ``NMMatrix.positions``). Whether the hardware reads them
as described is verified only by the GPU tests (tests/test_cuda.py), on a GPU machine.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .nm import NMMatrix

__all__ = [
    "LAYOUTS",
    "VALID_NIBBLES",
    "compress_24",
    "expand_24",
    "natural_metadata_from_positions",
    "positions_from_natural_metadata",
    "metadata_size",
    "reorder_metadata",
    "natural_metadata_from_layout",
    "hardware_metadata",
]

LAYOUTS = ("natural", "sm80", "sm90", "sm90_k64", "sm90_k32")
# NumK of each sm_90 layout: MinTileShapeK / 32 of the CUTLASS kernel that reads it.
SM90_NUM_K = {"sm90": 4, "sm90_k64": 2, "sm90_k32": 1}
# i0 | i1 << 2 for every i0 < i1 in 0..3.
VALID_NIBBLES = tuple(sorted(i0 | (i1 << 2) for i0 in range(4) for i1 in range(i0 + 1, 4)))
# Nibble used for padding groups (offsets 0 and 1, zero values): valid for the hardware.
PAD_NIBBLE = 0x4
_PAD_WORD = PAD_NIBBLE * 0x1111  # four padding nibbles in one 16-bit word


def _cuda_op(name: str):
    """The CUDA kernel op ``sparsekernels::name`` when this build has it, else None."""
    from .. import _C  # noqa: F401  (registers the ops)

    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekernels::{name}", "CUDA"):
        return None
    return getattr(torch.ops.sparsekernels, name)


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_shape(rows: int, cols: int, layout: str) -> None:
    if cols % 16:
        raise ValueError(f"2:4 metadata needs in_features (cols) to be a multiple of 16, got {cols}")
    if layout == "sm80" and (rows % 32 or cols % 32):
        raise ValueError(
            f"the sm80 metadata layout needs out_features % 32 == 0 and in_features % 32 == 0, got {rows}x{cols}"
        )


def metadata_size(rows: int, cols: int, layout: str) -> int:
    """Number of 16-bit words of 2:4 metadata for a ``[rows, cols]`` weight in ``layout``."""
    _check_layout(layout)
    _check_shape(rows, cols, layout)
    if layout in SM90_NUM_K:
        atom_cols = 32 * SM90_NUM_K[layout]
        return -(-rows // 64) * 64 * (-(-cols // atom_cols) * atom_cols) // 16
    return rows * cols // 16


def _destination_offsets(rows: int, words_per_row: int, layout: str) -> Tensor:
    """Word offset in ``layout`` of every natural word ``(r, w)``, int64 ``[rows, words_per_row]``."""
    r = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, words_per_row)
    w = torch.arange(words_per_row, dtype=torch.int64)[None, :].expand(rows, words_per_row)
    if layout == "natural":
        return r * words_per_row + w
    if layout == "sm80":
        row = 32 * (r // 32) + 4 * (r % 8) + (r % 32) // 8
        col = w.clone()
        # Transpose the 2x2 blocks whose row and column parities differ.
        down = (row % 2 == 0) & (col % 2 == 1)
        up = (row % 2 == 1) & (col % 2 == 0)
        row = row + down.long() - up.long()
        col = col - down.long() + up.long()
        return (col // 2) * (2 * rows) + 2 * row + col % 2
    num_k = SM90_NUM_K[layout]
    padded_rows = -(-rows // 64) * 64
    v = w % (2 * num_k)  # word inside the atom's K extent: (k1, kN) = (v % 2, v // 2)
    return (
        (r % 16) // 8
        + 2 * (v // 2)
        + 2 * num_k * (r % 8)
        + 16 * num_k * (v % 2)
        + 32 * num_k * ((r % 64) // 16)
        + 128 * num_k * (r // 64)
        + 2 * num_k * padded_rows * (w // (2 * num_k))
    )


def reorder_metadata(natural: Tensor, layout: str) -> Tensor:
    """Natural metadata ``int16[rows, cols / 16]`` -> flat int16 buffer in ``layout``."""
    _check_layout(layout)
    if natural.dtype != torch.int16 or natural.dim() != 2:
        raise TypeError(f"natural metadata must be a 2-D int16 tensor, got {natural.dtype} {tuple(natural.shape)}")
    rows, words = natural.shape
    _check_shape(rows, words * 16, layout)
    size = metadata_size(rows, words * 16, layout)
    # Padding positions (sm90 layouts only) hold valid nibbles so the hardware never sees i0 == i1.
    out = torch.full((size,), _PAD_WORD, dtype=torch.int16, device=natural.device)
    offsets = _destination_offsets(rows, words, layout).to(natural.device)
    out[offsets.reshape(-1)] = natural.reshape(-1)
    return out


def natural_metadata_from_layout(metadata: Tensor, rows: int, cols: int, layout: str) -> Tensor:
    """Inverse of :func:`reorder_metadata`: a flat buffer in ``layout`` -> natural ``[rows, cols/16]``."""
    _check_layout(layout)
    _check_shape(rows, cols, layout)
    size = metadata_size(rows, cols, layout)
    if metadata.dtype != torch.int16 or metadata.numel() != size:
        raise ValueError(
            f"metadata for a {rows}x{cols} weight in layout {layout!r} must be int16 with {size} words, "
            f"got {metadata.dtype} with {metadata.numel()}"
        )
    offsets = _destination_offsets(rows, cols // 16, layout).to(metadata.device)
    return metadata.reshape(-1)[offsets]


def natural_metadata_from_positions(positions: Tensor, rows: int, cols: int) -> Tensor:
    """``NMMatrix.positions`` of a 2:4 weight -> natural metadata ``int16[rows, cols / 16]``.

    Same bits, read as little-endian 16-bit words (see module doc).
    """
    _check_shape(rows, cols, "natural")
    if positions.dtype != torch.uint8 or tuple(positions.shape) != (rows, cols // 8):
        raise ValueError(
            f"positions of a 2:4 {rows}x{cols} weight must be uint8 [{rows}, {cols // 8}], "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    low = positions[:, 0::2].to(torch.int32)
    high = positions[:, 1::2].to(torch.int32)
    words = low | (high << 8)
    # Reinterpret 0..65535 as int16 bit patterns.
    return torch.where(words >= 32768, words - 65536, words).to(torch.int16)


def positions_from_natural_metadata(natural: Tensor) -> Tensor:
    """Inverse of :func:`natural_metadata_from_positions`: ``uint8[rows, cols / 8]``."""
    words = natural.to(torch.int32) & 0xFFFF
    rows, count = words.shape
    out = torch.empty(rows, 2 * count, dtype=torch.uint8, device=natural.device)
    out[:, 0::2] = (words & 0xFF).to(torch.uint8)
    out[:, 1::2] = (words >> 8).to(torch.uint8)
    return out


def _nibbles(natural: Tensor) -> Tensor:
    """Natural metadata -> nibble of every group, int64 ``[rows, cols / 4]``."""
    words = natural.to(torch.int64) & 0xFFFF
    shifts = torch.arange(4, device=natural.device, dtype=torch.int64) * 4
    return ((words[..., None] >> shifts) & 0xF).reshape(natural.shape[0], -1)


def compress_24(
    weight: Tensor, *, mask: Optional[Tensor] = None, layout: str = "natural"
) -> tuple[Tensor, Tensor]:
    """Dense (magnitude 2:4) or masked 2:4 ``weight[rows, cols]`` -> ``(values, metadata)``.

    ``values``: ``[rows, cols / 2]`` in weight's dtype; ``metadata``: int16, ``[rows, cols / 16]`` for
    ``"natural"``, else the flat buffer of :func:`reorder_metadata`. Selection follows
    ``NMMatrix.from_dense`` (largest ``|w|``, ties to the lower column, NaN counts as largest; a mask
    must keep exactly 2 of every 4).
    """
    _check_layout(layout)
    if weight.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"2:4 tensor-core metadata is defined here for bfloat16/float16 weights, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    _check_shape(rows, cols, layout)
    if weight.is_cuda and _cuda_op("nm24_compress") is not None:
        if mask is not None and (mask.dtype != torch.bool or mask.shape != weight.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        return _cuda_op("nm24_compress")(weight, None if mask is None else mask.to(weight.device), layout)
    nm = NMMatrix.from_dense(weight, 2, 4, mask=mask)
    natural = natural_metadata_from_positions(nm.positions, rows, cols)
    return nm.values, natural if layout == "natural" else reorder_metadata(natural, layout)


def expand_24(values: Tensor, metadata: Tensor, *, layout: str = "natural") -> Tensor:
    """Kept values ``[rows, cols / 2]`` + metadata in ``layout`` -> dense ``[rows, cols]``.

    Raises ValueError on an invalid nibble (two kept values at one offset, or a reversed pair).
    """
    _check_layout(layout)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [rows, cols / 2], got shape {tuple(values.shape)}")
    rows, cols = values.shape[0], values.shape[1] * 2
    natural = metadata if layout == "natural" else natural_metadata_from_layout(metadata, rows, cols, layout)
    if tuple(natural.shape) != (rows, cols // 16):
        raise ValueError(f"natural metadata must have shape [{rows}, {cols // 16}], got {tuple(natural.shape)}")
    nibbles = _nibbles(natural)
    valid = torch.zeros(16, dtype=torch.bool, device=natural.device)
    valid[list(VALID_NIBBLES)] = True
    if not bool(valid[nibbles].all()):
        raise ValueError("metadata holds an invalid nibble: every group needs offsets i0 < i1 in 0..3")
    group_base = torch.arange(cols // 4, device=values.device, dtype=torch.int64) * 4
    columns = torch.stack((group_base + (nibbles & 3), group_base + (nibbles >> 2)), dim=-1).reshape(rows, -1)
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    return dense.scatter(1, columns, values)


def hardware_metadata(matrix: NMMatrix, layout: str) -> Tensor:
    """The 2:4 metadata of ``matrix`` in ``layout``, cached on ``matrix.hardware_metadata``.

    The cache holds one entry, keyed by the layout and the identity and version counter of
    ``matrix.positions``, so a new layout or a changed pattern rebuilds it.
    """
    _check_layout(layout)
    if (matrix.n, matrix.m) != (2, 4):
        raise ValueError(f"hardware metadata exists for 2:4 only, got {matrix.n}:{matrix.m}")
    key = (layout, matrix.positions.data_ptr(), matrix.positions._version)
    cached = matrix.hardware_metadata
    if isinstance(cached, tuple) and cached[0] == key:
        return cached[1]
    rows, cols = matrix.shape
    if matrix.positions.is_cuda and _cuda_op("nm24_metadata_from_positions") is not None:
        _check_shape(rows, cols, layout)
        metadata = _cuda_op("nm24_metadata_from_positions")(matrix.positions, rows, cols, layout)
    else:
        natural = natural_metadata_from_positions(matrix.positions, rows, cols)
        metadata = natural if layout == "natural" else reorder_metadata(natural, layout)
    matrix.hardware_metadata = (key, metadata)  # type: ignore[assignment]
    return metadata
