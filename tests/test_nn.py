"""SparseLinear and sparsify_: the nn.Linear contract, state dicts, devices/dtypes, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from cases import DTYPES, LAYOUTS, assert_close, features_for, layout_id
from sparsekernels import NM, BlockSparse, SparseLinear


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_forward_backward_match_dense_weight(layout, dtype):
    out_features, in_features = features_for(layout)
    layer = SparseLinear(in_features, out_features, layout, dtype=dtype)
    assert layer.values.dtype == dtype and layer.bias.dtype == dtype
    input = torch.randn(3, 4, in_features).to(dtype).requires_grad_()
    output = layer(input)
    weight_ref = layer.dense_weight().detach().float().requires_grad_()
    bias_ref = layer.bias.detach().float().requires_grad_()
    input_ref = input.detach().float().requires_grad_()
    output_ref = F.linear(input_ref, weight_ref, bias_ref)
    assert_close(output, output_ref, dtype, "output")
    output.sum().backward()
    output_ref.sum().backward()
    assert_close(input.grad, input_ref.grad, dtype, "grad input")
    assert_close(layer.bias.grad, bias_ref.grad, dtype, "grad bias")
    # values.grad is the dense weight gradient at the kept positions: compare through the mask
    dense_values_grad = torch.zeros_like(weight_ref)
    dense_values_grad[layer.dense_mask()] = weight_ref.grad[layer.dense_mask()]
    with torch.no_grad():
        grad_layer = SparseLinear.from_matrix(layer.matrix)
        grad_layer.values.copy_(layer.values.grad)
        assert_close(grad_layer.dense_weight(), dense_values_grad, dtype, "grad values")


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_init_scale_and_density_follow_nn_linear(layout):
    out_features, in_features = 256, 512
    if isinstance(layout, BlockSparse):
        out_features, in_features = 2 * layout.block_size, 4 * layout.block_size
    layer = SparseLinear(in_features, out_features, layout)
    bound = 1 / math.sqrt(in_features)
    assert layer.values.abs().max() <= bound and layer.bias.abs().max() <= bound
    # uniform on [-bound, bound] has std bound / sqrt(3)
    assert layer.values.float().std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    expected_density = layout.density if isinstance(layout, NM) else max(1, round(layout.density * 8)) / 8
    assert layer.density == pytest.approx(expected_density)
    assert layer.dense_mask().float().mean().item() == pytest.approx(expected_density)
    parameter_names = {name for name, _ in layer.named_parameters()}
    assert parameter_names == {"values", "bias"}
    assert all(not buffer.is_floating_point() for buffer in layer.buffers())


def test_repr_shows_layout_and_density():
    layer = SparseLinear(128, 64, BlockSparse(32, 0.25), bias=False)
    text = repr(layer)
    assert "layout=BlockSparse(block_size=32, density=0.25)" in text and "density=0.2500" in text
    assert "bias=False" in text
    assert "layout=NM(n=2, m=4)" in repr(SparseLinear(16, 8, NM(2, 4)))


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.25), NM(2, 4), NM(1, 8)], ids=layout_id)
def test_from_dense_prunes_by_magnitude(layout):
    linear = nn.Linear(64, 32)
    layer = SparseLinear.from_dense(linear, layout)
    mask = layer.dense_mask()
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach() * mask, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, linear.bias)
    assert layer.layout == layout
    input = torch.randn(5, 64)
    torch.testing.assert_close(layer(input), F.linear(input, linear.weight * mask, linear.bias), rtol=1e-5, atol=1e-5)
    # the weight is copied, not shared: training the sparse layer leaves the dense one alone
    with torch.no_grad():
        layer.values.add_(1.0)
    assert not torch.equal(layer.dense_weight(), linear.weight * mask)


def test_from_dense_keeps_dtype_and_no_bias():
    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    layer = SparseLinear.from_dense(linear, NM(2, 4))
    assert layer.bias is None and layer.values.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_state_dict_round_trip_into_fresh_layer(layout):
    out_features, in_features = features_for(layout)
    trained = SparseLinear(in_features, out_features, layout)
    fresh = SparseLinear(in_features, out_features, layout)
    assert not torch.equal(trained.dense_mask(), fresh.dense_mask()) or not torch.equal(trained.values, fresh.values)
    state = trained.state_dict()
    assert set(state) >= {"values", "bias"}
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.dense_weight(), trained.dense_weight(), rtol=0, atol=0)
    assert torch.equal(fresh.dense_mask(), trained.dense_mask())
    input = torch.randn(3, in_features)
    torch.testing.assert_close(fresh(input), trained(input), rtol=0, atol=0)


def test_state_dict_with_different_block_count_loads():
    trained = SparseLinear(128, 128, BlockSparse(32, 0.25))
    fresh = SparseLinear(128, 128, BlockSparse(32, 0.5))
    fresh.load_state_dict(trained.state_dict())
    assert fresh.values.shape == trained.values.shape
    input = torch.randn(2, 128)
    torch.testing.assert_close(fresh(input), trained(input), rtol=0, atol=0)


def test_state_dict_with_corrupted_index_is_rejected():
    layer = SparseLinear(64, 64, BlockSparse(16, 0.5))
    state = layer.state_dict()
    state["block_col_indices"] = state["block_col_indices"] + 100
    with pytest.raises(RuntimeError, match="block_col_indices must be in"):
        SparseLinear(64, 64, BlockSparse(16, 0.5)).load_state_dict(state)


def test_to_dtype_casts_values_not_indexes():
    layer = SparseLinear(64, 32, BlockSparse(16, 0.5)).to(torch.bfloat16)
    assert layer.values.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.block_row_offsets.dtype == torch.int32
    nm_layer = SparseLinear(64, 32, NM(2, 4)).to(dtype=torch.float16)
    assert nm_layer.positions.dtype == torch.uint8
    output = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert output.dtype == torch.bfloat16


@pytest.mark.gpu
def test_to_cuda_moves_everything():
    layer = SparseLinear(64, 32, BlockSparse(16, 0.5)).to("cuda", torch.bfloat16)
    assert all(tensor.is_cuda for tensor in layer.state_dict().values())
    input = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert_close(layer(input), F.linear(input.float(), layer.dense_weight().float(), layer.bias.float()), torch.bfloat16)


def test_sparsify_swaps_linears_in_place():
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Sequential(nn.Linear(128, 64), nn.LayerNorm(64)), nn.Linear(64, 10)
    )
    dense_weights = {name: module.weight.detach().clone() for name, module in model.named_modules()
                     if isinstance(module, nn.Linear)}
    returned = sk.sparsify_(model, BlockSparse(16, 0.5), filter_fn=lambda module, fqn: module.out_features != 10)
    assert returned is model
    assert isinstance(model[0], SparseLinear) and isinstance(model[2][0], SparseLinear)
    assert type(model[3]) is nn.Linear  # filtered out
    torch.testing.assert_close(model[0].dense_weight(), dense_weights["0"] * model[0].dense_mask())
    model(torch.randn(3, 64)).sum().backward()
    assert model[0].values.grad is not None


def test_sparsify_per_layer_layouts_and_errors():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    sk.sparsify_(model, lambda module, fqn: NM(2, 4) if fqn == "0" else None)
    assert isinstance(model[0], SparseLinear) and model[0].layout == NM(2, 4)
    assert type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match=r"cannot sparsify 1 .*out_features=10 must be a positive multiple"):
        sk.sparsify_(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10)), BlockSparse(16, 0.5))


def test_sparsify_leaves_multihead_attention_alone():
    model = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    sk.sparsify_(model, BlockSparse(16, 0.5))
    assert isinstance(model.linear1, SparseLinear) and isinstance(model.linear2, SparseLinear)
    assert type(model.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    model(torch.randn(2, 5, 64)).sum().backward()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: SparseLinear(64, 48, BlockSparse(32, 0.5)), ValueError, "out_features=48 must be a positive multiple of block_size=32"),
        (lambda: SparseLinear(30, 64, NM(2, 4)), ValueError, "in_features=30 must be a positive multiple of m=4"),
        (lambda: SparseLinear(64, 64, "2:4"), TypeError, "layout must be"),
        (lambda: SparseLinear(64.0, 64, NM(2, 4)), TypeError, "in_features must be an int"),
    ],
)
def test_bad_layer_arguments(call, error, message):
    with pytest.raises(error, match=__import__("re").escape(message)):
        call()


@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4)], ids=layout_id)
def test_bad_forward_inputs(layout):
    layer = SparseLinear(64, 32, layout)
    with pytest.raises(ValueError, match=r"input.shape\[-1\] must equal in_features=64"):
        layer(torch.randn(3, 60))
    with pytest.raises(TypeError, match="same dtype"):
        layer(torch.randn(3, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="same dtype"):
        layer(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="input.shape"):
        layer(torch.tensor(1.0))
    empty = layer(torch.randn(0, 64))
    assert empty.shape == (0, 32)
    empty_3d = layer(torch.randn(2, 0, 64))
    assert empty_3d.shape == (2, 0, 32)


@pytest.mark.gpu
def test_device_mismatch_is_rejected():
    layer = SparseLinear(64, 32, NM(2, 4))
    with pytest.raises(ValueError, match="same device"):
        layer(torch.randn(3, 64, device="cuda"))


def test_raw_ops_reject_bad_arguments_before_running():
    layer = SparseLinear(64, 32, BlockSparse(16, 0.5))
    index = layer.matrix.index_tensors()
    ops = torch.ops.sparsekernels
    with pytest.raises(ValueError, match="in_features=64"):
        ops.bsr_linear(torch.randn(2, 32), layer.values, *index, None)
    with pytest.raises(TypeError, match="same dtype"):
        ops.bsr_linear(torch.randn(2, 64).half(), layer.values, *index, None)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bsr_linear(torch.randn(2, 64), layer.values, *index, torch.randn(31))
    with pytest.raises(ValueError, match="block_col_indices must have nnz"):
        ops.bsr_linear(torch.randn(2, 64), layer.values, index[0], index[1][:-1], *index[2:], None)
    with pytest.raises(TypeError, match="must have the dtype of block_row_offsets"):
        ops.bsr_linear(torch.randn(2, 64), layer.values, index[0], index[1].long(), *index[2:], None)
    nm_layer = SparseLinear(64, 32, NM(2, 4))
    with pytest.raises(ValueError, match="positions must have shape"):
        ops.nm_linear(torch.randn(2, 64), nm_layer.values, nm_layer.positions[:, :3], 2, 4, None)
    with pytest.raises(ValueError, match="1 <= n < m"):
        ops.nm_linear(torch.randn(2, 64), nm_layer.values, nm_layer.positions, 4, 4, None)


def test_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 32))
    sk.sparsify_(model, lambda module, fqn: NM(2, 4) if fqn == "2" else BlockSparse(16, 0.5))
    input = torch.randn(4, 7, 64)
    expected = model(input)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(input), expected, rtol=1e-5, atol=1e-5)
    compiled(input).sum().backward()
    assert all(layer.values.grad is not None for layer in model if isinstance(layer, SparseLinear))
