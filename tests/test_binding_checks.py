"""Device checks of the C++ op bindings (csrc/bindings/checks.h), called on the CPU kernels directly.

Every tensor a kernel reads must be on the device of the operands. Through the dispatcher, index
tensors on another device than the operands usually reach another backend's kernel (a meta index
takes the Meta kernel, a CPU index beside CUDA operands the CUDA kernel), so these tests redispatch
to the CPU key with meta index tensors: the binding itself must refuse them with a ValueError naming
the tensor and the expected device, before any kernel reads them. (The CUDA case, a CPU index with
CUDA operands, runs the same checks; only a GPU can show it end to end.)
"""

from __future__ import annotations

import pytest
import torch

import sparsekernels  # noqa: F401  (loads the extension and registers the ops)
from sparsekernels import BlockSparseMatrix, NMMatrix

CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
ops = torch.ops.sparsekernels
BSR_INDEX = ["block_row_offsets", "block_col_indices", "block_col_offsets", "block_row_indices", "block_value_indices"]


def bsr_operands():
    matrix = BlockSparseMatrix.from_dense(torch.randn(32, 64), 16, density=0.5)
    return matrix.values, list(matrix.index_tensors())


@pytest.mark.parametrize("moved", range(5))
def test_bsr_index_on_another_device_than_the_operands(moved):
    values, index = bsr_operands()
    x, grad_output = torch.randn(3, 64), torch.randn(3, 32)
    # All index tensors on one other device (they agree with each other, not with the operands) ...
    on_meta = [t.to("meta") for t in index]
    name = BSR_INDEX[0]
    with pytest.raises(ValueError, match=f"{name} must be on the device of values \\(cpu\\), got meta"):
        ops.bsr_linear.default.redispatch(CPU, x, values, *on_meta, None)
    with pytest.raises(ValueError, match=f"{name} must be on the device of values \\(cpu\\), got meta"):
        ops.bsr_linear_grad_input.default.redispatch(CPU, grad_output, values, *on_meta)
    with pytest.raises(ValueError, match=f"{name} must be on the device of input \\(cpu\\), got meta"):
        ops.bsr_linear_grad_values.default.redispatch(CPU, grad_output, x, *on_meta, 16)
    # ... or just one of them.
    one_moved = list(index)
    one_moved[moved] = index[moved].to("meta")
    with pytest.raises(ValueError, match=f"{BSR_INDEX[moved]} must be on the device of values \\(cpu\\), got meta"):
        ops.bsr_linear.default.redispatch(CPU, x, values, *one_moved, None)


def test_nm_positions_on_another_device_than_the_operands():
    matrix = NMMatrix.from_dense(torch.randn(8, 32), 2, 4)
    x, grad_output = torch.randn(3, 32), torch.randn(3, 8)
    positions = matrix.positions.to("meta")
    with pytest.raises(ValueError, match="positions must be on the device of values \\(cpu\\), got meta"):
        ops.nm_linear.default.redispatch(CPU, x, matrix.values, positions, 2, 4, None)
    with pytest.raises(ValueError, match="positions must be on the device of values \\(cpu\\), got meta"):
        ops.nm_linear_grad_input.default.redispatch(CPU, grad_output, matrix.values, positions, 2, 4)
    with pytest.raises(ValueError, match="positions must be on the device of input \\(cpu\\), got meta"):
        ops.nm_linear_grad_values.default.redispatch(CPU, grad_output, x, positions, 2, 4)


def test_valid_operands_still_run_through_the_cpu_key():
    values, index = bsr_operands()
    x = torch.randn(3, 64)
    direct = ops.bsr_linear.default.redispatch(CPU, x, values, *index, None)
    assert torch.equal(direct, ops.bsr_linear(x, values, *index, None))
