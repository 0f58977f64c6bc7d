"""Who computes a cell: sparsekernels and its peers, behind one interface.

An :class:`Implementation` is built once per weight (its constructor converts the masked dense weight
into whatever it needs, untimed) and then runs the cell's op on the cell's inputs. Results come back
in a canonical form, so that one reference checks them all: ``(y,)`` for the forward, ``(dx,)`` for
the input gradient, ``(dW,)`` for the weight gradient as a dense ``[out, in]`` tensor that is zero off
the pattern, and ``(y, dx, dW)`` for a training step. Converting to that form is not timed.

Implementations, in table order:

* ``dense``: ``F.linear`` on the masked dense weight. The baseline (1.00x), always measured.
* ``sparsekernels[<backend>]``: this library, through its public front ends and raw ops, one column
  per backend measured (``--backends``; by default every backend that runs on the device: ``cpu`` on
  CPU, ``triton`` and ``cuda`` on CUDA). Each column forces its backend with
  ``sparsekernels.set_backend`` around its weight conversion and its measurements, and restores the
  previous choice after, so that on CUDA both the Triton kernels and the CUDA C++ kernels (decode
  kernels, CUTLASS 2:4 GEMMs) are timed on their own. ``--backends auto`` adds the library's own
  choice (on CUDA the forward dispatch among the Triton kernel, the CUDA op and dense ``F.linear``,
  which a forced backend does not run: a forced ``triton`` excludes the CUDA op). For a
  transposable N:M layout (``2:4T``) the forward and training step run ``nm_linear_transposable`` and
  the input gradient is what that op's backward does (``transposable_grad_input``): a gather of W.T's
  values, then the ``nm_linear`` front end on W.T (the N:M forward kernels of the column's backend),
  or on the ``cpu`` backend the C++ ``nm_linear_grad_input``. The ``reference`` backend has no
  backward ops of its own: its input- and weight-gradient cells are n/a.
* ``torch_bsr``: torch's BSR tensors (``to_sparse_bsr``) in ``F.linear``; block layouts.
* ``torch_semi_cusparselt`` / ``torch_semi_cutlass``: ``to_sparse_semi_structured`` with either
  backend (``SparseSemiStructuredTensor._FORCE_CUTLASS``); 2:4 on CUDA only.
* ``stk``: Stanford's block-sparse toolkit, when it is installed; block layouts on CUDA.

When an implementation does not provide an op or a layout, the cell shows "n/a" (it is not an
error); when it raises, the runner records the error in that cell and goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from functools import cached_property
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import sparsekernels
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, reference
from sparsekernels.layouts import Layout
from sparsekernels.ops.nm_transposable import transposable_grad_input

from .cases import Op
from .workloads import Inputs, SparseWeight

BASELINE = "dense"
OURS = "sparsekernels"  # the library; its columns are named ``sparsekernels[<backend>]``
# The library's backends that a column can force: cpu, cuda, triton, reference.
# "auto" is the library's own choice per device (on CUDA: the forward dispatch among the Triton
# kernel, the CUDA op and dense F.linear), as a user gets it; a column of its own when asked for.
SPARSEKERNELS_BACKENDS = sparsekernels.BACKENDS

Outputs = tuple[Tensor, ...]


class Implementation:
    """One way of computing a cell, bound to one weight.

    Subclasses set ``name`` and ``ops``, convert the weight in ``__init__``, and define the methods of
    the ops they list; ``train_step`` comes for free from ``differentiable_forward``.
    """

    name: ClassVar[str]
    ops: ClassVar[frozenset[Op]]

    def __init__(self, weight: SparseWeight) -> None:
        self.weight = weight

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        """Why this implementation cannot run on ``device`` at all (None when it can)."""
        return None

    @classmethod
    def unsupported_reason(cls, layout: Layout) -> Optional[str]:
        """Why this implementation has nothing for ``layout`` (None when it does)."""
        return None

    @classmethod
    def forced(cls) -> ContextManager[None]:
        """What the runner enters around converting the weight and around each measurement (the
        backend switch of a sparsekernels column; nothing for the others)."""
        return contextlib.nullcontext()

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def grad_input(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError

    def grad_weight(self, grad_output: Tensor, x: Tensor) -> object:
        """The weight gradient in the implementation's own storage (see ``weight_grad_as_dense``)."""
        raise NotImplementedError

    def weight_grad_as_dense(self, grad: object) -> Tensor:
        """A ``grad_weight`` result as a dense ``[out, in]`` tensor, zero off the pattern."""
        raise NotImplementedError

    def differentiable_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, leaf)``: the forward, differentiable in ``x`` and in ``leaf``, the stored weight."""
        raise NotImplementedError

    def train_step(self, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor, object]:
        """Forward, then backward through autograd: ``(y, dx, weight gradient)``."""
        x = x.detach().requires_grad_()
        y, weight_leaf = self.differentiable_forward(x)
        grad_x, grad_weight = torch.autograd.grad(y, (x, weight_leaf), grad_output)
        return y.detach(), grad_x, grad_weight

    def runner(self, op: Op, inputs: Inputs) -> tuple[Callable[[], object], Callable[[object], Outputs]]:
        """``(run, canonical)``: ``run()`` does the op (this is what is timed) and ``canonical``
        turns its result into the form the correctness check expects."""
        x, grad_output = inputs.x, inputs.grad_output
        if op is Op.FORWARD:
            return lambda: self.forward(x), lambda y: (y,)
        if op is Op.GRAD_INPUT:
            return lambda: self.grad_input(grad_output), lambda grad_x: (grad_x,)
        if op is Op.GRAD_WEIGHT:
            return lambda: self.grad_weight(grad_output, x), lambda grad: (self.weight_grad_as_dense(grad),)
        return (
            lambda: self.train_step(x, grad_output),
            lambda result: (result[0], result[1], self.weight_grad_as_dense(result[2])),
        )


class Dense(Implementation):
    """``F.linear`` on the masked dense weight; its backward is two dense matmuls (full dW)."""

    name = BASELINE
    ops = frozenset(Op)

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__(weight)
        self.dense = weight.masked_dense
        self.leaf = weight.masked_dense.detach().requires_grad_()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense)

    def grad_input(self, grad_output: Tensor) -> Tensor:
        return grad_output @ self.dense

    def grad_weight(self, grad_output: Tensor, x: Tensor) -> Tensor:
        return grad_output.t() @ x

    def weight_grad_as_dense(self, grad: Tensor) -> Tensor:
        return grad.masked_fill(~self.weight.mask, 0)

    def differentiable_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.linear(x, self.leaf), self.leaf


def backend_column(backend: str) -> str:
    """The column (implementation name) of sparsekernels forced to ``backend``: ``sparsekernels[cuda]``."""
    return f"{OURS}[{backend}]"


def is_ours(name: str) -> bool:
    """Whether an implementation name is a sparsekernels column (a failure there fails the run)."""
    return name == OURS or (name.startswith(f"{OURS}[") and name.endswith("]"))


def results_by_column(cell: dict[str, Any], environment: dict[str, Any]) -> dict[str, Any]:
    """A stored cell's results by implementation, with the single ``sparsekernels`` column of a file
    written before ``--backends`` named after the backend that ran it, ``sparsekernels[<backend>]``, so
    that ``compare`` matches it with the same backend's column of a newer file. That backend is the
    file's ``environment.sparsekernels_backend`` (what the library resolved for the device, a forced
    SPARSEKERNELS_BACKEND included); a file without it is taken as ``cpu`` on CPU and left as is on
    CUDA (the choice depended on the build: nothing matches rather than a wrong pair)."""
    results = cell["results"]
    if OURS not in results:
        return results
    backend = environment.get("sparsekernels_backend") or ("cpu" if environment.get("device") == "cpu" else None)
    if backend is None or backend_column(backend) in results:
        return results
    return {(backend_column(backend) if name == OURS else name): value for name, value in results.items()}


def backend_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why sparsekernels' ``backend`` cannot run ops on ``device`` tensors here (None when it can)."""
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs CPU tensors only, not {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device.type}"
    if backend == "cuda" and not sparsekernels.backend_available("cuda"):
        return "this build of sparsekernels has no CUDA kernels"
    if backend == "triton":
        from sparsekernels import triton as triton_backend

        if device.type == "cpu" and not triton_backend._interpreting():
            return "the Triton kernels run CPU tensors only under TRITON_INTERPRET=1"
        return triton_backend.unavailable_reason()
    return None


