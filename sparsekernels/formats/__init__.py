"""Sparse weight formats: block-sparse (BSR with a transposed index) and N:M."""

from .block_sparse import BlockSparseMatrix, build_transposed_index, validate_bsr_index, validate_transposed_index
from .nm import NMMatrix, pack_positions, unpack_positions, validate_positions

__all__ = [
    "BlockSparseMatrix",
    "NMMatrix",
    "build_transposed_index",
    "pack_positions",
    "unpack_positions",
    "validate_bsr_index",
    "validate_positions",
    "validate_transposed_index",
]
