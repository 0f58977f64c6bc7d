"""Compile the Triton kernels for NVIDIA GPUs ahead of time, without a GPU: ``python -m sparsekernels.triton.compile_check``.

The CPU-only test suite runs the kernels under the Triton interpreter, which checks what they compute
but not that they compile: the interpreter accepts code that the compiler rejects, and it has no
shared-memory limit. This module calls each launcher on small CPU tensors with the launch replaced
by a recorder, then compiles every recorded configuration (the kernel, its constexprs, num_warps and
num_stages, exactly as the launcher chose them) to a cubin for sm_80 (A100) and sm_90 (H100) with
the ptxas that ships with Triton, and checks that its shared memory fits the architecture.

Run it in a process where ``TRITON_INTERPRET`` is unset (the kernels must be ``triton.jit`` functions).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import torch

# Shared memory a block can use, by compute capability (bytes; opt-in maximum).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
LAUNCH_OPTIONS = ("num_warps", "num_stages")

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
}


@dataclass(frozen=True)
class Launch:
    """One kernel configuration as a launcher chose it."""

    kernel: object
    signature: tuple  # (name, type) per parameter, "constexpr" for constexprs
    constexprs: tuple  # (name, value)
    options: tuple  # (name, value) of num_warps / num_stages

    @property
    def description(self) -> str:
        constants = ", ".join(f"{name}={value}" for name, value in self.constexprs)
        types = {name: kind for name, kind in self.signature}
        dtype = types.get("x_ptr", types.get("grad_out_ptr", types.get("out_ptr")))
        options = ", ".join(f"{name}={value}" for name, value in self.options)
        return f"{self.kernel.__name__}[{dtype}; {constants}; {options}]"


def _record(kernel, grid, *args, **kwargs) -> Launch:
    names = kernel.arg_names
    constexpr_names = {names[index] for index in kernel.constexprs}
    values = dict(zip(names, args))
    values.update({name: value for name, value in kwargs.items() if name not in LAUNCH_OPTIONS})
    signature, constexprs = [], []
    for name in names:
        value = values[name]
        if name in constexpr_names:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((name, "*" + _TRITON_TYPES[value.dtype]))
        elif isinstance(value, int):
            signature.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
        else:
            raise TypeError(f"cannot type argument {name}={value!r}")
    options = tuple((name, kwargs[name]) for name in LAUNCH_OPTIONS if name in kwargs)
    return Launch(kernel, tuple(signature), tuple(constexprs), options)


KERNEL_MODULES = ("bsr_forward", "bsr_grad_input", "bsr_grad_values", "nm_forward", "nm_grad_input", "nm_grad_values",
                  "nm_forward_small_m")


class _EveryCandidate:
    """Stands in for ``autotune.tuner``: runs every tuning candidate (recorded, not launched), then
    the heuristic configuration, so that the configurations tuning may pick are compiled too."""

    def choose(self, key, device, tensors, heuristic, candidates, run):
        from .autotune import resolve_heuristic

        for config in candidates():
            run(config)
        return resolve_heuristic(heuristic)


def recorded_launches(quick: bool = False) -> list[Launch]:
    """Every distinct configuration the launchers pick, for GPUs of any size, and (not ``quick``)
    every autotuning candidate (``quick``: float32 and bfloat16, 128-blocks and 5:16, 300 rows: the
    largest heuristic tiles, and the narrowest; and the small-M N:M forward at 1 row (5:16) and 16
    rows (1:2: the one-byte position chunks), one split and split-K)."""
    import importlib

    from . import _common, autotune

    modules = [importlib.import_module(f"{__package__}.{name}") for name in KERNEL_MODULES]
    launches: dict[Launch, None] = {}

    def recorder(kernel, grid, *args, **kwargs):
        launches.setdefault(_record(kernel, grid, *args, **kwargs))

    saved = [module.launch for module in modules], _common.target_programs, autotune.tuner
    for module in modules:
        module.launch = recorder
    if not quick:
        autotune.tuner = _EveryCandidate()
    try:
        for wanted in (1, 10**9):  # widest tiles, then the narrow ones chosen for decode-sized batches
            _common.target_programs = lambda device, wanted=wanted: wanted
            _call_launchers(*modules, quick=quick)
    finally:
        for module, launch in zip(modules, saved[0]):
            module.launch = launch
        _common.target_programs, autotune.tuner = saved[1], saved[2]
    return list(launches)


def _call_launchers(bsr_forward, bsr_grad_input, bsr_grad_values, nm_forward, nm_grad_input, nm_grad_values,
                    nm_forward_small_m, quick: bool) -> None:
    """Call every launcher over block sizes, N:M patterns, dtypes and batch sizes (CPU tensors).

    The block weight gradient also gets a batch long enough to split its rows when the device wants
    many programs (``_common.row_split``): half-precision inputs then write float32 partial sums, a
    different pointer type to compile. The block forward and input-gradient kernels take the
    program-order constexpr ``GROUP`` (bsr_schedule.LINE_GROUP) as the launchers pass it."""
    from sparsekernels import BlockSparseMatrix, NMMatrix

    from ._common import MIN_ROWS_PER_SPLIT

    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]
    batches = [300] if quick else [1, 20, 300]
    block_sizes = [128] if quick else [16, 32, 64, 128]
    patterns = [(5, 16)] if quick else [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (5, 16)]
    for dtype in dtypes:
        for block_size in block_sizes:
            matrix = BlockSparseMatrix.random((2 * block_size, 2 * block_size), block_size, 0.5, dtype=dtype)
            for rows in batches:
                x = torch.zeros(rows, matrix.shape[1], dtype=dtype)
                grad = torch.zeros(rows, matrix.shape[0], dtype=dtype)
                bsr_forward.bsr_forward(x, matrix.values, matrix.block_row_offsets, matrix.block_col_indices,
                                        torch.zeros(matrix.shape[0], dtype=dtype))
                bsr_grad_input.bsr_grad_input(grad, matrix.values, matrix.block_col_offsets,
                                              matrix.block_row_indices, matrix.block_value_indices)
                bsr_grad_values.bsr_grad_values(grad, x, matrix.block_col_indices, matrix.block_row_indices,
                                                matrix.block_value_indices, block_size)
            split_rows = 2 * MIN_ROWS_PER_SPLIT
            bsr_grad_values.bsr_grad_values(
                torch.zeros(split_rows, matrix.shape[0], dtype=dtype), torch.zeros(split_rows, matrix.shape[1], dtype=dtype),
                matrix.block_col_indices, matrix.block_row_indices, matrix.block_value_indices, block_size)
        for n, m in patterns:
            matrix = NMMatrix.random((96, 8 * m), n, m, dtype=dtype)
            for rows in batches:
                x = torch.zeros(rows, matrix.shape[1], dtype=dtype)
                grad = torch.zeros(rows, matrix.shape[0], dtype=dtype)
                nm_forward.nm_forward(x, matrix.values, matrix.positions, n, m, torch.zeros(96, dtype=dtype))
                nm_grad_input.nm_grad_input(grad, matrix.values, matrix.positions, n, m)
                nm_grad_values.nm_grad_values(grad, x, matrix.positions, n, m)
        # Small-M forward (nm_forward sends it at most 16 rows): 1 and 16 rows for every pattern, the
        # other padded row counts (ROWS 2, 4, 8) for 2:4; 256 groups so that the narrow-tile pass
        # splits the kept dimension (split-K and the sum kernel).
        if quick:
            small_m_cases = [((5, 16), 1), ((1, 2), 16)]
        else:
            small_m_cases = [(pattern, rows) for pattern in patterns for rows in (1, 16)]
            small_m_cases += [((2, 4), rows) for rows in (2, 3, 5)]
        for (n, m), rows in small_m_cases:
            matrix = NMMatrix.random((96, 256 * m), n, m, dtype=dtype)
            x = torch.zeros(rows, matrix.shape[1], dtype=dtype)
            nm_forward_small_m.nm_forward_small_m(x, matrix.values, matrix.positions, n, m,
                                                  torch.zeros(96, dtype=dtype))


def compile_launch(launch: Launch, capability: int):
    """The compiled kernel (cubin and metadata) of ``launch`` for ``sm_<capability>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=launch.kernel, signature=dict(launch.signature), constexprs=dict(launch.constexprs))
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(launch.options))