def default_backends(device: torch.device) -> list[str]:
    """The backends ``--backends`` measures by default: every one that runs on ``device`` (``cpu`` on
    CPU; ``triton`` and ``cuda`` on CUDA, those built), or the one forced before the run started
    (``SPARSEKERNELS_BACKEND``), which then stays the only one, as before ``--backends`` existed."""
    forced = sparsekernels.get_backend()
    if forced != "auto":
        return [forced]
    if device.type != "cuda":
        return ["cpu"]
    built = [backend for backend in ("triton", "cuda") if backend_unavailable_reason(backend, device) is None]
    return built or ["reference"]


@contextlib.contextmanager
def forced_backend(backend: str) -> Iterator[None]:
    """``sparsekernels.set_backend(backend)`` for the duration, then the previous choice again."""
    previous = sparsekernels.get_backend()
    sparsekernels.set_backend(backend)
    try:
        yield
    finally:
        sparsekernels.set_backend(previous)


class Sparsekernels(Implementation):
    """This library: ``sparsekernels.ops`` front ends forward, the backend's raw ops backward.

    This class runs on whichever backend the library picks for the device (name ``sparsekernels``);
    :meth:`for_backend` derives the column of one forced backend, ``sparsekernels[<backend>]``.
    """

    name = OURS
    ops = frozenset(Op)
    backend: ClassVar[Optional[str]] = None  # forced around every call; None: the library's own choice

    @classmethod
    def for_backend(cls, backend: str) -> type[Sparsekernels]:
        """A subclass whose calls all run with ``backend`` forced (``sparsekernels.set_backend``)."""
        if backend not in SPARSEKERNELS_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SPARSEKERNELS_BACKENDS)}, got {backend!r}")
        # The reference backend is forward math only: there are no raw backward ops to time.
        ops = cls.ops & {Op.FORWARD, Op.TRAIN_STEP} if backend == "reference" else cls.ops
        attributes = {"name": backend_column(backend), "backend": backend, "ops": ops}
        return type(f"{cls.__name__}[{backend}]", (cls,), attributes)

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None if cls.backend is None else backend_unavailable_reason(cls.backend, device)

    @classmethod
    def forced(cls) -> ContextManager[None]:
        return contextlib.nullcontext() if cls.backend is None else forced_backend(cls.backend)

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__(weight)
        self.matrix = weight.matrix
        self.is_block = isinstance(weight.matrix, BlockSparseMatrix)
        self.leaf = weight.matrix.values.detach().requires_grad_()
        # W.T's pattern, derived once per weight (untimed), as SparseLinear does when a pattern is set.
        transposable = isinstance(weight.layout, NM) and weight.layout.transposable
        self.transposed = weight.matrix.transposed_pattern() if transposable else None

    def _linear(self, x: Tensor, values: Tensor) -> Tensor:
        matrix = self.matrix
        if self.is_block:
            return sparsekernels.ops.bsr_linear(x, values, *matrix.index_tensors())
        if self.transposed is not None:
            return sparsekernels.ops.nm_linear_transposable(x, values, matrix.positions, *self.transposed, matrix.n,
                                                            matrix.m)
        return sparsekernels.ops.nm_linear(x, values, matrix.positions, matrix.n, matrix.m)

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x, self.matrix.values)

    @staticmethod
    def _backward_ops(device: torch.device):
        """The raw backward ops of the backend that the front ends use on ``device``: the Triton ops
        (``torch.ops.sparsekernels_triton``) when it resolves to ``"triton"``, else the C++ ones."""
        if sparsekernels.backend.resolve_backend(device) == "triton":
            from sparsekernels.triton import ops  # noqa: F401  (registers torch.ops.sparsekernels_triton)

            return torch.ops.sparsekernels_triton
        return torch.ops.sparsekernels

    def grad_input(self, grad_output: Tensor) -> Tensor:
        matrix = self.matrix
        if self.transposed is not None:  # the backward of nm_linear_transposable
            return transposable_grad_input(grad_output, matrix.values, matrix.positions, *self.transposed, matrix.n,
                                           matrix.m)
        ops = self._backward_ops(grad_output.device)
        if self.is_block:
            return ops.bsr_linear_grad_input(grad_output, matrix.values, *matrix.index_tensors())
        return ops.nm_linear_grad_input(grad_output, matrix.values, matrix.positions, matrix.n, matrix.m)

    def grad_weight(self, grad_output: Tensor, x: Tensor) -> Tensor:
        matrix = self.matrix
        ops = self._backward_ops(x.device)
        if self.is_block:
            return ops.bsr_linear_grad_values(grad_output, x, *matrix.index_tensors(), matrix.block_size)
        return ops.nm_linear_grad_values(grad_output, x, matrix.positions, matrix.n, matrix.m)

    def weight_grad_as_dense(self, grad: Tensor) -> Tensor:
        matrix = self.matrix
        if self.is_block:
            return reference.bsr_to_dense(grad, matrix.block_row_offsets, matrix.block_col_indices, *matrix.shape)
        return reference.nm_to_dense(grad, matrix.positions, matrix.n, matrix.m)

    def differentiable_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._linear(x, self.leaf), self.leaf


