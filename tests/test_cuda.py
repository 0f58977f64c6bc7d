"""The CUDA backend (csrc/cuda via csrc/bindings/cuda_ops.cpp) against the dense reference, on a GPU.

Every test here needs a CUDA GPU (``gpu`` marker: skipped elsewhere) and a build with the CUDA
kernels: ``sparsekernels.set_backend("cuda")`` raises when they are missing, so a GPU run of a
CPU-only build fails loudly instead of skipping. Shapes are chosen per kernel path:

* decode kernels (bfloat16/float16, M <= 16 rows): kept values per row a multiple of 8 (N:M), any
  block size (block-sparse);
* CUTLASS 2:4 GEMMs (M > 16): the sm90 sparse-wgmma kernel on Hopper when in % 128 == 0, else the
  sm80 mma.sp kernel (out % 32 == 0, in % 64 == 0); M not a multiple of 8 too (padded rows);
* composite fallback: float32, shapes the kernels do not take, and every backward op.

Operands that are contiguous but not 16-byte aligned are copied by the bindings before a kernel
reads them (``aligned_contiguous``), and corrupted index contents passed to the raw ops give wrong
numbers, never a fault (run in a child process: a fault would end the CUDA context of this one).

Expectations come from dense float32 PyTorch on the masked weight (tests/cases.py); the 2:4
compression kernels are checked bit for bit against sparsekernels.formats.nm24_metadata, whose
layouts are in turn checked against torch's CUTLASS conversion (tests/test_nm24_metadata.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekernels as sk
from cases import check_op_against_dense, layout_id, make_case, misaligned, sparse_linear
from sparsekernels import NM, BlockSparse, NMMatrix
from sparsekernels.formats import nm24_metadata as meta

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (layout, (out_features, in_features)): decode-friendly shapes (kept per row % 8 == 0), one that
# only the composite path takes, and GEMM-friendly 2:4 shapes.
NM_CASES = [
    (NM(2, 4), (96, 256)),
    (NM(2, 4), (24, 56)),  # kept per row 28: composite path
    (NM(2, 4), (128, 512)),  # GEMM: sm90 kernel on Hopper (in % 128 == 0), sm80 kernel elsewhere
    (NM(2, 4), (96, 192)),  # GEMM: sm80 kernel everywhere (in % 128 != 0)
    (NM(1, 2), (40, 128)),
    (NM(1, 4), (17, 128)),
    (NM(2, 8), (33, 256)),
    (NM(4, 8), (24, 64)),
]
BSR_LAYOUTS = [BlockSparse(16, 0.5), BlockSparse(32, 0.25), BlockSparse(64, 0.25), BlockSparse(128, 0.5)]
ROWS = [1, 3, 7, 16, 17, 40]  # decode kernels up to 16, GEMM/composite above; odd counts


@pytest.fixture(autouse=True)
def cuda_backend():
    sk.set_backend("cuda")  # RuntimeError when the build lacks the CUDA kernels
    yield


def check_against_dense(case, dtype, leading_shape, with_bias, noncontiguous=False, backward=True):
    check_op_against_dense(
        case, lambda input, values, bias: sparse_linear(case.matrix, input, values, bias), dtype, leading_shape,
        with_bias, "cuda", noncontiguous, backward,
    )


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,features", NM_CASES, ids=lambda v: layout_id(v) if isinstance(v, NM) else "x".join(map(str, v)))
def test_nm_linear_matches_dense(layout, features, dtype, rows, with_bias):
    case = make_case(layout, dtype, "cuda", features=features)
    check_against_dense(case, dtype, (rows,), with_bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BSR_LAYOUTS, ids=layout_id)
def test_bsr_linear_matches_dense(layout, dtype, rows, with_bias):
    case = make_case(layout, dtype, "cuda")
    check_against_dense(case, dtype, (rows,), with_bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "layout,features", [(NM(2, 4), (96, 256)), (NM(2, 4), (128, 512)), (BlockSparse(32, 0.25), None)], ids=str
)
def test_noncontiguous_3d_input(layout, features, dtype):
    case = make_case(layout, dtype, "cuda", features=features)
    check_against_dense(case, dtype, (2, 5), with_bias=True, noncontiguous=True)  # 10 rows: decode
    check_against_dense(case, dtype, (3, 11), with_bias=True, noncontiguous=True)  # 33 rows


def test_bsr_int64_index_and_empty_block_rows():
    case = make_case(BlockSparse(64, 0.25), torch.bfloat16, "cuda", features=(256, 512))
    matrix = case.matrix
    index64 = [tensor.long() for tensor in matrix.index_tensors()]
    counts = matrix.block_row_offsets[1:] - matrix.block_row_offsets[:-1]
    assert int((counts == 0).sum()) >= 1  # tests/cases.py leaves block row 0 empty
    check_op_against_dense(
        case, lambda input, values, bias: sk.ops.bsr_linear(input, values, *index64, bias), torch.bfloat16, (7,),
        with_bias=True, device="cuda",
    )


@pytest.mark.parametrize("rows", [1, 16])
def test_nm_decode_split_k(rows):
    """Few output rows and a long input dimension: the kernel splits the reduction over K."""
    case = make_case(NM(2, 4), torch.bfloat16, "cuda", features=(8, 16384))
    check_against_dense(case, torch.bfloat16, (rows,), with_bias=True, backward=False)


def test_nm24_gemm_large():
    case = make_case(NM(2, 4), torch.bfloat16, "cuda", features=(1024, 2048))
    check_against_dense(case, torch.bfloat16, (333,), with_bias=True, backward=False)


def _kernel_names(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.key for event in profile.key_averages())


def test_each_path_runs_its_kernel():
    """Guards against a silent fall back to the composite path."""
    nm = make_case(NM(2, 4), torch.bfloat16, "cuda", features=(128, 512)).matrix
    bsr = make_case(BlockSparse(64, 0.25), torch.bfloat16, "cuda", features=(256, 512)).matrix
    x_small = torch.randn(5, 512, device="cuda", dtype=torch.bfloat16)
    x_large = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)
    assert "nm_decode_kernel" in _kernel_names(lambda: sk.ops.nm_linear(x_small, nm.values, nm.positions, 2, 4))
    assert "bsr_decode_kernel" in _kernel_names(lambda: sk.ops.bsr_linear(x_small, bsr.values, *bsr.index_tensors()))
    # The CUTLASS GEMMs are part of every build that found the pinned nvidia-cutlass headers: the
    # sm80 one is cutlass::Kernel<SparseGemm<...>>, the sm90 one a GemmUniversal over a *Sparse* mainloop.
    names = _kernel_names(lambda: sk.ops.nm_linear(x_large, nm.values, nm.positions, 2, 4))
    assert "cutlass" in names and "Sparse" in names, names
    if torch.cuda.get_device_capability()[0] == 9:
        assert "GemmUniversal" in names, names  # in_features 512: the sm90 kernel


# ---------------------------------------------------------------------- misaligned operands
# Each kernel path with input, values, bias, the index tensors and (through the backward)
# grad_output contiguous but starting one element into their storage, as
# torch.empty(n + 1)[1:].view(...) does: the bindings' aligned_contiguous copies the operands that
# take 16-byte loads (contiguous() alone would not), and the kernel that names the path still runs
# (no quiet fall back to the composite path).
MISALIGNED_CASES = [
    (NM(2, 4), (96, 256), 5, "nm_decode_kernel"),
    (NM(2, 4), (128, 512), 33, "cutlass"),  # the sm90 GEMM on Hopper, else the sm80 one
    (NM(2, 4), (96, 192), 33, "cutlass"),  # the sm80 GEMM everywhere
    (BlockSparse(32, 0.25), None, 5, "bsr_decode_kernel"),
    (BlockSparse(32, 0.25), None, 33, None),  # the composite path
]


def _case_id(value) -> str:
    if isinstance(value, (NM, BlockSparse)):
        return layout_id(value)
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("layout,features,rows,kernel", MISALIGNED_CASES, ids=_case_id)
def test_misaligned_operands(layout, features, rows, kernel):
    case = make_case(layout, torch.bfloat16, "cuda", features=features)

    matrix = case.matrix
    index = [misaligned(tensor) for tensor in
             ((matrix.positions,) if isinstance(matrix, NMMatrix) else matrix.index_tensors())]

    def op(input, values, bias):
        input, values, bias = (misaligned(tensor) for tensor in (input, values, bias))
        assert all(tensor.is_contiguous() and tensor.data_ptr() % 16 for tensor in (input, values, bias, *index))
        if isinstance(matrix, NMMatrix):
            return misaligned(sk.ops.nm_linear(input, values, *index, matrix.n, matrix.m, bias))
        return misaligned(sk.ops.bsr_linear(input, values, *index, bias))

    check_op_against_dense(case, op, torch.bfloat16, (rows,), with_bias=True, device="cuda")
    if kernel is not None:
        out_features, in_features = case.dense.shape
        input = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            assert kernel in _kernel_names(lambda: op(input, case.matrix.values, bias))


@pytest.mark.parametrize("layout", ["natural", "sm80", "sm90"])
def test_nm24_compress_and_metadata_of_misaligned_tensors(layout):
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    mask = NMMatrix.random((64, 128), 2, 4).mask()
    values_ref, metadata_ref = meta.compress_24(weight, mask=mask, layout=layout)
    weight_gpu, mask_gpu = misaligned(weight.cuda()), misaligned(mask.cuda())
    assert weight_gpu.data_ptr() % 16 and mask_gpu.data_ptr() % 16
    values, metadata = meta.compress_24(weight_gpu, mask=mask_gpu, layout=layout)
    assert torch.equal(values.cpu(), values_ref) and torch.equal(metadata.cpu(), metadata_ref)
    values, metadata = meta.compress_24(weight_gpu, layout=layout)  # magnitude selection
    values_ref, metadata_ref = meta.compress_24(weight, layout=layout)
    assert torch.equal(values.cpu(), values_ref) and torch.equal(metadata.cpu(), metadata_ref)
    positions = misaligned(NMMatrix.from_dense(weight, 2, 4, mask=mask).positions.cuda())
    metadata = torch.ops.sparsekernels.nm24_metadata_from_positions(positions, 64, 128, layout)
    _, metadata_ref = meta.compress_24(weight, mask=mask, layout=layout)
    assert torch.equal(metadata.cpu(), metadata_ref)


def test_opcheck_cuda_ops():
    nm = make_case(NM(2, 4), torch.bfloat16, "cuda", features=(96, 256)).matrix
    bsr = make_case(BlockSparse(32, 0.25), torch.bfloat16, "cuda", features=(96, 160)).matrix
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(4, 160, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    ops = torch.ops.sparsekernels
    torch.library.opcheck(ops.nm_linear.default, (x, nm.values, nm.positions, 2, 4, bias))
    torch.library.opcheck(ops.bsr_linear.default, (xb, bsr.values, *bsr.index_tensors(), bias))


# ---------------------------------------------------------------------- 2:4 compression on the GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout,shape", [("natural", (3, 48)), ("sm80", (64, 96)), ("sm90", (70, 80)), ("sm90", (128, 256)), ("sm90_k64", (70, 80)),
     ("sm90_k32", (130, 48))])
def test_nm24_compress_matches_reference(layout, shape, dtype):
    weight = torch.randn(shape, dtype=dtype)
    weight[0, :4] = torch.tensor([0.5, -0.5, 0.5, -0.5])  # ties: the lower columns win
    weight[1, 5] = float("nan")  # NaN counts as largest
    values, metadata = meta.compress_24(weight.cuda(), layout=layout)
    values_ref, metadata_ref = meta.compress_24(weight, layout=layout)
    assert values.is_cuda and metadata.is_cuda
    torch.testing.assert_close(values.cpu(), values_ref, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(metadata.cpu(), metadata_ref)


@pytest.mark.parametrize("layout", meta.LAYOUTS)
def test_nm24_compress_with_mask_and_metadata_from_positions(layout):
    weight = torch.randn(64, 128, dtype=torch.bfloat16)
    mask = NMMatrix.random((64, 128), 2, 4).mask()
    weight[mask & (torch.rand(64, 128) < 0.3)] = 0  # kept zeros stay kept
    values, metadata = meta.compress_24(weight.cuda(), mask=mask.cuda(), layout=layout)
    values_ref, metadata_ref = meta.compress_24(weight, mask=mask, layout=layout)
    assert torch.equal(values.cpu(), values_ref) and torch.equal(metadata.cpu(), metadata_ref)
    matrix = NMMatrix.from_dense(weight, 2, 4, mask=mask)
    assert torch.equal(meta.hardware_metadata(matrix.to("cuda"), layout).cpu(), metadata_ref)


def test_nm24_compress_rejects_bad_masks_and_shapes():
    weight = torch.randn(32, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="exactly n=2"):
        meta.compress_24(weight, mask=torch.ones(32, 64, dtype=torch.bool, device="cuda"))
    with pytest.raises(ValueError, match="out_features % 32"):
        meta.compress_24(weight[:16], layout="sm80")
    with pytest.raises(TypeError, match="bfloat16/float16"):
        meta.compress_24(weight.float())


# ---------------------------------------------------------------------- corrupted indexes (raw ops)
# Index contents are validated when a pattern is set; the raw CUDA ops check metadata only (reading
# contents would sync), so a corrupted index passed to them must give wrong numbers, never a read or
# write outside the operands (docs/reliability.md). Each case calls one op on one path with
# out-of-range block columns / rows / value indices, or N:M position codes past their group (m = 8:
# codes 8..15), then synchronizes: an illegal address, a misaligned access or a device-side assert
# raises there. Such an error ends the process's CUDA context, so the cases run in a child process,
# which reports each case and stops at the first error; the rest run in a fresh child. (A read past
# a tensor that stays inside mapped memory raises nothing: compute-sanitizer memcheck finds those.)
CORRUPT_INDEX_CHILD = r"""
import sys
import torch
from sparsekernels import BlockSparseMatrix, NMMatrix

