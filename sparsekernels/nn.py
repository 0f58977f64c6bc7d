"""``SparseLinear``, a drop-in ``nn.Linear`` with a block-sparse or N:M weight, and ``sparsify_``.

A SparseLinear owns the kept weight values (an ``nn.Parameter``) and the pattern's index tensors
(buffers, saved in the state dict); its forward is one op call (sparsekernels.ops). It follows
``nn.Linear``'s rules: same forward signature (``[..., in_features] -> [..., out_features]``), no
dtype promotion (input and weight dtypes must match), and the same initial scale: every kept weight
and the bias are drawn from U(-1/sqrt(in_features), 1/sqrt(in_features)), as nn.Linear draws
them, on a uniformly random pattern of the requested density.

Transposable N:M (``NM(n, m, transposable=True)``): the mask is N:M along both dimensions, and the
layer also holds W.T's pattern, ``transpose_index`` and ``positions_t`` (sparsekernels/formats/nm.py).
They are derived from ``positions`` whenever the pattern is set (construction, ``set_pattern``,
``load_state_dict``), which also checks that the pattern is transposable, and are not saved: the
state dict is the plain N:M one, loadable into a layer of either kind. The forward calls
``nm_linear_transposable``, whose input gradient is the N:M forward on W.T.
"""

from __future__ import annotations

import math
import operator
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .formats import BlockSparseMatrix, NMMatrix
from .formats.block_sparse import validate_bsr_index, validate_transposed_index
from .formats.nm import validate_positions
from .backend import resolve_backend
from .layouts import NM, BlockSparse, Layout
from .ops import bsr_linear, nm_linear, nm_linear_transposable
from .pruning import magnitude_scores, transposable_nm_mask

__all__ = ["SparseLinear", "sparsify_"]

_BSR_INDEX_NAMES = (
    "block_row_offsets",
    "block_col_indices",
    "block_col_offsets",
    "block_row_indices",
    "block_value_indices",
)

# A transposable N:M layer's index in the order of nm_linear_transposable's arguments.
_TRANSPOSABLE_INDEX_NAMES = ("positions", "transpose_index", "positions_t")

_triton_eager = None


class _FastPathState:
    """What the eager fast path keeps per layer: which tensors its launch plans are for, and the plans.

    ``tensor_ids`` are the ``id()`` of the layer's values, bias and index tensors. An id alone could
    be reused by a new object once the old one is freed, so the state holds weak references whose
    callbacks mark it stale (``alive[0] = False``) when any of those tensors dies: while it is alive,
    equal ids mean the same objects, one tuple comparison per call. ``metadata`` is
    :func:`_tensor_metadata` of those tensors, which ``.data =`` changes while the objects stay.
    ``plans`` maps input signatures to launch plans (sparsekernels/triton/eager.py); a new state (new
    tensors, or new metadata) starts with none.
    """

    __slots__ = ("tensor_ids", "metadata", "alive", "refs", "plans")

    def __init__(self, tensors: tuple, metadata: Optional[tuple] = None) -> None:
        self.tensor_ids = tuple(map(id, tensors))
        self.metadata = metadata
        alive = self.alive = [True]

        def died(_ref, alive=alive) -> None:  # holds the flag, not the state: no reference cycle
            alive[0] = False

        self.refs = tuple(weakref.ref(tensor, died) for tensor in tensors if tensor is not None)
        self.plans: dict = {}


_DTYPE_SHAPE_DEVICE = operator.attrgetter("dtype", "shape", "device")


def _tensor_metadata(values: Tensor, bias: Optional[Tensor], index: tuple) -> tuple:
    """What the op checks of a layer's tensors and a kept launch plan assumes of them, beyond what
    the fast path reads anyway: the dtype, shape and device of the bias and index tensors, and
    whether every tensor is contiguous (the values' dtype and device must be the input's, checked
    per call, and their shape is part of each plan's key: sparsekernels/triton/eager.py).

    Assigning ``.data`` changes these while the tensor object stays (``nn.Module.to`` and
    ``.half()`` do so for parameters; a user may for any tensor), and nothing records such a change
    (the version counter does not move), so it is compared at every fast-path call."""
    others = index if bias is None else (bias, *index)
    return tuple(map(_DTYPE_SHAPE_DEVICE, others)), values.is_contiguous() and all(map(Tensor.is_contiguous, others))


