"""Test case builders and tolerances shared by the test modules.

Every expectation is computed independently of the code under test: a random dense weight W and a
mask are drawn first, the sparse format is built from them, and the expected results come from
dense float32 PyTorch on ``W * mask`` (forward, and autograd for the gradients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekernels
from sparsekernels import NM, BlockSparse, BlockSparseMatrix, NMMatrix

# Layouts of the sweep: every block size at low, middle and full density, and the N:M patterns.
BLOCK_LAYOUTS = [
    BlockSparse(16, 0.05),
    BlockSparse(16, 0.5),
    BlockSparse(32, 0.1),
    BlockSparse(32, 1.0),
    BlockSparse(64, 0.25),
    BlockSparse(128, 0.5),
]
NM_LAYOUTS = [NM(1, 2), NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8)]
LAYOUTS = BLOCK_LAYOUTS + NM_LAYOUTS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCH_SIZES = [0, 1, 7, 64, 300]

# Relative tolerance by dtype, applied against the scale of the expected tensor: the kernels and the
# reference both accumulate in float32 and differ only by summation order and the final rounding.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def layout_id(layout) -> str:
    if isinstance(layout, BlockSparse):
        return f"block{layout.block_size}-d{layout.density}"
    return f"nm{layout.n}:{layout.m}" + ("T" if getattr(layout, "transposable", False) else "")


def features_for(layout) -> tuple[int, int]:
    """(out_features, in_features) that fit the layout and are not powers of two where possible."""
    if isinstance(layout, BlockSparse):
        return 3 * layout.block_size, 5 * layout.block_size
    return 24, 7 * layout.m * 2


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    tolerance = TOLERANCE[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tolerance * scale, rtol=tolerance, msg=lambda m: f"{what}: {m}"
    )


@dataclass
class SparseCase:
    """A sparse weight together with the dense weight and mask it was built from."""

    matrix: Union[BlockSparseMatrix, NMMatrix]
    dense: Tensor  # W, unmasked
    mask: Tensor  # bool [out, in]

    @property
    def masked(self) -> Tensor:
        return self.dense * self.mask


def random_mask(layout, out_features: int, in_features: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random element mask of the layout, with uneven block rows (one empty, one full if possible)."""
    if isinstance(layout, BlockSparse):
        b = layout.block_size
        rows, cols = out_features // b, in_features // b
        block_mask = torch.rand(rows, cols, generator=generator) < layout.density
        if layout.density < 1.0 and rows >= 3:
            block_mask[0] = False  # an empty block row
            block_mask[1] = True  # a fully dense block row
        if not block_mask.any():
            block_mask[-1, -1] = True
        return block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    groups = torch.rand(out_features, in_features // layout.m, layout.m, generator=generator)
    keep = groups.argsort(dim=-1)[..., : layout.n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


def make_case(layout, dtype=torch.float32, device="cpu", features: Optional[tuple[int, int]] = None) -> SparseCase:
    out_features, in_features = features or features_for(layout)
    dense = torch.randn(out_features, in_features, dtype=torch.float32).to(dtype)
    mask = random_mask(layout, out_features, in_features)
    if isinstance(layout, BlockSparse):
        matrix = BlockSparseMatrix.from_dense(dense, layout.block_size, mask=mask)
    else:
        matrix = NMMatrix.from_dense(dense, layout.n, layout.m, mask=mask)
    return SparseCase(matrix.to(device), dense.to(device), mask.to(device))


def kept_values_of(case: SparseCase, dense_grad: Tensor) -> Tensor:
    """Pick the entries of a dense [out, in] gradient at the kept positions, in values' layout."""
    matrix = case.matrix
    if isinstance(matrix, NMMatrix):
        return dense_grad.gather(1, matrix.column_indices())
    b = matrix.block_size
    counts = (matrix.block_row_offsets[1:] - matrix.block_row_offsets[:-1]).long()
    block_rows = torch.repeat_interleave(torch.arange(matrix.n_block_rows, device=dense_grad.device), counts)
    blocks = dense_grad.reshape(matrix.n_block_rows, b, matrix.n_block_cols, b).permute(0, 2, 1, 3)
    return blocks[block_rows, matrix.block_col_indices.long()]


def sparse_linear(matrix, input: Tensor, values: Tensor, bias: Optional[Tensor] = None, ops=None, **kwargs) -> Tensor:
    """The linear op of ``matrix``'s format, with ``values`` standing in for the matrix's own:
    ``bsr_linear`` or ``nm_linear`` of ``ops``, ``sparsekernels.ops`` by default (or another module
    with both, such as ``sparsekernels.triton``; ``kwargs`` go to the op)."""
    ops = sparsekernels.ops if ops is None else ops
    if isinstance(matrix, BlockSparseMatrix):
        return ops.bsr_linear(input, values, *matrix.index_tensors(), bias, **kwargs)
    return ops.nm_linear(input, values, matrix.positions, matrix.n, matrix.m, bias, **kwargs)


def opcheck_samples(device="cpu", with_bias_grad: bool = True) -> list[tuple[str, tuple]]:
    """(op name, args) for ``torch.library.opcheck``: every linear op of both layouts, bias on and
    off, 2-D and 3-D inputs, and ``linear_bias_grad`` when ``with_bias_grad`` (the Triton namespace
    has no op of its own for it)."""
    samples = []
    for layout in (BlockSparse(16, 0.5), NM(2, 4)):
        case = make_case(layout, torch.float32, device)
        matrix = case.matrix
        out_features, in_features = case.dense.shape
        for leading in ((5,), (2, 3)):
            input = torch.randn(*leading, in_features, device=device, requires_grad=True)
            grad_output = torch.randn(*leading, out_features, device=device)
            values = matrix.values.detach().clone().requires_grad_()
            bias = torch.randn(out_features, device=device, requires_grad=True)
            if isinstance(matrix, BlockSparseMatrix):
                index = matrix.index_tensors()
                samples += [
                    ("bsr_linear", (input, values, *index, bias)),
                    ("bsr_linear", (input, values, *index, None)),
                    ("bsr_linear_grad_input", (grad_output, values.detach(), *index)),
                    ("bsr_linear_grad_values", (grad_output, input.detach(), *index, matrix.block_size)),
                ]
            else:
                nm_args = (matrix.positions, matrix.n, matrix.m)
                samples += [
                    ("nm_linear", (input, values, *nm_args, bias)),
                    ("nm_linear", (input, values, *nm_args, None)),
                    ("nm_linear_grad_input", (grad_output, values.detach(), *nm_args)),
                    ("nm_linear_grad_values", (grad_output, input.detach(), *nm_args)),
                ]
            if with_bias_grad:
                samples.append(("linear_bias_grad", (grad_output,)))
    return samples


def check_op_against_dense(case: SparseCase, op, dtype, leading_shape, with_bias, device="cpu",
                           noncontiguous=False, backward=True) -> None:
    """``op(input, values, bias)`` (a linear on ``case``'s weight with ``values`` as its kept values):
    the forward and (unless ``backward=False``, then nothing requires grad) the gradients of input,
    values and bias against dense float32 autograd on the masked weight."""
    out_features, in_features = case.dense.shape
    if noncontiguous:  # every other column of a wider tensor: strided last dim
        input = torch.randn(*leading_shape, 2 * in_features, device=device).to(dtype)[..., ::2]
        assert not input.is_contiguous()
    else:
        input = torch.randn(*leading_shape, in_features, device=device).to(dtype)
    input.requires_grad_(backward)
    values = case.matrix.values.detach().clone().requires_grad_(backward)
    bias = torch.randn(out_features, device=device).to(dtype).requires_grad_(backward) if with_bias else None

    output = op(input, values, bias)

    input_ref = input.detach().float().requires_grad_()
    weight_ref = case.masked.float().requires_grad_()
    bias_ref = bias.detach().float().requires_grad_() if with_bias else None
    output_ref = F.linear(input_ref, weight_ref, bias_ref)
    assert output.shape == output_ref.shape
    assert output.dtype == dtype and output.device == input.device
    assert_close(output, output_ref, dtype, "output")
    if not backward:
        return

    grad_output = torch.randn(output_ref.shape, device=device).to(dtype)
    output.backward(grad_output)
    output_ref.backward(grad_output.float())
    assert input.grad.dtype == dtype and values.grad.dtype == dtype
    assert_close(input.grad, input_ref.grad, dtype, "grad input")
    assert_close(values.grad, kept_values_of(case, weight_ref.grad), dtype, "grad values")
    if with_bias:
        assert_close(bias.grad, bias_ref.grad, dtype, "grad bias")


def misaligned(tensor: Tensor) -> Tensor:
    """``tensor`` as a contiguous tensor whose data starts one element into its storage, so not
    16-byte aligned (a contiguous view at an odd offset, as ``torch.empty(n + 1)[1:]``): a kernel
    that needs aligned pointers must copy it. Differentiable, and the gradient that reaches the op
    producing ``tensor`` is misaligned the same way (the backward of ``cat`` is a view at offset 1)."""
    flat = torch.cat([tensor.new_zeros(1), tensor.reshape(-1)])
    return flat[1:].view(tensor.shape)


class OpRecorder(TorchDispatchMode):
    """A dispatch mode that runs every op it sees and records its name (``names``), to tell which ops
    a call reached."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------ Triton test modules
def triton_device() -> str:
    """Where a Triton test module runs the kernels: "cuda" on a GPU, else "cpu" under the Triton
    interpreter, for which it sets TRITON_INTERPRET. Call it at module level before any kernel module
    is imported: triton.jit reads TRITON_INTERPRET when a kernel is defined (sparsekernels/triton)."""
    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def skip_without_triton():
    """A mark that skips a Triton test module where the kernels cannot run (after ``triton_device()``).
    Modules that test the kernels themselves add ``pytest.mark.usefixtures("triton_backend")``
    (tests/conftest.py)."""
    reason = sparsekernels.triton.unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


# ------------------------------------------------------------------ tuner stand-ins (Triton tests)
def resolve_heuristic(heuristic):
    """The Config of a launcher's heuristic (a Config, or a callable returning one). Imported lazily:
    the Triton test modules set TRITON_INTERPRET before the kernels are first imported."""
    from sparsekernels.triton.autotune import resolve_heuristic

    return resolve_heuristic(heuristic)


class HeuristicOnly:
    """Stands in for the tuner: always the launcher's heuristic configuration."""

    def choose(self, key, device, tensors, heuristic, candidates, run):
        return resolve_heuristic(heuristic)


class KeyRecorder:
    """Stands in for the tuner: records every tuning key, then gives the heuristic configuration."""

    def __init__(self):
        self.keys = []

    def choose(self, key, device, tensors, heuristic, candidates, run):
        self.keys.append(key)
        return resolve_heuristic(heuristic)