class TorchBsr(Implementation):
    """torch's BSR tensors in ``F.linear``; the input gradient uses a BSR copy of ``W.T``."""

    name = "torch_bsr"
    ops = frozenset({Op.FORWARD, Op.GRAD_INPUT})

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__(weight)
        self.block_size = weight.layout.block_size
        self.bsr = self._to_bsr(weight.masked_dense)

    @classmethod
    def unsupported_reason(cls, layout: Layout) -> Optional[str]:
        return None if isinstance(layout, BlockSparse) else "torch BSR needs a block-sparse layout"

    def _to_bsr(self, dense: Tensor) -> Tensor:
        with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return dense.to_sparse_bsr((self.block_size, self.block_size))

    @cached_property
    def transposed_bsr(self) -> Tensor:
        return self._to_bsr(self.weight.masked_dense.t().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.bsr)

    def grad_input(self, grad_output: Tensor) -> Tensor:
        return F.linear(grad_output, self.transposed_bsr)  # dy @ W == dy @ (W.T).T


class _TorchSemiStructured(Implementation):
    """torch's 2:4 semi-structured tensors in ``F.linear`` (forward only)."""

    ops = frozenset({Op.FORWARD})
    force_cutlass: ClassVar[bool]

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__(weight)
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = self.force_cutlass
        try:
            self.semi_structured = to_sparse_semi_structured(weight.masked_dense)
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        return None if device.type == "cuda" else "torch semi-structured sparsity needs CUDA"

    @classmethod
    def unsupported_reason(cls, layout: Layout) -> Optional[str]:
        is_24 = isinstance(layout, NM) and (layout.n, layout.m) == (2, 4)  # transposable or not
        return None if is_24 else "torch semi-structured sparsity is 2:4 only"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.semi_structured)