# SparseLinear -> _FastPathState (kept outside the modules, so that pickling and deepcopy of a layer
# never meet it).
_fast_path_state: "weakref.WeakKeyDictionary[SparseLinear, _FastPathState]" = weakref.WeakKeyDictionary()


def triton_eager():
    """sparsekernels.triton.eager, imported on first use (it imports triton)."""
    global _triton_eager
    if _triton_eager is None:
        from .triton import eager

        _triton_eager = eager
    return _triton_eager


def _random_matrix(layout: Layout, shape: tuple[int, int], dtype, device) -> Union[BlockSparseMatrix, NMMatrix]:
    """A uniformly random pattern of ``layout`` (uninitialised values); shapes only on meta."""
    if isinstance(layout, BlockSparse):
        return BlockSparseMatrix.random(shape, layout.block_size, layout.density, dtype=dtype, device=device)
    return NMMatrix.random(shape, layout.n, layout.m, dtype=dtype, device=device, transposable=layout.transposable)


def _check_adoptable(matrix: Union[BlockSparseMatrix, NMMatrix], name: str) -> None:
    """Raise (naming ``name``) unless a layer may adopt ``matrix``: the format's full validation
    (the matrix may have been built with validate=False, converted, or changed in place) and at
    least one kept block (a layer's density is in (0, 1], as ``BlockSparse`` requires)."""
    try:
        matrix.validate()
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name} is not a valid {type(matrix).__name__}: {error}") from None
    if isinstance(matrix, BlockSparseMatrix) and matrix.nnz_blocks == 0:
        raise ValueError(f"{name} must keep at least one block (a layer's density is in (0, 1]), got nnz_blocks=0")