ops = torch.ops.sparsekernels
B, DTYPE = 32, torch.bfloat16


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def block_operands():
    # 128 x 192 weight, 6 of 24 blocks: the columns of the first and last kept blocks and a CSC
    # row and value index out of range, one each way.
    matrix = BlockSparseMatrix.random((4 * B, 6 * B), B, 0.25, dtype=DTYPE, device="cuda")
    matrix.values.normal_()
    row_offsets, cols, col_offsets, rows, value_index = [tensor.clone() for tensor in matrix.index_tensors()]
    cols[0], cols[-1] = 10**6, -(10**6)
    rows[0], value_index[-1] = 10**6, -(10**6)
    return matrix.values, (row_offsets, cols, col_offsets, rows, value_index)


def nm_operands(n, m, out_features, in_features):
    matrix = NMMatrix.random((out_features, in_features), n, m, dtype=DTYPE, device="cuda")
    matrix.values.normal_()
    positions = matrix.positions.clone()
    if m == 8:  # 4-bit codes: 15 for the last kept value of row 0 (past the row) and the first of row 1
        positions[0, -1] |= 0xF0
        positions[1, 0] |= 0x0F
    else:  # 2:4 has no invalid code: repeated offsets (0, 0) and (3, 3) instead of increasing ones
        positions[0, 0], positions[1, -1] = 0x00, 0xFF
    return matrix.values, positions