class TorchSemiCusparselt(_TorchSemiStructured):
    name = "torch_semi_cusparselt"
    force_cutlass = False

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if reason := super().unavailable_reason(device):
            return reason
        # Without cuSPARSELt, torch silently falls back to CUTLASS: that would be the other peer.
        return None if torch.backends.cusparselt.is_available() else "this torch build has no cuSPARSELt"


class TorchSemiCutlass(_TorchSemiStructured):
    name = "torch_semi_cutlass"
    force_cutlass = True


class Stk(Implementation):
    """stk (github.com/stanford-futuredata/stk): ``y = dds(x, W.T)`` with W an ``stk.Matrix``."""

    name = "stk"
    ops = frozenset({Op.FORWARD})

    def __init__(self, weight: SparseWeight) -> None:
        super().__init__(weight)
        import stk

        self.stk = stk
        self.transposed = stk.ops.to_sparse(weight.masked_dense, weight.layout.block_size).t()

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> Optional[str]:
        if importlib.util.find_spec("stk") is None:
            return "stk is not installed"
        return None if device.type == "cuda" else "stk needs CUDA"

    @classmethod
    def unsupported_reason(cls, layout: Layout) -> Optional[str]:
        return None if isinstance(layout, BlockSparse) else "stk needs a block-sparse layout"

    def forward(self, x: Tensor) -> Tensor:
        return self.stk.ops.dds(x, self.transposed)


IMPLEMENTATIONS: dict[str, type[Implementation]] = {
    implementation.name: implementation
    for implementation in (Dense, Sparsekernels, TorchBsr, TorchSemiCusparselt, TorchSemiCutlass, Stk)
}
PEERS = tuple(name for name in IMPLEMENTATIONS if name != OURS)


def sparsekernels_columns(backends: list[str]) -> list[type[Implementation]]:
    """One sparsekernels implementation per backend, derived from ``IMPLEMENTATIONS[OURS]``."""
    return [IMPLEMENTATIONS[OURS].for_backend(backend) for backend in dict.fromkeys(backends)]


def available_peers(device: torch.device) -> list[str]:
    """The peers that can run on ``device``: the default of ``--peers``."""
    return [name for name in PEERS if IMPLEMENTATIONS[name].unavailable_reason(device) is None]
