"""Argument checks for the op front ends and fake kernels (mirrors csrc/bindings/checks.h).

They run before any kernel: a bad argument raises TypeError / ValueError naming it and what was
expected. They read metadata only (shapes, dtypes, devices, lengths), never tensor data, so they
cost a few attribute reads, never synchronise a GPU, and vanish under torch.compile (traced away).
Index *contents* are checked once when a pattern is set (sparsekernels.formats,
SparseLinear.load_state_dict) and, for memory safety, on every call by the C++ CPU ops
(docs/reliability.md). The index metadata checks (``check_index_dtype``, ``check_index_tensors``)
serve both: the formats' full check starts with the same metadata checks as the ops.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_operand(operand: Tensor, name: str, weight: Tensor, weight_name: str, last_dim: int, last_name: str) -> None:
    """``operand`` must match ``weight``'s dtype and device (as nn.Linear) and end in ``last_dim``."""
    if not isinstance(operand, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(operand).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{weight_name} must be float32, bfloat16 or float16, got {weight.dtype}")
    if operand.dtype != weight.dtype:
        raise TypeError(
            f"expected {name} and {weight_name} to have the same dtype (as nn.Linear requires), "
            f"got {name} {operand.dtype} and {weight_name} {weight.dtype}"
        )
    if operand.device != weight.device:
        raise ValueError(
            f"expected {name} and {weight_name} on the same device, got {name} on {operand.device} "
            f"and {weight_name} on {weight.device}"
        )
    if operand.dim() < 1 or operand.shape[-1] != last_dim:
        raise ValueError(f"{name}.shape[-1] must equal {last_name}={last_dim}, got shape {tuple(operand.shape)}")


def check_bias(bias: Optional[Tensor], values: Tensor, out_features: int) -> None:
    if bias is None:
        return
    check_operand(bias, "bias", values, "values", out_features, "out_features")
    if bias.dim() != 1:
        raise ValueError(f"bias must have shape [out_features={out_features}], got {tuple(bias.shape)}")


BSR_INDEX_NAMES = (
    "block_row_offsets",
    "block_col_indices",
    "block_col_offsets",
    "block_row_indices",
    "block_value_indices",
)
BLOCK_SIZES = (16, 32, 64, 128)
NM_GROUP_SIZES = (2, 4, 8, 16)
# The N:M CPU kernels keep input columns in int32 (see csrc/bindings/checks.h).
NM_MAX_IN_FEATURES = 2**31 - 1


INDEX_DTYPES = (torch.int32, torch.int64)


def check_index_dtype(name: str, tensor: Tensor) -> None:
    """``tensor`` is a tensor of an index dtype (int32 or int64)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {tensor.dtype}")


def check_index_tensors(
    named: Iterable[tuple[str, Tensor]], dtype: torch.dtype, device: torch.device, device_owner: str
) -> None:
    """Each ``(name, tensor)`` is a 1-D tensor of ``dtype``, the dtype of block_row_offsets that all
    five index tensors share, on ``device`` (the device of ``device_owner``, as the message says).
    One call for all of them: the op front ends run this on every call."""
    for name, tensor in named:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise TypeError(f"{name} must have the dtype of block_row_offsets ({dtype}), got {tensor.dtype}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on the device of {device_owner} ({device}), got {tensor.device}")


def check_bsr_index(index: tuple[Tensor, ...], nnz: int, device: torch.device, block_size: int) -> tuple[int, int]:
    """Metadata of the five index tensors (op argument order); returns (n_block_rows, n_block_cols).

    The lengths are checked against each other only: unlike the formats (validate_bsr_index), the
    ops know no expected block counts, they derive them from the offsets.
    """
    if len(index) != len(BSR_INDEX_NAMES):
        raise ValueError(f"expected the {len(BSR_INDEX_NAMES)} index tensors {BSR_INDEX_NAMES}, got {len(index)}")
    for name, tensor in zip(BSR_INDEX_NAMES, index):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_index_dtype("block_row_offsets", index[0])
    check_index_tensors(zip(BSR_INDEX_NAMES, index), index[0].dtype, device, "the operands")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    for name in ("block_row_offsets", "block_col_offsets"):
        tensor = index[BSR_INDEX_NAMES.index(name)]
        if tensor.shape[0] < 2:
            lines = "n_block_rows" if name == "block_row_offsets" else "n_block_cols"
            raise ValueError(f"{name} must have {lines} + 1 >= 2 entries, got {tensor.shape[0]}")
    for name in ("block_col_indices", "block_row_indices", "block_value_indices"):
        tensor = index[BSR_INDEX_NAMES.index(name)]
        if tensor.shape[0] != nnz:
            raise ValueError(f"{name} must have nnz={nnz} entries (one per kept block), got {tensor.shape[0]}")
    return index[0].shape[0] - 1, index[2].shape[0] - 1


def bsr_features(values: Tensor, *index: Tensor) -> tuple[int, int]:
    """(out_features, in_features) of a block-sparse weight, after checking values and the index."""
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape [nnz_blocks, block_size, block_size], got {tuple(values.shape)}")
    block_size = values.shape[-1]
    n_block_rows, n_block_cols = check_bsr_index(index, values.shape[0], values.device, block_size)
    return n_block_rows * block_size, n_block_cols * block_size


def check_n_m(n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"m must be one of {NM_GROUP_SIZES}, got {m}")
    if not 1 <= n < m:
        raise ValueError(f"n must satisfy 1 <= n < m={m}, got n={n}")


def check_positions(positions: Tensor, out_features: int, kept_per_row: int, m: int, device: torch.device) -> None:
    """Metadata of packed N:M positions: uint8 ``[out_features, ceil(kept_per_row / per_byte)]``."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype != torch.uint8:
        raise TypeError(f"positions must be uint8, got {positions.dtype}")
    per_byte = {2: 8, 4: 4, 8: 2, 16: 2}[m]
    expected = (out_features, -(-kept_per_row // per_byte))
    if tuple(positions.shape) != expected:
        raise ValueError(f"positions must have shape {list(expected)}, got {list(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"positions must be on the device of the operands ({device}), got {positions.device}")


def nm_features(values: Tensor, positions: Tensor, n: int, m: int) -> tuple[int, int]:
    """(out_features, in_features) of an N:M weight, after checking values, positions, n and m."""
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 2:
        raise ValueError(f"values must have shape [out_features, in_features * n / m], got {tuple(values.shape)}")
    check_n_m(n, m)
    out_features, kept_per_row = values.shape
    if kept_per_row % n:
        raise ValueError(f"values.shape[1]={kept_per_row} must be a multiple of n={n}")
    in_features = kept_per_row // n * m
    if in_features > NM_MAX_IN_FEATURES:
        raise ValueError(f"in_features={in_features} exceeds the N:M kernels' limit of 2^31 - 1 input features")
    check_positions(positions, out_features, kept_per_row, m, values.device)
    return out_features, in_features


def check_same_leading_dims(grad_output: Tensor, input: Tensor) -> None:
    if input.shape[:-1] != grad_output.shape[:-1]:
        raise ValueError(
            f"grad_output and input must have the same leading dims, got {tuple(grad_output.shape)} "
            f"and {tuple(input.shape)}"
        )


def bsr_grad_values_features(grad_output: Tensor, input: Tensor, index: tuple[Tensor, ...], block_size: int) -> int:
    """Checks the operands of ``bsr_linear_grad_values``; returns nnz (the result is [nnz, b, b])."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    nnz = index[1].shape[0] if len(index) > 1 and isinstance(index[1], Tensor) else -1
    n_block_rows, n_block_cols = check_bsr_index(index, nnz, input.device, block_size)
    out_features, in_features = n_block_rows * block_size, n_block_cols * block_size
    check_operand(grad_output, "grad_output", input, "input", out_features, "out_features")
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"input.shape[-1] must equal in_features={in_features}, got shape {tuple(input.shape)}")
    check_same_leading_dims(grad_output, input)
    return nnz


def nm_grad_values_features(grad_output: Tensor, input: Tensor, positions: Tensor, n: int, m: int) -> tuple[int, int]:
    """Checks the operands of ``nm_linear_grad_values``; returns the result shape (out, kept_per_row)."""
    check_n_m(n, m)
    for name, tensor in (("grad_output", grad_output), ("input", input)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension, got a scalar")
    out_features = grad_output.shape[-1]
    check_operand(grad_output, "grad_output", input, "input", out_features, "out_features")
    if input.shape[-1] % m:
        raise ValueError(f"input.shape[-1] must be a multiple of m={m}, got shape {tuple(input.shape)}")
    check_same_leading_dims(grad_output, input)
    kept_per_row = input.shape[-1] // m * n
    check_positions(positions, out_features, kept_per_row, m, input.device)
    return out_features, kept_per_row