def _check_layout(layout: Layout) -> None:
    if not isinstance(layout, (BlockSparse, NM)):
        raise TypeError(
            f"layout must be sparsekernels.BlockSparse(...) or sparsekernels.NM(...), got {type(layout).__name__}"
        )


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W stored sparse (block-sparse or N:M); a drop-in for ``nn.Linear``.

    Args:
        in_features, out_features: as nn.Linear. Must fit the layout (multiples of block_size, or
            in_features a multiple of m).
        layout: ``BlockSparse(block_size, density)`` or ``NM(n, m)`` (``NM(n, m, transposable=True)``
            for a mask that is N:M along both dimensions: out_features a multiple of m too).
        bias, device, dtype: as nn.Linear.

    Attributes:
        values: the kept weights (``[nnz_blocks, b, b]`` or ``[out, in * n / m]``), a Parameter.
        bias: ``[out_features]`` Parameter or None.
        Index buffers: ``block_row_offsets``, ``block_col_indices``, ``block_col_offsets``,
            ``block_row_indices``, ``block_value_indices`` (block-sparse) or ``positions`` (N:M);
            transposable N:M layers add ``transpose_index`` and ``positions_t`` (not persistent).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: Layout,
        bias: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        _check_layout(layout)
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"{name} must be an int, got {size!r}")
        layout.check_shape(out_features, in_features)
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.layout = layout
        matrix = _random_matrix(layout, (out_features, in_features), dtype, device)
        self._register_matrix(matrix)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=matrix.dtype, device=matrix.device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def _register_matrix(self, matrix: Union[BlockSparseMatrix, NMMatrix]) -> None:
        """Adopt ``matrix``'s tensors as this layer's parameter and buffers (no copies)."""
        self.values = nn.Parameter(matrix.values)
        if isinstance(matrix, BlockSparseMatrix):
            for name, tensor in zip(_BSR_INDEX_NAMES, matrix.index_tensors()):
                self.register_buffer(name, tensor)
        else:
            self.register_buffer("positions", matrix.positions)
            if self.layout.transposable:
                self._set_transposed_pattern(self._transposed_pattern_of(matrix))

    def _transposed_pattern_of(self, matrix: NMMatrix) -> tuple[Tensor, Tensor]:
        """W.T's pattern for ``matrix``; ValueError naming the layout when it is not transposable."""
        try:
            return matrix.transposed_pattern()
        except ValueError as error:
            raise ValueError(f"the pattern does not fit the layout {self.layout}: {error}") from None

    def _set_transposed_pattern(self, pattern: tuple[Tensor, Tensor]) -> None:
        """Store W.T's pattern: in place when the buffers exist (their shapes never change for a
        layer), so optimizers, DDP and compiled graphs keep valid references; derived, not saved.
        Replaced when the device changed (a meta layer loaded with ``assign=True``)."""
        for name, tensor in zip(("transpose_index", "positions_t"), pattern):
            buffer = getattr(self, name, None)
            if (
                isinstance(buffer, Tensor) and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype
                and buffer.device == tensor.device
            ):
                buffer.copy_(tensor)
            else:
                self.register_buffer(name, tensor.to(self.positions.device), persistent=False)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, applied to the kept weights: U(-1/sqrt(in), 1/sqrt(in))."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_matrix(
        cls, matrix: Union[BlockSparseMatrix, NMMatrix], bias: Optional[Tensor] = None, *, transposable: bool = False
    ) -> "SparseLinear":
        """A layer holding ``matrix`` (tensors adopted, not copied) and an optional bias.

        ``transposable=True`` (N:M only): layout ``NM(n, m, transposable=True)``; the matrix's mask
        must be transposable (ValueError otherwise). This is how to build a transposable layer
        from a hand-made mask of any n:m, e.g.
        ``from_matrix(NMMatrix.from_dense(w, 4, 8, mask=mask), transposable=True)``.

        The matrix is validated first (``matrix.validate()``: one built with ``validate=False``,
        converted with ``.to()`` or changed in place is checked like a new one; float32, bfloat16
        or float16 values) and must keep at least one block.
        """
        if not isinstance(matrix, (BlockSparseMatrix, NMMatrix)):
            raise TypeError(f"matrix must be a BlockSparseMatrix or NMMatrix, got {type(matrix).__name__}")
        if transposable and not isinstance(matrix, NMMatrix):
            raise ValueError("transposable=True needs an NMMatrix (block-sparse layers have no transposable layout)")
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor [{matrix.shape[0]}] or None, got {type(bias).__name__}")
        _check_adoptable(matrix, "matrix")
        out_features, in_features = matrix.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        if isinstance(matrix, BlockSparseMatrix):
            layer.layout = BlockSparse(matrix.block_size, matrix.density)
        else:
            layer.layout = NM(matrix.n, matrix.m, transposable=transposable)
            layer.layout.check_shape(out_features, in_features)
        layer._register_matrix(matrix)
        if bias is None:
            layer.register_parameter("bias", None)
        else:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach().to(dtype=matrix.dtype, device=matrix.device).clone())
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, layout: Layout) -> "SparseLinear":
        """Prune an ``nn.Linear`` by magnitude into ``layout`` (block Frobenius norm, or the n
        largest |w| of every group of m). Keeps dtype, device, bias and training mode.

        A transposable N:M layout keeps the largest total |w| of every m x m tile among the tiles
        with n kept per row and per column (``pruning.transposable_nm_mask``: exact, for m in {2, 4});
        for other n:m, build the mask yourself and use ``from_matrix(..., transposable=True)``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_layout(layout)
        weight = linear.weight.detach()
        layout.check_shape(linear.out_features, linear.in_features)
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"linear.weight must be float32, bfloat16 or float16, got {weight.dtype}")
        if weight.device.type == "meta":
            # No data to prune by magnitude: a meta layer of the right shapes, as nn.Linear's own
            # meta construction gives (materialise it with to_empty() + load_state_dict, or
            # load_state_dict(..., assign=True)).
            matrix = _random_matrix(layout, tuple(weight.shape), weight.dtype, weight.device)
        elif isinstance(layout, BlockSparse):
            matrix = BlockSparseMatrix.from_dense(weight.clone(), layout.block_size, layout.density)
        elif layout.transposable:
            try:
                mask = transposable_nm_mask(magnitude_scores(weight), layout.n, layout.m)
            except ValueError as error:  # m >= 8: no exact search (sparsekernels/pruning/transposable.py)
                raise ValueError(
                    f"from_dense cannot prune into {layout} by magnitude ({error}); build a transposable "
                    f"{layout.n}:{layout.m} mask yourself and use SparseLinear.from_matrix("
                    f"NMMatrix.from_dense(weight, {layout.n}, {layout.m}, mask=mask), transposable=True)"
                ) from None
            matrix = NMMatrix.from_dense(weight.clone(), layout.n, layout.m, mask=mask)
        else:
            matrix = NMMatrix.from_dense(weight.clone(), layout.n, layout.m)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = cls.from_matrix(matrix, bias, transposable=isinstance(layout, NM) and layout.transposable)
        layer.layout = layout
        layer.values.requires_grad_(linear.weight.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer.train(linear.training)

    # ------------------------------------------------------------------ views
    @property
    def matrix(self) -> Union[BlockSparseMatrix, NMMatrix]:
        """The weight as a format object sharing this layer's tensors (no copies, no checks)."""
        if isinstance(self.layout, BlockSparse):
            return BlockSparseMatrix(
                self.values,
                self.block_row_offsets,
                self.block_col_indices,
                (self.out_features, self.in_features),
                block_col_offsets=self.block_col_offsets,
                block_row_indices=self.block_row_indices,
                block_value_indices=self.block_value_indices,
                validate=False,
            )
        return NMMatrix(self.values, self.positions, self.layout.n, self.layout.m, validate=False)

    @property
    def density(self) -> float:
        """Fraction of weights kept."""
        return self.matrix.density

    def dense_weight(self) -> Tensor:
        """The masked dense weight ``[out_features, in_features]`` (differentiable in ``values``)."""
        return self.matrix.to_dense()

    def dense_mask(self) -> Tensor:
        """Bool ``[out_features, in_features]``: the pattern (a kept weight may still be 0)."""
        return self.matrix.mask()

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        # Eager calls on the Triton backend, inference or training, skip the op's dispatch and
        # re-checks (the layer's tensors were validated when the pattern was set; with grad mode on
        # the op's own autograd formulas run around the launch): sparsekernels/triton/eager.py.
        if resolve_backend(input.device) == "triton":
            output = self._forward_eager(input)
            if output is not None:
                return output
        if isinstance(self.layout, BlockSparse):
            return bsr_linear(
                input,
                self.values,
                self.block_row_offsets,
                self.block_col_indices,
                self.block_col_offsets,
                self.block_row_indices,
                self.block_value_indices,
                self.bias,
            )
        if self.layout.transposable:
            return nm_linear_transposable(
                input, self.values, self.positions, self.transpose_index, self.positions_t, self.layout.n,
                self.layout.m, self.bias,
            )
        return nm_linear(input, self.values, self.positions, self.layout.n, self.layout.m, self.bias)

    def _forward_eager(self, input: Tensor) -> Optional[Tensor]:
        """The fast path's result, or None where it does not apply. Reads the parameter and buffer
        dicts directly: nn.Module's attribute lookup for them costs about 0.5 µs each."""
        eager = triton_eager()
        parameters, buffers = self._parameters, self._buffers
        values, bias = parameters["values"], parameters["bias"]
        path = eager.path(input, values, bias, self.in_features)
        if path is None:
            return None
        block = isinstance(self.layout, BlockSparse)
        if block:
            names = _BSR_INDEX_NAMES
        else:  # a transposable layout's op has nm_linear's forward and its own backward, on W.T's pattern
            names = _TRANSPOSABLE_INDEX_NAMES if self.layout.transposable else ("positions",)
        index = tuple(buffers[name] for name in names)
        plans = self._fast_path_plans(values, bias, index)
        autograd = path == eager.AUTOGRAD
        if block:
            return eager.bsr_linear(plans, input, values, index, bias, self.out_features, self.in_features, autograd)
        return eager.nm_linear(
            plans, input, values, index, self.layout.n, self.layout.m, bias, self.out_features, self.in_features,
            autograd,
        )

    def _fast_path_plans(self, values: Tensor, bias: Optional[Tensor], index: tuple) -> dict:
        """The fast path's launch plans for these tensors: the layer's, unless one of them is a new
        object (``.to()``, ``load_state_dict``, an assignment) or has a new dtype, shape, device or
        contiguity (through ``.data``), which starts them afresh; the op's metadata checks run
        whenever a plan is built (sparsekernels/triton/eager.py), so such a change gets the op's
        error before any launch."""
        tensors = (values, bias, *index)
        metadata = _tensor_metadata(values, bias, index)
        state = _fast_path_state.get(self)
        if (state is not None and state.alive[0] and state.tensor_ids == tuple(map(id, tensors))
                and state.metadata == metadata):
            return state.plans
        state = _fast_path_state[self] = _FastPathState(tensors, metadata)
        return state.plans

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"layout={self.layout}, density={self.density:.4f}"
        )

    # ------------------------------------------------------------------ pattern updates
    @torch.no_grad()
    def set_pattern(
        self,
        pattern: Union[Tensor, BlockSparseMatrix, NMMatrix],
        values: Optional[Tensor] = None,
    ) -> Tensor:
        """Change which weights are kept; returns where each new kept slot came from.

        Args:
            pattern: a bool mask (block mask ``[out/b, in/b]`` or element mask ``[out, in]`` for
                block-sparse layers; element mask with exactly n of every m for N:M layers), or a
                ``BlockSparseMatrix`` / ``NMMatrix`` of this layer's shape whose values are adopted.
            values: optional dense ``[out, in]`` tensor to read the new kept values from. By
                default a weight kept before and after keeps its value and a newly kept one is 0.

        Returns:
            ``source``, int64 ``[slots]``: for every slot of the new ``values`` (a block for
            block-sparse layers, one element of the flattened values for N:M), the old slot it
            holds, or -1 for a newly kept one. ``sparsekernels.training.remap_optimizer_state``
            uses it to move optimizer state along with the weights.

        When the number of kept weights is unchanged (RigL, SET, any N:M update) the ``values``
        Parameter keeps its identity and shape (its data, and its ``.grad`` if any, are rewritten in
        place) and the index buffers are overwritten in place, so optimizers, DDP buckets and
        compiled graphs stay valid. When it changes (gradual pruning), ``values`` becomes a new
        Parameter and the index buffers whose length changed are replaced: whoever holds the old
        Parameter (an optimizer) must be told, see ``remap_optimizer_state``.

        A transposable N:M layer takes transposable patterns only (ValueError otherwise, and the
        layer is unchanged); its W.T pattern buffers are rewritten in place.

        Everything is checked before the first write (a matrix is validated again, as in
        ``from_matrix``; an empty pattern is refused): a call that raises leaves the layer as it was.
        """
        if self.values.device.type == "meta":
            raise ValueError(
                "set_pattern needs the layer's current pattern, and this layer is on the meta device (no data); "
                "materialise it first, e.g. load_state_dict(state, assign=True)"
            )
        if isinstance(self.layout, BlockSparse):
            old_grid = self.matrix.block_mask()
            new_matrix = self._block_matrix_for(pattern, values)
            new_grid = new_matrix.block_mask()
        else:
            old_grid = self.matrix.mask()
            new_matrix = self._nm_matrix_for(pattern, values)
            new_grid = new_matrix.mask()
            # Checked before anything changes: a non-transposable pattern leaves the layer as it was.
            transposed = self._transposed_pattern_of(new_matrix) if self.layout.transposable else None
        # Slots are numbered in row-major order of the grid, which is the order of ``values``.
        slot_of = torch.full(old_grid.shape, -1, dtype=torch.int64, device=old_grid.device)
        slot_of[old_grid] = torch.arange(int(old_grid.sum()), device=old_grid.device)
        source = slot_of[new_grid]
        if values is None and not isinstance(pattern, (BlockSparseMatrix, NMMatrix)):
            new_matrix.values.copy_(_gather_slots(self.values.detach(), source))
        self._adopt(new_matrix, source)
        if isinstance(self.layout, NM) and self.layout.transposable:
            self._set_transposed_pattern(transposed)
        return source

    def _block_matrix_for(self, pattern, values: Optional[Tensor]) -> BlockSparseMatrix:
        b = self.layout.block_size
        shape = (self.out_features, self.in_features)
        if isinstance(pattern, BlockSparseMatrix):
            if tuple(pattern.shape) != shape or pattern.block_size != b:
                raise ValueError(
                    f"pattern must be a {list(shape)} BlockSparseMatrix with block_size={b}, got {pattern!r}"
                )
            if values is not None:
                raise ValueError("pass values= only with a mask pattern; a BlockSparseMatrix brings its own")
            _check_adoptable(pattern, "pattern")
            return pattern
        if isinstance(pattern, NMMatrix):
            raise TypeError("pattern must be a bool mask or BlockSparseMatrix for a block-sparse layer, got NMMatrix")
        source_weight = self._source_weight(values)
        matrix = BlockSparseMatrix.from_dense(source_weight, b, mask=pattern)
        if matrix.nnz_blocks == 0:
            raise ValueError("pattern must keep at least one block")
        return matrix

    def _nm_matrix_for(self, pattern, values: Optional[Tensor]) -> NMMatrix:
        n, m = self.layout.n, self.layout.m
        if isinstance(pattern, NMMatrix):
            if tuple(pattern.shape) != (self.out_features, self.in_features) or (pattern.n, pattern.m) != (n, m):
                raise ValueError(
                    f"pattern must be a [{self.out_features}, {self.in_features}] {n}:{m} NMMatrix, got {pattern!r}"
                )
            if values is not None:
                raise ValueError("pass values= only with a mask pattern; an NMMatrix brings its own")
            _check_adoptable(pattern, "pattern")
            return pattern
        if isinstance(pattern, BlockSparseMatrix):
            raise TypeError("pattern must be a bool mask or NMMatrix for an N:M layer, got BlockSparseMatrix")
        return NMMatrix.from_dense(self._source_weight(values), n, m, mask=pattern)

    def _source_weight(self, values: Optional[Tensor]) -> Tensor:
        shape = (self.out_features, self.in_features)
        if values is None:
            # Placeholder (set_pattern fills the kept values from the old slots): a zero-stride view,
            # so no dense [out, in] tensor is allocated for a large layer.
            return torch.zeros((), dtype=self.values.dtype, device=self.values.device).expand(shape)
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a dense torch.Tensor {list(shape)}, got {type(values).__name__}")
        if tuple(values.shape) != shape:
            raise ValueError(f"values must have shape {list(shape)}, got {list(values.shape)}")
        return values.detach().to(dtype=self.values.dtype, device=self.values.device)

    def _adopt(self, matrix: Union[BlockSparseMatrix, NMMatrix], source: Tensor) -> None:
        """Take ``matrix``'s pattern and values: in place where shapes allow, else by replacement.

        ``matrix`` is valid (checked by the caller), and nothing here can fail after the first
        write: the new layout is built before anything changes."""
        new_values = matrix.values.to(dtype=self.values.dtype, device=self.values.device)
        if isinstance(matrix, BlockSparseMatrix):
            new_layout = BlockSparse(self.layout.block_size, matrix.density)
            named = tuple(zip(_BSR_INDEX_NAMES, matrix.index_tensors()))
        else:
            new_layout = self.layout
            named = (("positions", matrix.positions),)
        named = tuple((name, tensor.to(getattr(self, name).device)) for name, tensor in named)
        if new_values.shape == self.values.shape:
            self.values.copy_(new_values)
            if self.values.grad is not None:
                self.values.grad.copy_(_gather_slots(self.values.grad, source))
        else:
            self.values = nn.Parameter(new_values.clone(), requires_grad=self.values.requires_grad)
        self.layout = new_layout
        for name, tensor in named:
            buffer = getattr(self, name)
            if buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
                buffer.copy_(tensor)
            else:
                setattr(self, name, tensor.clone())

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved pattern may hold a different number of kept blocks than this layer (a gradual
        # pruning schedule changes it): resize values and the index buffers to the saved shapes
        # before the default copy, then check the loaded pattern once.
        names = ("values",) + (_BSR_INDEX_NAMES if isinstance(self.layout, BlockSparse) else ("positions",))
        index_dtypes = (torch.int32, torch.int64) if isinstance(self.layout, BlockSparse) else (torch.uint8,)
        for name in names[1:]:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.dtype not in index_dtypes:
                # The default loader would cast it (a float or wider int index loses or wraps entries).
                error_msgs.append(
                    f"invalid sparse pattern for {prefix or 'SparseLinear'}: {name} must be "
                    f"{' or '.join(str(dtype) for dtype in index_dtypes)}, got {saved.dtype}"
                )
                return
        # The layer as it is now, put back if loading its entries fails in any way (torch's own
        # loader reports a size mismatch after it has already copied the other entries in place):
        # a failed load leaves the layer exactly as it was, pattern and values.
        previous = {name: getattr(self, name) for name in names + ("bias",)}
        layout = self.layout
        for name in names:
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            # An index keeps its saved dtype (an int64 index copied into int32 would wrap).
            dtype = current.dtype if name == "values" or not isinstance(saved, Tensor) else saved.dtype
            if isinstance(saved, Tensor) and (saved.shape != current.shape or dtype != current.dtype):
                if name == "values" and saved.dim() != current.dim():
                    continue  # let the default loader report the mismatch
                resized = torch.empty(saved.shape, dtype=dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(resized, requires_grad=current.requires_grad)
                else:
                    setattr(self, name, resized)
        # What the default loader may overwrite in place: the tensors that were not replaced above
        # (with assign=True it replaces them instead, leaving the old ones untouched).
        assign = local_metadata.get("assign_to_params_buffers", False)
        contents = {
            name: tensor.detach().clone() for name, tensor in previous.items()
            if tensor is not None and getattr(self, name) is tensor and not assign
        }
        errors, missing = len(error_msgs), len(missing_keys)
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            # A strict load that misses one of this layer's entries fails too (torch raises after
            # every module has loaded): the others must not stay half-loaded.
            failed = len(error_msgs) > errors or (strict and len(missing_keys) > missing)
            if not failed:
                try:
                    self._validate_pattern()
                    if isinstance(self.layout, NM) and self.layout.transposable:
                        self._set_transposed_pattern(self._transposed_pattern_of(self.matrix))
                except (TypeError, ValueError) as error:
                    error_msgs.append(f"invalid sparse pattern for {prefix or 'SparseLinear'}: {error}")
                    failed = True
        except BaseException:
            self._restore(previous, contents, layout)
            raise
        if failed:
            self._restore(previous, contents, layout)
        elif isinstance(layout, BlockSparse) and self.values.shape[0] != previous["values"].shape[0]:
            self.layout = BlockSparse(layout.block_size, self.matrix.density)  # the loaded block count

    @torch.no_grad()
    def _restore(self, previous: dict, contents: dict, layout: Layout) -> None:
        """Put back the tensors of ``previous`` (by identity, so optimizers keep theirs) and the
        ``contents`` loaded into them in place, and ``layout``."""
        for name, tensor in previous.items():
            if tensor is None:
                continue
            if getattr(self, name) is not tensor:
                setattr(self, name, tensor)
            if name in contents:
                tensor.copy_(contents[name])
        self.layout = layout

    def _validate_pattern(self) -> None:
        if isinstance(self.layout, BlockSparse):
            b = self.layout.block_size
            if self.values.dim() != 3 or tuple(self.values.shape[1:]) != (b, b):
                raise ValueError(f"values must have shape [nnz, {b}, {b}], got {tuple(self.values.shape)}")
            if self.values.shape[0] == 0:
                raise ValueError("the pattern must keep at least one block (a layer's density is in (0, 1]), got nnz=0")
            index_dtype = self.block_row_offsets.dtype
            for name in _BSR_INDEX_NAMES:
                if getattr(self, name).dtype != index_dtype:
                    raise TypeError(f"{name} must have the dtype of block_row_offsets ({index_dtype})")
            validate_bsr_index(
                self.block_row_offsets, self.block_col_indices, self.out_features // b, self.in_features // b,
                self.values.shape[0],
            )
            validate_transposed_index(
                self.block_row_offsets, self.block_col_indices, self.block_col_offsets, self.block_row_indices,
                self.block_value_indices, self.in_features // b,
            )
        else:
            expected = (self.out_features, self.in_features // self.layout.m * self.layout.n)
            if tuple(self.values.shape) != expected:
                raise ValueError(f"values must have shape {list(expected)}, got {list(self.values.shape)}")
            validate_positions(self.positions, self.out_features, self.values.shape[1], self.layout.n,
                               self.layout.m)


def _gather_slots(old: Tensor, source: Tensor) -> Tensor:
    """``old`` moved to new slots: slot i of the result is old slot ``source[i]``, or 0 where -1.

    A slot is a block of a block-sparse ``values[nnz, b, b]`` (3-D) or one element of an N:M
    ``values[out, kept]`` (2-D; its size never changes, so the result keeps ``old``'s shape).
    """
    blocks = old.dim() == 3
    flat = old.reshape(old.shape[0], -1) if blocks else old.reshape(-1, 1)
    kept = source >= 0
    out = flat.new_zeros((source.shape[0], flat.shape[1]))
    out[kept] = flat[source[kept]]
    return out.reshape(source.shape[0], *old.shape[1:]) if blocks else out.reshape(old.shape)


LayoutChoice = Union[Layout, Callable[[nn.Linear, str], Optional[Layout]]]


def sparsify_(
    model: nn.Module,
    layout: LayoutChoice,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules of ``model`` by magnitude-pruned ``SparseLinear``, in place.

    Args:
        model: any module; returned for chaining.
        layout: a layout for every swapped layer, or a callable ``(linear, fqn) -> layout | None``
            choosing one per layer (None keeps that layer dense).
        filter_fn: ``(module, fqn) -> bool``; only layers it accepts are swapped (default: all).

    A layer whose shape does not fit its layout raises ValueError naming the layer (a dtype other
    than float32/bfloat16/float16: TypeError naming it); exclude it with ``filter_fn``.
    ``nn.MultiheadAttention``'s output projection is left alone (it reads ``.weight`` directly).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(layout):
        _check_layout(layout)
    swaps = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        layer_layout = layout(module, fqn) if callable(layout) else layout
        if layer_layout is None:
            continue
        try:
            swaps.append((fqn, SparseLinear.from_dense(module, layer_layout)))
        except (TypeError, ValueError) as error:  # the same type, naming the layer
            raise type(error)(f"cannot sparsify {fqn or 'the model'} ({module}): {error}") from error
    for fqn, sparse in swaps:
        if not fqn:
            raise ValueError("model is itself an nn.Linear: use SparseLinear.from_dense(model, layout)")
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, sparse)
    return model
