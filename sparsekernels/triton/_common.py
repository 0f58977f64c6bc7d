"""Pieces shared by the Triton kernel families: the dot-product helper, launch-time facts, tile
choices, the N:M register helpers (unpacking offsets, rebuilding a dense weight tile), and the
pieces of the N:M kernels' exact path for NaN / Inf operands (``any_nonfinite``,
``add_kept_terms``, ``nm_group_slots``, ``nm_weight_row``).

Why a dot helper: every kernel accumulates in float32 and multiplies tiles with ``tl.dot``. On a GPU
the tiles go to the tensor cores in their storage dtype; float32 tiles are multiplied in full
precision (``input_precision="ieee"``) unless torch allows TF32 for its own float32 matmuls, so
float32 results are not silently computed in TF32. The Triton interpreter (``TRITON_INTERPRET=1``,
how the CPU-only tests run these kernels) multiplies bfloat16 tiles as raw 16-bit integers, so there
the tiles are widened to float32 first; bfloat16 products are exact in float32, so the result is the
same as the tensor-core path up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from torch.utils._device import DeviceContext
from triton.runtime.interpreter import InterpretedFunction

from .autotune import Config, density_bucket, m_bucket, tf32_enabled  # noqa: F401  (re-exported for the launchers)


@triton.jit
def clamp_index(index, low, high):
    """``index`` clamped to ``[low, high]``: how the kernels keep a corrupted index in bounds."""
    return tl.minimum(tl.maximum(index, low), high)


@triton.jit
def dot_accumulate(a, b, acc, DOT: tl.constexpr):
    """``acc + a @ b`` in float32, the multiply chosen by ``DOT`` (see :func:`dot_mode`)."""
    if DOT == "widen":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT)


@triton.jit
def any_nonfinite(tile):
    """True (a runtime scalar) when ``tile`` holds a NaN or an Inf: ``|v| < inf`` is false for both."""
    return tl.max(tl.where(tl.abs(tile.to(tl.float32)) < float("inf"), 0, 1)) > 0


@triton.jit
def add_kept_terms(acc, a_column, b_row, kept):
    """``acc + a_column * b_row`` (an outer product, ``[R, 1]`` times ``[1, C]``) over the ``kept``
    entries only. Each term is formed on its own in float32, so NaN and Inf follow IEEE arithmetic
    exactly (``Inf * 0`` is NaN for a kept 0, +Inf and -Inf terms sum to NaN), and a dropped weight
    takes no part at all: ``where`` skips it, where a dot would multiply it as a stored 0."""
    return acc + tl.where(kept, a_column.to(tl.float32) * b_row, 0.0)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on the host, numpy)."""
    return isinstance(kernel, InterpretedFunction)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """Launch ``kernel`` over ``grid``: directly in plain eager mode, through ``wrap_triton`` where a
    tracer may be watching.

    ``wrap_triton`` lets torch.compile and make_fx / export record the launch (as a higher-order op)
    instead of running it; called outside a ``triton_op`` body, as the eager fast path (eager.py)
    does, it dispatches that higher-order op even with nothing tracing, about 40 µs of host time per
    launch, and inside one it still builds a wrapper per call (about 4 µs). So the kernel is called
    directly (about 0.6 µs) when nothing can be tracing: not compiling, no TorchDispatchMode and no
    TorchFunctionMode but torch's default-device context active (make_fx, FakeTensorMode,
    functionalization, pre-dispatch export all push one) and every argument a plain tensor or a
    Python scalar. Anything else takes ``wrap_triton``.

    Nothing runs on meta tensors (shapes only). An interpreted kernel cannot be traced: it reads the
    tensors' memory on the host, so it runs on real tensors only and is skipped on fake ones (shape
    inference, torch.compile), where the results' shapes are all that is asked for; ops.py registers
    such kernels as opaque ops.
    """
    # The launchers pass an operand first, and every operand is on one device (checked by the ops).
    if args[0].device.type == "meta":
        return
    if is_interpreted(kernel):
        if not any(is_fake(arg) for arg in args if isinstance(arg, torch.Tensor)):
            kernel[grid](*args, **kwargs)
    elif _untraced(args):
        kernel[grid](*args, **kwargs)
    else:
        wrap_triton(kernel)[grid](*args, **kwargs)


