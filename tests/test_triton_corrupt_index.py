"""Corrupted index tensors passed straight to the Triton ops stay inside the tensors' memory.

Indexes are validated when a pattern is set (formats, SparseLinear); the raw ops check only their
metadata, because checking contents on a GPU would need a host sync per call. So the kernels clamp
every index value they read into its valid range (sparsekernels/triton/_common.clamp_index): a
corrupted index gives wrong numbers, never an out-of-bounds access. These tests pin the clamped
semantics exactly (a read past a tensor under the interpreter gives garbage or a crash instead).
"""

from __future__ import annotations

import pytest
import torch

from cases import assert_close, skip_without_triton, triton_device
from sparsekernels import BlockSparseMatrix, NMMatrix

DEVICE = triton_device()
B = 16

pytestmark = skip_without_triton()


def triton_ops():
    from sparsekernels.triton import ops

    return ops


def clamped_dense(values, row_offsets, col_indices, n_block_rows, n_block_cols):
    """The weight that the kernels' clamping makes of a BSR index (duplicate blocks add up)."""
    nnz = values.shape[0]
    dense = torch.zeros(n_block_rows * B, n_block_cols * B, dtype=torch.float32)
    for row in range(n_block_rows):
        start = min(max(int(row_offsets[row]), 0), nnz)
        end = min(max(int(row_offsets[row + 1]), start), nnz)
        for j in range(start, end):
            col = min(max(int(col_indices[j]), 0), n_block_cols - 1)
            dense[row * B:(row + 1) * B, col * B:(col + 1) * B] += values[j].float().cpu()
    return dense


def block_case():
    torch.manual_seed(0)
    matrix = BlockSparseMatrix.random((4 * B, 5 * B), B, 0.5, dtype=torch.float32)
    matrix.values.normal_()  # random() leaves the values uninitialised
    return matrix, [tensor.clone() for tensor in matrix.index_tensors()]


@pytest.mark.parametrize("corruption", ["column_too_large", "column_negative", "offsets_past_nnz",
                                        "offsets_decreasing"])
def test_forward_with_a_corrupted_bsr_index_stays_in_bounds(corruption):
    matrix, index = block_case()
    row_offsets, col_indices = index[0], index[1]
    if corruption == "column_too_large":
        col_indices[0] = 10**6
    elif corruption == "column_negative":
        col_indices[-1] = -(10**6)
    elif corruption == "offsets_past_nnz":
        row_offsets[-1] = 10**6
        row_offsets[1] = 10**6
    else:
        row_offsets[2] = -5
    x = torch.randn(7, 5 * B)
    output = triton_ops().bsr_linear(x.to(DEVICE), matrix.values.to(DEVICE), *[t.to(DEVICE) for t in index])
    expected = x @ clamped_dense(matrix.values, row_offsets, col_indices, 4, 5).T
    assert_close(output.cpu(), expected, torch.float32, f"forward, {corruption}")


@pytest.mark.parametrize("corruption", ["row_too_large", "value_too_large", "value_negative", "offsets_past_nnz"])
def test_backward_ops_with_a_corrupted_csc_index_stay_in_bounds(corruption):
    matrix, index = block_case()
    col_offsets, row_indices, value_indices = index[2], index[3], index[4]
    if corruption == "row_too_large":
        row_indices[0] = 10**6
    elif corruption == "value_too_large":
        value_indices[0] = 10**6
    elif corruption == "value_negative":
        value_indices[-1] = -3
    else:
        col_offsets[-1] = 10**6
    grad_output = torch.randn(7, 4 * B, device=DEVICE)
    x = torch.randn(7, 5 * B, device=DEVICE)
    values, index = matrix.values.to(DEVICE), [t.to(DEVICE) for t in index]
    ops = torch.ops.sparsekernels_triton
    triton_ops()
    grad_input = ops.bsr_linear_grad_input(grad_output, values, *index)
    grad_values = ops.bsr_linear_grad_values(grad_output, x, *index, B)
    # Wrong numbers are allowed; shapes hold and nothing was read from outside the operands. (A
    # corrupted value index can leave a block of grad_values unwritten: its contents are garbage.)
    assert grad_input.shape == (7, 5 * B) and torch.isfinite(grad_input).all()
    assert grad_values.shape == matrix.values.shape
    if corruption == "row_too_large":  # the entry reads the last block row of grad_output instead
        nnz, t = values.shape[0], 0
        value = int(index[4][t])
        column = int((index[2][1:] <= t).sum())  # the block column that holds CSC entry t
        expected = grad_output[:, 3 * B:].T @ x[:, column * B:(column + 1) * B]
        assert value < nnz
        assert_close(grad_values[value], expected, torch.float32, "grad_values, clamped row")


def test_small_m_nm_forward_clamps_an_invalid_m8_code():
    """m = 8 stores 4-bit offset codes: 8..15 are invalid and are clamped to the group's last input."""
    torch.manual_seed(0)
    matrix = NMMatrix.random((8, 32), 2, 8, dtype=torch.float32)
    matrix.values.normal_()
    positions = matrix.positions.clone()
    positions[0, -1] |= 0xF0  # the last kept value of row 0 gets code 15
    x = torch.randn(3, 32)
    output = triton_ops().nm_linear(x.to(DEVICE), matrix.values.to(DEVICE), positions.to(DEVICE), 2, 8)
    dense = matrix.to_dense().float()
    dense[0] = 0
    kept = matrix.values[0].float()
    codes = [(int(byte) >> shift) & 0xF for byte in positions[0] for shift in (0, 4)]
    for slot, (code, value) in enumerate(zip(codes, kept)):
        dense[0, slot // 2 * 8 + min(code, 7)] += value
    assert_close(output.cpu(), x @ dense.T, torch.float32, "forward, clamped code")
