"""sparsekernels: block-sparse and N:M-structured matmul for PyTorch, as custom ops and a drop-in
``SparseLinear``.

    import sparsekernels as sk
    layer = sk.SparseLinear(4096, 4096, sk.BlockSparse(block_size=64, density=0.1))
    model = sk.sparsify_(model, sk.NM(2, 4))
"""

from __future__ import annotations

import torch  # noqa: F401  (must be imported before the extension)

from . import _C  # noqa: F401  (registers the op schemas and C++ kernels)
from . import ops, reference
from .backend import BACKENDS, backend_available, cpu_isa, get_backend, set_backend
from .formats import BlockSparseMatrix, NMMatrix
from .layouts import NM, BlockSparse
from .nn import SparseLinear, sparsify_
from . import pruning, training  # noqa: E402  (after nn: they build on SparseLinear)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockSparse",
    "BlockSparseMatrix",
    "NM",
    "NMMatrix",
    "SparseLinear",
    "backend_available",
    "cpu_isa",
    "get_backend",
    "ops",
    "pruning",
    "reference",
    "set_backend",
    "sparsify_",
    "training",
]