def run(case):
    if case.startswith("bsr"):
        values, index = block_operands()
        rows = 5 if case.endswith("decode") else 33
        if case.startswith("bsr_linear_grad_input"):
            return ops.bsr_linear_grad_input(randn(rows, 4 * B), values, *index)
        if case.startswith("bsr_linear_grad_values"):
            return ops.bsr_linear_grad_values(randn(rows, 4 * B), randn(rows, 6 * B), *index, B)
        return ops.bsr_linear(randn(rows, 6 * B), values, *index, randn(4 * B))
    if case == "nm_linear-gemm24":  # the CUTLASS 2:4 GEMM (M > 16) on the metadata of the positions
        values, positions = nm_operands(2, 4, 128, 512)
        return ops.nm_linear(randn(33, 512), values, positions, 2, 4, randn(128))
    values, positions = nm_operands(2, 8, 32, 256)  # 64 kept per row: the decode kernel's multiple of 8
    rows = 5 if case.endswith("decode") else 33
    if case.startswith("nm_linear_grad_input"):
        return ops.nm_linear_grad_input(randn(rows, 32), values, positions, 2, 8)
    if case.startswith("nm_linear_grad_values"):
        return ops.nm_linear_grad_values(randn(rows, 32), randn(rows, 256), positions, 2, 8)
    return ops.nm_linear(randn(rows, 256), values, positions, 2, 8, randn(32))


