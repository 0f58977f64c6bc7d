"""Layout configurations: what kind of sparsity a layer uses, before any weight exists.

``BlockSparse(block_size, density)`` and ``NM(n, m, transposable=False)`` are small immutable values that
``SparseLinear``, ``sparsify_`` and the formats take. They validate themselves on construction so
that a bad layout fails where it is written, not deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

BLOCK_SIZES = (16, 32, 64, 128)
NM_GROUP_SIZES = (2, 4, 8, 16)


@dataclass(frozen=True)
class BlockSparse:
    """Square blocks of ``block_size`` along both weight dimensions; ``density`` of them kept.

    ``density`` is the fraction of blocks kept, in (0, 1]. Both feature sizes of a layer must be
    multiples of ``block_size``.
    """

    block_size: int = 64
    density: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int in {BLOCK_SIZES}, got {self.block_size!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a float in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise ValueError unless both feature sizes are multiples of the block size."""
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if size <= 0 or size % self.block_size:
                raise ValueError(
                    f"{name}={size} must be a positive multiple of block_size={self.block_size}"
                )


@dataclass(frozen=True)
class NM:
    """``n`` weights kept in every group of ``m`` consecutive weights along the input dimension.

    ``m`` is one of 2, 4, 8, 16 and ``1 <= n < m`` (2:4 is the pattern of NVIDIA's sparse tensor
    cores). ``in_features`` must be a multiple of ``m``.

    ``transposable=True`` asks for a mask that is N:M along the output dimension too (n kept in
    every m x m tile row and column), so that ``W.T`` is N:M and the input gradient
    ``grad_output @ W`` runs on the same N:M forward kernels as the forward (the 2:4 sparse tensor
    core GEMM on CUDA) instead of an expanded weight. ``out_features`` must then be a multiple of
    ``m`` as well. Layouts differing only in ``transposable`` are different layouts (``!=``).
    """

    n: int = 2
    m: int = 4
    transposable: bool = False

    def __post_init__(self) -> None:
        for name, value in (("n", self.n), ("m", self.m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.m not in NM_GROUP_SIZES:
            raise ValueError(f"m must be one of {NM_GROUP_SIZES}, got {self.m}")
        if not 1 <= self.n < self.m:
            raise ValueError(f"n must satisfy 1 <= n < m={self.m}, got n={self.n}")
        if not isinstance(self.transposable, bool):
            raise TypeError(f"transposable must be a bool, got {self.transposable!r}")

    def __repr__(self) -> str:
        # The default layout prints as it always has, so reprs and logs of plain N:M layers are unchanged.
        return f"NM(n={self.n}, m={self.m}{', transposable=True' if self.transposable else ''})"

    @property
    def density(self) -> float:
        return self.n / self.m

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise ValueError unless in_features (and, if transposable, out_features) is a multiple of m."""
        if out_features <= 0:
            raise ValueError(f"out_features={out_features} must be positive")
        if in_features <= 0 or in_features % self.m:
            raise ValueError(f"in_features={in_features} must be a positive multiple of m={self.m}")
        if self.transposable and out_features % self.m:
            raise ValueError(
                f"out_features={out_features} must be a multiple of m={self.m} for a transposable layout "
                f"(W.T is {self.n}:{self.m} along out_features)"
            )


Layout = Union[BlockSparse, NM]