# Argument types of a launch no tracer can see: plain tensors and Python scalars. A tensor subclass
# (FakeTensor, FunctionalTensor, DTensor, ...) or a SymInt means tracing, or a type to leave to
# wrap_triton. One set lookup per argument: an isinstance() test per argument costs twice as much.
_DIRECT_ARG_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, int, float, bool, type(None)})


def _untraced(args: tuple) -> bool:
    """True when no tracer can see this launch (see :func:`launch`)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and no_function_mode_but_default_device()
        and all(type(arg) in _DIRECT_ARG_TYPES for arg in args)
    )


def no_function_mode_but_default_device() -> bool:
    """True when no TorchFunctionMode is active, torch's default-device mode aside.

    ``with torch.device(...)`` and ``torch.set_default_device`` push a ``DeviceContext`` (one or, a
    ``with`` inside a ``set_default_device``, two), which only fills in the device of factory calls
    that name none: it traces nothing, and every tensor made here names its device. Any other
    function mode may want to see the op (FlopCounterMode, pre-dispatch export, a user's mode)."""
    depth = torch._C._len_torch_function_stack()
    return depth == 0 or all(type(torch._C._get_function_stack_at(level)) is DeviceContext for level in range(depth))


def dot_mode(kernel, dtype: torch.dtype) -> str:
    """The ``DOT`` argument of :func:`dot_accumulate` for tiles of ``dtype`` run by ``kernel``.

    ``"widen"`` for bfloat16 under the interpreter; for float32 on a GPU, ``"tf32"`` only when torch's
    own float32 matmuls may use TF32 (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, or
    the legacy ``allow_tf32``: :func:`autotune.tf32_enabled`), else ``"ieee"``; half-precision tiles
    always go to the tensor cores as they are (the setting does not apply).
    """
    if is_interpreted(kernel):
        return "widen" if dtype == torch.bfloat16 else "ieee"
    if dtype == torch.float32 and tf32_enabled():
        return "tf32"
    return "ieee"


def pipeline_stages(bytes_per_stage: int, budget: int = 96 * 1024) -> int:
    """Software-pipelining depth (``num_stages``) whose operand buffers fit ``budget`` bytes of shared
    memory (1 to 3): big float32 tiles (128-blocks) would otherwise exceed what an SM has."""
    return max(1, min(3, budget // max(bytes_per_stage, 1)))


def check_device(kernel, tensor: torch.Tensor, name: str) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU tensors too; meta tensors only
    ask for shapes."""
    if tensor.device.type in ("cuda", "meta") or (is_interpreted(kernel) and tensor.device.type == "cpu"):
        return
    raise ValueError(
        f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
        f"got {name} on {tensor.device}"
    )


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division on the host. (``triton.cdiv`` is a JIT function: called from Python it costs
    about 2 µs, which the launchers would pay several times per call.)"""
    return -(-numerator // denominator)


# Largest grid along axis 1 (CUDA limit); the kernels put the unbounded row tiles on axis 0 (the
# block forward and input-gradient kernels use a one-dimensional grid, see bsr_schedule.py).
MAX_GRID_Y = 65535


_programs_per_device: dict = {}


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device: two per SM on a GPU (cached per
    device: this runs on every launch). Under the interpreter (CPU tensors) speed does not matter and
    fewer, larger programs run faster: 1."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    programs = _programs_per_device.get(index)
    if programs is None:
        programs = _programs_per_device[index] = 2 * torch.cuda.get_device_properties(index).multi_processor_count
    return programs


def rows_block(rows: int) -> int:
    """Tile height over the flattened input rows: small for decode-sized batches, 64 for large ones."""
    if rows <= 16:
        return 16
    if rows <= 32:
        return 32
    return 64


def column_tile(row_tiles: int, n_blocks: int, block_size: int, device) -> int:
    """Width of the output slice one program computes: the whole block (fewest loads of x) unless
    that leaves fewer programs than the GPU wants (decode-sized batches), then halved down to 16."""
    tile, wanted = block_size, target_programs(device)
    while tile > 16 and row_tiles * n_blocks * (block_size // tile) < wanted:
        tile //= 2
    return tile


# Fewest input rows one program of the block weight-gradient kernel reduces when the rows are split
# (see row_split); tests lower it to split small batches.
MIN_ROWS_PER_SPLIT = 1024


def row_split(rows: int, programs: int, block_rows: int, device) -> tuple:
    """``(splits, rows_per_split)``: how the block weight-gradient kernel cuts the reduction over
    the input rows.

    With few kept blocks and many rows, one program per (block, sub-tile) leaves most SMs idle while
    each program loops over every row. Then the rows are cut into ``splits`` slices reduced by
    separate programs into float32 partial sums (summed afterwards, in a fixed order): enough slices
    to reach ``target_programs`` launched programs, but none shorter than ``MIN_ROWS_PER_SPLIT``
    rows, so the partial buffer and the final sum stay small next to the reduction. Slices are whole
    multiples of ``block_rows`` (the kernel's reduction step); rounding may leave fewer slices than
    asked, never an empty one. ``(1, rows)`` (no split) otherwise, or when ``rows`` is symbolic.
    """
    if type(rows) is not int:
        return 1, rows
    wanted = target_programs(device)
    splits = min(cdiv(wanted, max(programs, 1)), rows // MIN_ROWS_PER_SPLIT) if programs < wanted else 1
    if splits <= 1:
        return 1, rows
    rows_per_split = cdiv(cdiv(rows, splits), block_rows) * block_rows
    return cdiv(rows, rows_per_split), rows_per_split


def nm_out_block(out_features: int, other_tiles: int, device) -> int:
    """Output-feature tile: 64 wide, narrower for small out_features or when the grid (output tiles
    times ``other_tiles`` along the other axis) would be too small to fill the GPU (decode batches)."""
    block, wanted = 64, target_programs(device)
    while block > 16 and (block >= 2 * out_features or other_tiles * cdiv(out_features, block) < wanted):
        block //= 2
    return block


# N:M input tile: a multiple of every m (2, 4, 8, 16), so groups never straddle tiles.
NM_BLOCK_IN = 64

# Rows per step of the N:M kernels' kept-only path (NaN / Inf operands): a [16, tile] accumulator,
# at most a quarter of the dot's, so that the rare path needs fewer registers than the common one.
NM_KEPT_ONLY_ROWS = tl.constexpr(16)


@triton.jit
def nm_kept_offsets(positions_ptr, offs_out, kept_index, mask, stride_pos_row,
                    BITS: tl.constexpr):
    """In-group offsets ``[BLOCK_OUT, groups]`` of the kept values at ``kept_index`` (per group)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte_ptrs = positions_ptr + offs_out[:, None] * stride_pos_row + (kept_index // PER_BYTE)[None, :]
    packed = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    return (packed >> ((kept_index % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def nm_dense_weight_tile(values_ptr, positions_ptr, offs_out, out_mask, in_start, n_groups,
                         stride_val_row, stride_pos_row,
                         N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
                         BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Dense weight ``W[offs_out, in_start : in_start + BLOCK_IN]`` (float32, zeros where pruned)."""
    GROUPS: tl.constexpr = BLOCK_IN // M
    groups = in_start // M + tl.arange(0, GROUPS)
    mask = out_mask[:, None] & (groups < n_groups)[None, :]
    in_group = tl.arange(0, M)
    tile = tl.zeros([BLOCK_OUT, GROUPS, M], dtype=tl.float32)
    for slot in tl.static_range(N):
        kept_index = groups * N + slot
        kept = tl.load(values_ptr + offs_out[:, None] * stride_val_row + kept_index[None, :], mask=mask, other=0.0)
        offset = nm_kept_offsets(positions_ptr, offs_out, kept_index, mask, stride_pos_row, BITS)
        # Offsets of one group are distinct, so each dense element receives at most one kept value.
        tile += tl.where(offset[:, :, None] == in_group[None, None, :], kept.to(tl.float32)[:, :, None], 0.0)
    return tl.reshape(tile, [BLOCK_OUT, BLOCK_IN])


@triton.jit
def nm_group_slots(values_ptr, positions_ptr, offs_out, out_mask, group, stride_val_row, stride_pos_row,
                   N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr):
    """The kept values (float32) of input group ``group`` and their in-group offsets, ``[BLOCK_OUT, M]``:
    the first ``N`` slots per output are the group's kept weights; the others (``M`` is a power of 2
    above ``N``) have offset -1, so they match no column."""
    slots = tl.arange(0, M)
    kept_index = group * N + slots
    mask = out_mask[:, None] & (slots < N)[None, :]
    offsets = nm_kept_offsets(positions_ptr, offs_out, kept_index, mask, stride_pos_row, BITS)
    values = tl.load(values_ptr + offs_out[:, None] * stride_val_row + kept_index[None, :], mask=mask, other=0.0)
    return values.to(tl.float32), tl.where(mask, offsets, -1)


@triton.jit
def nm_weight_row(values_ptr, positions_ptr, out_feature, in_start, n_groups, stride_val_row, stride_pos_row,
                  N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Row ``out_feature`` of the weight over ``in_start : in_start + BLOCK_IN``, as
    :func:`nm_dense_weight_tile` builds it (float32, 0 where dropped), and whether each entry is kept,
    as ``[1, BLOCK_IN]`` rows. All ``N`` slots of every group are loaded at once (``[groups, slots]``,
    the slot axis padded to ``M``), then matched against the in-group positions."""
    GROUPS: tl.constexpr = BLOCK_IN // M
    PER_BYTE: tl.constexpr = 8 // BITS
    groups = in_start // M + tl.arange(0, GROUPS)
    slots = tl.arange(0, M)
    mask = (groups < n_groups)[:, None] & (slots < N)[None, :]
    kept_index = groups[:, None] * N + slots[None, :]
    row = (out_feature + tl.arange(0, 1)).to(tl.int64)[:, None]  # [1, 1]: 64-bit row offsets, as the tiles use
    values = tl.load(values_ptr + row * stride_val_row + kept_index, mask=mask, other=0.0)
    packed = tl.load(positions_ptr + row * stride_pos_row + kept_index // PER_BYTE, mask=mask, other=0).to(tl.int32)
    offsets = (packed >> ((kept_index % PER_BYTE) * BITS)) & ((1 << BITS) - 1)
    # [groups, slots, in-group position]; offsets within a group are distinct, so at most one slot
    # matches a position, and the sum over slots is that weight (NaN and Inf included) or 0.
    here = (offsets[:, :, None] == tl.arange(0, M)[None, None, :]) & mask[:, :, None]
    weight = tl.sum(tl.where(here, values.to(tl.float32)[:, :, None], 0.0), axis=1)
    kept = tl.max(here.to(tl.int32), axis=1) > 0
    return tl.reshape(weight, [1, BLOCK_IN]), tl.reshape(kept, [1, BLOCK_IN])



def block_density_bucket(nnz: int, n_block_rows: int, n_block_cols: int) -> float:
    """Density bucket of kept blocks (a tuning-key field), from host-side sizes only (no sync)."""
    return density_bucket(nnz / max(n_block_rows * n_block_cols, 1))


def block_candidates(rows: int, block_size: int, element_size: int) -> list:
    """Tuning candidates of the block forward / input-grad kernels (at most 8): the row tile of the
    heuristic and, for large batches, 128; the whole block or half of it; 4 or 8 warps; as many
    pipeline stages as fit in shared memory."""
    row_tiles = sorted({rows_block(rows)} | ({128} if rows >= 256 else set()))
    tiles = [tile for tile in (block_size, block_size // 2) if tile >= 16]
    return [Config(block_rows, tile, warps, pipeline_stages((block_rows + tile) * block_size * element_size))
            for block_rows in row_tiles for tile in tiles for warps in (4, 8)]


def nm_candidates(rows: int, out_features: int) -> list:
    """Tuning candidates of the N:M forward kernel (at most 8): row tile of the heuristic (and 128 for
    large batches), output tiles 32 and 64 (16 for tiny weights), 4 or 8 warps."""
    row_tiles = sorted({rows_block(rows)} | ({128} if rows >= 256 else set()))
    tiles = [16] if out_features <= 16 else [32, 64]
    return [Config(block_rows, tile, warps, 3) for block_rows in row_tiles for tile in tiles for warps in (4, 8)]


def tuned_config(sizes: tuple, key, device, tensors: tuple, heuristic, candidates, run):
    """The launch configuration: ``autotune.tuner.choose`` with the key ``key()``, or ``heuristic``
    (a Config, or a callable returning one: evaluated only when needed) when a size is symbolic
    (dynamic-shape tracing: a key would specialise the shapes, and nothing runs there anyway).
    ``sizes`` lists every size that the key is built from."""
    from . import autotune

    if not all(type(size) is int for size in sizes):
        return autotune.resolve_heuristic(heuristic)
    return autotune.tuner.choose(key(), device, tensors, heuristic, candidates, run)
