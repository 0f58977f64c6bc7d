"""The CUDA backend (csrc/cuda via csrc/bindings/cuda_ops.cpp) against the dense reference, on a GPU.

Every test here needs a CUDA GPU (``gpu`` marker: skipped elsewhere) and a build with the CUDA
kernels: ``sparsekernels.set_backend("cuda")`` raises when they are missing, so a GPU run of a
CPU-only build fails loudly instead of skipping. Shapes are chosen per kernel path:

* decode kernels (bfloat16/float16, M <= 16 rows): kept values per row a multiple of 8 (N:M), any
  block size (block-sparse);
* CUTLASS 2:4 GEMMs (M > 16): the sm90 sparse-wgmma kernel on Hopper when in % 128 == 0, else the
  sm80 mma.sp kernel (out % 32 == 0, in % 64 == 0); M not a multiple of 8 too (padded rows);
* composite fallback: float32, shapes the kernels do not take, and every backward op.

Expectations come from dense float32 PyTorch on the masked weight (tests/cases.py); the 2:4
compression kernels are checked bit for bit against sparsekernels.formats.nm24_metadata, whose
layouts are in turn checked against torch's CUTLASS conversion (tests/test_nm24_metadata.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekernels as sk
from cases import assert_close, check_op_against_dense, layout_id, make_case, sparse_linear
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
    input = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    output = sk.ops.bsr_linear(input, matrix.values, *index64, bias)
    assert_close(output, F.linear(input.float(), case.masked.float(), bias.float()), torch.bfloat16, "int64 index")


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