def check(launches: Iterable[Launch], capabilities: Iterable[int] = (80, 90), verbose: bool = False) -> list[str]:
    """Compile every launch for every capability; the failures, as lines (empty when all compile)."""
    failures = []
    for launch in launches:
        for capability in capabilities:
            started = time.perf_counter()
            try:
                compiled = compile_launch(launch, capability)
            except Exception as error:  # a compiler error is the finding; keep going to list them all
                failures.append(f"sm_{capability} {launch.description}: {type(error).__name__}: {error}")
                continue
            shared = compiled.metadata.shared
            if shared > SHARED_MEMORY_LIMIT[capability]:
                failures.append(f"sm_{capability} {launch.description}: needs {shared} bytes of shared memory, "
                                f"more than the {SHARED_MEMORY_LIMIT[capability]} available")
            if verbose:
                print(f"sm_{capability} {launch.description}: shared {shared} B, "
                      f"{time.perf_counter() - started:.1f}s", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the heuristic configurations with the largest and narrowest tiles")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT))
    args = parser.parse_args(argv)
    from .bsr_forward import _bsr_forward_kernel

    if not hasattr(_bsr_forward_kernel, "arg_names") or type(_bsr_forward_kernel).__name__ != "JITFunction":
        print("TRITON_INTERPRET is set: the kernels are interpreted and cannot be compiled here", file=sys.stderr)
        return 2
    launches = recorded_launches(quick=args.quick)
    failures = check(launches, args.arch, verbose=True)
    print(f"{len(launches)} configurations x {len(args.arch)} architectures: {len(failures)} failures")
    for line in failures:
        print("FAILED", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