torch.manual_seed(0)
for case in sys.argv[1:]:
    try:
        result = run(case)
        torch.cuda.synchronize()
        # Finite operands: a non-finite number was read from outside them (or left unwritten).
        assert bool(torch.isfinite(result.float()).all()), "non-finite result"
    except BaseException as error:
        print(f"FAULT {case}: {type(error).__name__}: {error}".replace(chr(10), " "), flush=True)
        sys.exit(0)
    print(f"OK {case}", flush=True)
"""
CORRUPT_INDEX_CASES = [
    "bsr_linear-decode", "bsr_linear-composite", "bsr_linear_grad_input", "bsr_linear_grad_values",
    "nm_linear-decode", "nm_linear-composite", "nm_linear-gemm24", "nm_linear_grad_input", "nm_linear_grad_values",
]


def _run_corrupt_index_child(cases: list) -> tuple[str, str]:
    """The child's stdout, and what ended it when it stopped without reporting a fault."""
    try:
        child = subprocess.run([sys.executable, "-c", CORRUPT_INDEX_CHILD, *cases], capture_output=True, text=True,
                               timeout=240, cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
    except subprocess.TimeoutExpired as timeout:  # a hang: its partial output comes as bytes
        output = timeout.stdout or b""
        return (output.decode(errors="replace") if isinstance(output, bytes) else output), "hung for 240 s"
    return child.stdout, f"child exited with {child.returncode}: {child.stderr[-2000:]}"


@pytest.fixture(scope="module")
def corrupt_index_outcomes():
    """``{case: "OK" or what went wrong}`` for every case of ``CORRUPT_INDEX_CASES``."""
    outcomes, pending = {}, list(CORRUPT_INDEX_CASES)
    while pending:
        stdout, ending = _run_corrupt_index_child(pending)
        reported_fault = False
        for line in stdout.splitlines():
            status, _, rest = line.partition(" ")
            if status in ("OK", "FAULT"):
                case, _, error = rest.partition(": ")
                outcomes[case] = "OK" if status == "OK" else error
                reported_fault |= status == "FAULT"
        pending = [case for case in pending if case not in outcomes]
        if pending and not reported_fault:  # stopped without a word: blame the case it was running
            outcomes[pending.pop(0)] = ending
    return outcomes


@pytest.mark.parametrize("case", CORRUPT_INDEX_CASES)
def test_raw_op_with_a_corrupted_index_does_not_fault(case, corrupt_index_outcomes):
    assert corrupt_index_outcomes[case] == "OK", corrupt_index_outcomes[case]
