"""Sparse training: SparseLinear.set_pattern, optimizer-state remapping, GradualPruner, RigL/SET,
SR-STE, torch.compile, DDP and FSDP2 on CPU/gloo, checkpoint resume."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from sparsekernels import NM, BlockSparse, SparseLinear
from sparsekernels.pruning import block_scores
from sparsekernels.training import (
    SET,
    GradualPruner,
    RigL,
    SRSTELinear,
    cosine_decay,
    cubic_density,
    finalize_ste_,
    remap_optimizer_state,
    sparsify_ste_,
)


def _swap_one(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with its first kept entry dropped and its first free entry kept."""
    new = mask.clone().flatten()
    new[int(mask.flatten().nonzero()[0])] = False
    new[int((~mask).flatten().nonzero()[0])] = True
    return new.reshape(mask.shape)


def _check_matches_dense(layer: SparseLinear, in_features: int) -> None:
    """Forward and backward of ``layer`` equal dense math on its masked weight."""
    input = torch.randn(5, in_features, requires_grad=True)
    weight = layer.dense_weight().detach().requires_grad_()
    expected = F.linear(input, weight, layer.bias)
    output = layer(input)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    grad_output = torch.randn_like(output)
    (grad_input,) = torch.autograd.grad(output, input, grad_output, retain_graph=True)
    (grad_values,) = torch.autograd.grad(output, layer.values, grad_output)
    (grad_weight,) = torch.autograd.grad(expected, weight, grad_output)
    torch.testing.assert_close(grad_input, grad_output @ weight.detach(), rtol=1e-5, atol=1e-5)
    values_as_dense = SparseLinear.from_matrix(layer.matrix)
    with torch.no_grad():
        values_as_dense.values.copy_(grad_values)
    torch.testing.assert_close(values_as_dense.dense_weight(), grad_weight * layer.dense_mask(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- set_pattern
@pytest.mark.parametrize("layout", [BlockSparse(16, 0.5), NM(2, 4), NM(1, 8)], ids=str)
def test_set_pattern_same_count_updates_in_place(layout):
    layer = SparseLinear(64, 48, layout)
    old_weight = layer.dense_weight().detach().clone()
    old_mask = layer.dense_mask()
    grid = layer.matrix.block_mask() if isinstance(layout, BlockSparse) else old_mask
    buffers = {name: (buffer, buffer.data_ptr()) for name, buffer in layer.named_buffers()}
    values = layer.values
    layer.values.grad = torch.ones_like(layer.values)
    if isinstance(layout, NM):  # flip the first group of the first row
        new_grid = grid.clone()
        new_grid[0, :layout.m] = torch.arange(layout.m) >= layout.m - layout.n
        if torch.equal(new_grid, grid):
            new_grid[0, :layout.m] = torch.arange(layout.m) < layout.n
    else:
        new_grid = _swap_one(grid)
    source = layer.set_pattern(new_grid)
    new_mask = layer.dense_mask()
    assert layer.values is values, "the Parameter must keep its identity"
    for name, buffer in layer.named_buffers():
        assert buffer is buffers[name][0] and buffer.data_ptr() == buffers[name][1], name
    assert not torch.equal(new_mask, old_mask)
    # Kept-before-and-after weights keep their value; new ones are 0.
    torch.testing.assert_close(layer.dense_weight().detach(), old_weight * (old_mask & new_mask), rtol=0, atol=0)
    assert bool((source >= -1).all()) and int((source == -1).sum()) > 0
    # The gradient follows its weights: 1 where the weight was kept before, 0 for new weights.
    assert torch.equal(layer.values.grad.reshape(source.shape[0], -1)[:, 0], (source >= 0).float())
    layer._validate_pattern()
    _check_matches_dense(layer, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout,shape", [(NM(2, 4), (1, 4)), (NM(2, 4), (7, 20)), (NM(3, 8), (13, 24)),
                                          (BlockSparse(16, 0.34), (48, 16))], ids=str)
def test_set_pattern_odd_shapes_and_low_precision(layout, shape, dtype):
    out_features, in_features = shape
    layer = SparseLinear(in_features, out_features, layout, dtype=dtype)
    old_weight, old_mask = layer.dense_weight().detach().clone(), layer.dense_mask()
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(out_features, in_features, generator=generator)
    if isinstance(layout, NM):
        new_mask = sk.pruning.nm_mask(scores, layout.n, layout.m)
        layer.set_pattern(new_mask)
    else:
        grid = sk.pruning.block_mask(scores, 16, 0.34)
        layer.set_pattern(grid)
        new_mask = grid.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert layer.values.dtype == dtype and torch.equal(layer.dense_mask(), new_mask)
    assert torch.equal(layer.dense_weight().detach(), old_weight * (old_mask & new_mask))
    input = torch.randn(3, in_features).to(dtype)
    expected = F.linear(input.float(), layer.dense_weight().detach().float(), layer.bias.float())
    torch.testing.assert_close(layer(input).float(), expected, rtol=2e-2, atol=2e-2)


def test_set_pattern_takes_values_and_matrices():
    layer = SparseLinear(32, 32, BlockSparse(16, 0.5))
    dense = torch.randn(32, 32)
    grid = _swap_one(layer.matrix.block_mask())
    layer.set_pattern(grid, values=dense)
    mask = layer.dense_mask()
    torch.testing.assert_close(layer.dense_weight().detach(), dense * mask, rtol=0, atol=0)
    matrix = sk.BlockSparseMatrix.from_dense(dense, 16, 0.5)
    source = layer.set_pattern(matrix)
    assert torch.equal(layer.matrix.block_mask(), matrix.block_mask()) and source.shape == (2,)
    torch.testing.assert_close(layer.dense_weight().detach(), matrix.to_dense(), rtol=0, atol=0)
    nm_layer = SparseLinear(32, 16, NM(2, 4))
    nm_matrix = sk.NMMatrix.from_dense(torch.randn(16, 32), 2, 4)
    nm_layer.set_pattern(nm_matrix)
    torch.testing.assert_close(nm_layer.dense_weight().detach(), nm_matrix.to_dense(), rtol=0, atol=0)


def test_set_pattern_recompresses_for_a_new_density():
    layer = SparseLinear(64, 64, BlockSparse(16, 1.0))
    old_values = layer.values
    weight = layer.dense_weight().detach().clone()
    grid = torch.zeros(4, 4, dtype=torch.bool)
    grid[0, 1] = grid[2, 3] = grid[3, 0] = True
    source = layer.set_pattern(grid)
    assert layer.values is not old_values and layer.values.shape == (3, 16, 16)
    assert source.tolist() == [1, 11, 12]
    assert layer.layout == BlockSparse(16, 3 / 16) and math.isclose(layer.density, 3 / 16)
    torch.testing.assert_close(layer.dense_weight().detach(), weight * layer.dense_mask(), rtol=0, atol=0)
    layer._validate_pattern()
    _check_matches_dense(layer, 64)


def test_set_pattern_rejects_bad_patterns():
    layer = SparseLinear(32, 32, BlockSparse(16, 0.5))
    with pytest.raises(ValueError, match="mask must have shape"):
        layer.set_pattern(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one block"):
        layer.set_pattern(torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="constant inside each"):
        layer.set_pattern(torch.eye(32, dtype=torch.bool))
    with pytest.raises(ValueError, match="values must have shape"):
        layer.set_pattern(torch.ones(2, 2, dtype=torch.bool), values=torch.zeros(32, 16))
    with pytest.raises(TypeError, match="got NMMatrix"):
        layer.set_pattern(sk.NMMatrix.from_dense(torch.randn(32, 32), 2, 4))
    with pytest.raises(ValueError, match="block_size=16"):
        layer.set_pattern(sk.BlockSparseMatrix.from_dense(torch.randn(64, 64), 16, 0.5))
    nm_layer = SparseLinear(32, 16, NM(2, 4))
    with pytest.raises(ValueError, match="exactly n=2 of every m=4"):
        nm_layer.set_pattern(torch.ones(16, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        nm_layer.set_pattern(torch.ones(16, 32))


# ---------------------------------------------------------------------------------------- optimizer state
def test_remap_optimizer_state_moves_kept_and_zeroes_new():
    layer = SparseLinear(32, 32, BlockSparse(16, 0.5))
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    state = optimizer.state[layer.values]
    exp_avg = state["exp_avg"]
    before = {tuple(rc): exp_avg[i].clone() for i, rc in enumerate(layer.matrix.block_mask().nonzero().tolist())}
    source = layer.set_pattern(_swap_one(layer.matrix.block_mask()))
    remap_optimizer_state(optimizer, layer.values, layer.values, source)
    assert optimizer.state[layer.values]["exp_avg"] is exp_avg, "same-size state is rewritten in place"
    for i, rc in enumerate(layer.matrix.block_mask().nonzero().tolist()):
        expected = before.get(tuple(rc), torch.zeros(16, 16))
        assert torch.equal(exp_avg[i], expected)
        assert torch.equal(state["exp_avg_sq"][i] == 0, torch.full((16, 16), tuple(rc) not in before))
    # Re-compression: the new Parameter replaces the old one in the optimizer.
    old = layer.values
    grid = torch.zeros(2, 2, dtype=torch.bool)
    grid[tuple(layer.matrix.block_mask().nonzero()[0].tolist())] = True
    source = layer.set_pattern(grid)
    remap_optimizer_state(optimizer, old, layer.values, source)
    assert any(p is layer.values for p in optimizer.param_groups[0]["params"])
    assert not any(p is old for p in optimizer.param_groups[0]["params"]) and old not in optimizer.state
    assert optimizer.state[layer.values]["exp_avg"].shape == (1, 16, 16)
    layer(torch.randn(4, 32)).sum().backward()
    optimizer.step()  # trains on with the new Parameter
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        remap_optimizer_state(optimizer, nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1)), source)


# ---------------------------------------------------------------------------------------- schedules
def test_cubic_and_cosine_schedules():
    assert cubic_density(0, 1.0, 0.1, 10, 20) == 1.0 and cubic_density(10, 1.0, 0.1, 10, 20) == 1.0
    assert cubic_density(20, 1.0, 0.1, 10, 20) == pytest.approx(0.1)
    assert cubic_density(99, 1.0, 0.1, 10, 20) == pytest.approx(0.1)
    assert cubic_density(15, 1.0, 0.1, 10, 20) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cosine_decay(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_decay(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_decay(100, 0.3, 100) == 0.0
    with pytest.raises(ValueError, match="end_step must be > start_step"):
        cubic_density(0, 1.0, 0.1, 5, 5)
    for bad in (float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match=r"final must be a finite number, got"):
            cubic_density(0, 1.0, bad, 10, 20)
        with pytest.raises(ValueError, match=r"initial must be a finite number, got"):
            cubic_density(0, bad, 0.1, 10, 20)
        with pytest.raises(ValueError, match=r"initial must be a finite number, got"):
            cosine_decay(0, bad, 100)


def _mlp(layout_fc, layout_proj, width=64) -> nn.Module:
    return nn.Sequential(
        SparseLinear(32, width, layout_fc), nn.GELU(), SparseLinear(width, 32, layout_proj)
    )


def _regression_batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    input = torch.randn(16, 32, generator=generator)
    return input, torch.sin(input[:, :32] * 1.5) + 0.5 * input.roll(1, dims=1)


def _training_step(model, optimizer, step: int, rank: int = 0) -> torch.Tensor:
    """One optimizer step of ``model`` on the regression batch of ``step``; returns the loss."""
    input, target = _regression_batch(step, rank)
    loss = F.mse_loss(model(input), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def test_gradual_pruner_hits_its_densities_and_keeps_training():
    torch.manual_seed(0)
    model = _mlp(BlockSparse(16, 1.0), BlockSparse(16, 1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.25, start_step=2, end_step=10, every=2, optimizer=optimizer)
    densities = {}
    losses = []
    for step in range(1, 13):
        loss = _training_step(model, optimizer, step)
        before = model[0].matrix.block_mask()
        pruner.step()
        after = model[0].matrix.block_mask()
        assert not bool((after & ~before).any()), "gradual pruning never regrows a block"
        densities[step] = model[0].density
        losses.append(loss.item())
        for layer in (model[0], model[2]):
            assert any(p is layer.values for p in optimizer.param_groups[0]["params"])
            layer._validate_pattern()
    for step in (2, 4, 6, 8, 10):
        assert densities[step] == pytest.approx(max(1, round(pruner.density_at(step) * 8)) / 8)
    assert densities[1] == 1.0 and densities[3] == densities[2]
    assert densities[12] == pytest.approx(0.25)
    assert sum(p.numel() for p in model[0].parameters()) == 2 * 256 + 64
    assert all(math.isfinite(loss) for loss in losses)


def test_gradual_pruner_taylor_scores_use_the_gradient():
    layer = SparseLinear(32, 32, BlockSparse(16, 1.0), bias=False)
    with torch.no_grad():
        layer.values.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1).expand(4, 16, 16))
    layer.values.grad = torch.tensor([4.0, 0.1, 0.1, 0.1]).reshape(4, 1, 1).expand(4, 16, 16).clone()
    GradualPruner(nn.Sequential(layer), 0.25, start_step=0, end_step=1, every=1, score="taylor").step()
    assert layer.matrix.block_mask().flatten().tolist() == [True, False, False, False]  # |w*g|: 4, .2, .3, .4
    magnitude = SparseLinear(32, 32, BlockSparse(16, 1.0), bias=False)
    with torch.no_grad():
        magnitude.values.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1).expand(4, 16, 16))
    GradualPruner(nn.Sequential(magnitude), 0.25, start_step=0, end_step=1, every=1).step()
    assert magnitude.matrix.block_mask().flatten().tolist() == [False, False, False, True]


def test_gradual_pruner_taylor_and_argument_errors():
    model = _mlp(BlockSparse(16, 1.0), NM(2, 4))
    pruner = GradualPruner(model, 0.5, start_step=0, end_step=1, every=1, score="taylor")
    assert [fqn for fqn, _ in pruner.layers] == ["0"], "N:M layers are not pruned gradually"
    with pytest.raises(RuntimeError, match="needs values.grad"):
        pruner.step()
    with pytest.raises(ValueError, match="end_step must be > start_step"):
        GradualPruner(model, 0.5, start_step=3, end_step=3)
    with pytest.raises(ValueError, match="final_density"):
        GradualPruner(model, 0.0, start_step=0, end_step=3)
    with pytest.raises(ValueError, match="score must be one of"):
        GradualPruner(model, 0.5, start_step=0, end_step=3, score="random")
    with pytest.raises(ValueError, match="no block-sparse SparseLinear"):
        GradualPruner(nn.Linear(4, 4), 0.5, start_step=0, end_step=3)


# ---------------------------------------------------------------------------------------- RigL / SET
def _train(model, optimizer, hooks, steps, start=1, rank=0):
    losses = []
    for step in range(start, start + steps):
        loss = _training_step(model, optimizer, step, rank)
        for hook in hooks:
            hook.step()
        losses.append(loss.item())
    return losses


def _dense_like(layer: SparseLinear, slots: torch.Tensor) -> torch.Tensor:
    """A per-weight tensor laid out like ``layer.values`` (e.g. Adam state), as a dense [out, in] map."""
    holder = SparseLinear.from_matrix(layer.matrix)
    with torch.no_grad():
        holder.values.copy_(slots)
    return holder.dense_weight().detach()


@pytest.mark.parametrize("method", [RigL, SET], ids=lambda cls: cls.__name__)
def test_dynamic_sparsity_keeps_nnz_changes_mask_resets_state(method):
    torch.manual_seed(0)
    model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
    layers = (model[0], model[2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # end_step well past the test, so that every update drops at least one of layer 0's 4 blocks
    dynamic = method(model, optimizer, update_every=3, drop_fraction=0.5, end_step=30)
    values = [layer.values for layer in layers]
    for step in range(1, 13):
        _train(model, optimizer, [], 1, start=step)
        masks = [layer.dense_mask() for layer in layers]
        states = [{key: _dense_like(layer, optimizer.state[layer.values][key]) for key in ("exp_avg", "exp_avg_sq")}
                  for layer in layers]
        updated = dynamic.step()
        assert updated == (step in (3, 6, 9, 12))
        for layer, mask, value, state_before in zip(layers, masks, values, states):
            new_mask = layer.dense_mask()
            assert layer.values is value and int(new_mask.sum()) == int(mask.sum()), "nnz must stay constant"
            layer._validate_pattern()
            if not updated:
                continue
            assert not torch.equal(new_mask, mask), "an update must change the mask"
            grown, kept = new_mask & ~mask, new_mask & mask
            assert bool((layer.dense_weight()[grown] == 0).all()), "regrown weights start at 0"
            for key, before in state_before.items():
                after = _dense_like(layer, optimizer.state[value][key])
                assert bool((after[grown] == 0).all()), f"{key} of regrown weights is reset"
                assert torch.equal(after[kept], before[kept]), f"{key} of kept weights moves with them"
                assert bool((before[grown] == 0).all())  # (they were not kept before, so held no state)
    assert dynamic.drop_fraction_at(6) == pytest.approx(0.25 * (1 + math.cos(math.pi * 6 / 30)))


def test_rigl_grows_where_the_dense_gradient_is_largest():
    torch.manual_seed(1)
    layer = SparseLinear(64, 64, BlockSparse(16, 0.25), bias=False)
    model = nn.Sequential(layer)
    rigl = RigL(model, None, update_every=1, drop_fraction=0.25, end_step=100)  # drops 1 of 4 blocks
    input, target = torch.randn(8, 64), torch.randn(8, 64)
    weight = layer.dense_weight().detach().requires_grad_()
    F.mse_loss(F.linear(input, weight), target).backward()
    F.mse_loss(model(input), target).backward()
    kept = layer.matrix.block_mask()
    magnitude = block_scores(layer.dense_weight().detach().abs(), 16)
    growth = block_scores(weight.grad.abs(), 16)
    expected_drop = torch.where(kept, magnitude, torch.inf).flatten().argmin()
    expected_grow = torch.where(kept, -torch.inf, growth).flatten().argmax()
    assert rigl.step()
    new = layer.matrix.block_mask().flatten()
    assert not bool(new[expected_drop]) and bool(new[expected_grow])
    assert int((new != kept.flatten()).sum()) == 2


def test_rigl_needs_a_captured_gradient_and_validates_arguments():
    model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
    rigl = RigL(model, None, update_every=1, drop_fraction=0.3, end_step=10)
    with pytest.raises(RuntimeError, match="no gradient was captured"):
        rigl.step()
    with pytest.raises(ValueError, match="drop_fraction"):
        RigL(model, None, drop_fraction=1.5)
    with pytest.raises(ValueError, match="update_every must be >= 1"):
        RigL(model, None, update_every=0)
    with pytest.raises(ValueError, match="no SparseLinear"):
        RigL(nn.Linear(4, 4), None)


def test_rigl_hooks_exist_only_before_update_steps():
    model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(model, optimizer, update_every=3, drop_fraction=0.3, end_step=100)
    hooked = []
    for step in range(1, 7):
        hooked.append(bool(model[0]._forward_hooks))
        _train(model, optimizer, [rigl], 1, start=step)
    assert hooked == [False, False, True, False, False, True]


@pytest.mark.parametrize("method", ["rigl", "set", "gradual", "srste"])
def test_loss_falls_on_a_small_task(method):
    torch.manual_seed(0)
    if method == "srste":
        model = sparsify_ste_(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), 2, 4)
    else:
        density = 1.0 if method == "gradual" else 0.5
        model = _mlp(BlockSparse(16, density), NM(2, 4) if method != "gradual" else BlockSparse(16, density))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    hooks = {
        "rigl": lambda: [RigL(model, optimizer, update_every=10, drop_fraction=0.3, end_step=60)],
        "set": lambda: [SET(model, optimizer, update_every=10, drop_fraction=0.3, end_step=60)],
        "gradual": lambda: [GradualPruner(model, 0.5, start_step=10, end_step=40, every=10, optimizer=optimizer)],
        "srste": lambda: [],
    }[method]()
    losses = _train(model, optimizer, hooks, 80)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10]), losses


# ---------------------------------------------------------------------------------------- SR-STE
def test_srste_forward_backward_and_finalize():
    torch.manual_seed(0)
    layer = SRSTELinear(16, 8, n=2, m=4, decay=0.1)
    input = torch.randn(3, 16)
    mask = layer.mask()
    assert bool((mask.reshape(8, 4, 4).sum(-1) == 2).all())
    output = layer(input)
    torch.testing.assert_close(output, F.linear(input, layer.weight.detach() * mask, layer.bias.detach()))
    grad_output = torch.randn_like(output)
    output.backward(grad_output)
    expected = grad_output.T @ input + 0.1 * layer.weight.detach() * (~mask)
    torch.testing.assert_close(layer.weight.grad, expected)
    sparse = layer.to_sparse_linear()
    assert isinstance(sparse, SparseLinear) and sparse.layout == NM(2, 4)
    torch.testing.assert_close(sparse(input), output.detach(), rtol=1e-5, atol=1e-5)
    transposable = SRSTELinear(16, 8, transposable=True).mask()
    assert bool((transposable.T.reshape(16, 2, 4).sum(-1) == 2).all())
    with pytest.raises(ValueError, match="multiple of m=4"):
        SRSTELinear(16, 6, transposable=True)
    with pytest.raises(ValueError, match="decay"):
        SRSTELinear(16, 8, decay=-1.0)
    model = finalize_ste_(sparsify_ste_(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), 1, 4))
    assert isinstance(model[0], SparseLinear) and model[2].layout == NM(1, 4)


# ---------------------------------------------------------------------------------------- torch.compile
def test_training_step_compiles_fullgraph_and_sees_pattern_updates():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(1, 4):
        _training_step(compiled, optimizer, step)
    assert all(layer.values.grad is not None for layer in (model[0], model[2]))
    input, _ = _regression_batch(99)
    model[0].set_pattern(_swap_one(model[0].matrix.block_mask()))
    model[2].set_pattern(torch.flip(model[2].dense_mask(), dims=[1]))
    torch.testing.assert_close(compiled(input), model(input), rtol=1e-5, atol=1e-5)
    ste = torch.compile(sparsify_ste_(nn.Sequential(nn.Linear(32, 32)), 2, 4), fullgraph=True)
    ste(input).sum().backward()


def test_rigl_with_a_compiled_model_captures_in_eager_mode():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rigl = RigL(model, optimizer, update_every=2, drop_fraction=0.5, end_step=20)
    masks = [layer.dense_mask() for layer in (model[0], model[2])]
    capturing = []
    for step in range(1, 5):
        capturing.append(rigl.capturing)
        _training_step(model if rigl.capturing else compiled, optimizer, step)
        rigl.step()
    assert capturing == [False, True, False, True]
    assert all(not torch.equal(mask, layer.dense_mask()) for mask, layer in zip(masks, (model[0], model[2])))
    input, _ = _regression_batch(99)
    torch.testing.assert_close(compiled(input), model(input), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["rigl", "gradual"])
def test_checkpoint_resume_gives_identical_next_steps(method, tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        density = 1.0 if method == "gradual" else 0.5
        model = _mlp(BlockSparse(16, density), NM(2, 4))
        return model

    def attach(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if method == "rigl":
            hook = RigL(model, optimizer, update_every=2, drop_fraction=0.4, end_step=20)
        else:
            hook = GradualPruner(model, 0.25, start_step=2, end_step=10, every=2, optimizer=optimizer,
                                 initial_density=1.0)
        return optimizer, hook

    model = build(0)
    optimizer, hook = attach(model)
    _train(model, optimizer, [hook], 5)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hook": hook.state_dict()},
               tmp_path / "checkpoint.pt")
    expected = _train(model, optimizer, [hook], 5, start=6)
    resumed = build(1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed.load_state_dict(checkpoint["model"])  # first: values may change size (gradual)
    optimizer2, hook2 = attach(resumed)
    optimizer2.load_state_dict(checkpoint["optimizer"])
    hook2.load_state_dict(checkpoint["hook"])
    assert _train(resumed, optimizer2, [hook2], 5, start=6) == expected
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- distributed
def _init_gloo(rank, world_size, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    return dist


def _ddp_worker(rank, world_size, store_path, out_dir):
    dist = _init_gloo(rank, world_size, store_path)
    try:
        torch.manual_seed(0)
        model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
        initial = [layer.dense_mask() for layer in (model[0], model[2])]
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        rigl = RigL(ddp, optimizer, update_every=2, drop_fraction=0.5, end_step=20)
        _train(ddp, optimizer, [rigl], 6, rank=rank)  # different data on every rank
        # Gradual pruning re-compresses (new Parameters), so DDP must be wrapped again after a prune.
        torch.manual_seed(1)
        gradual_model = _mlp(BlockSparse(16, 1.0), BlockSparse(16, 1.0))
        gradual_ddp = nn.parallel.DistributedDataParallel(gradual_model)
        gradual_optimizer = torch.optim.SGD(gradual_model.parameters(), lr=0.05)
        pruner = GradualPruner(gradual_ddp, 0.25, start_step=1, end_step=4, every=1, optimizer=gradual_optimizer)
        for step in range(1, 7):
            _training_step(gradual_ddp, gradual_optimizer, step, rank)
            if pruner.step():
                gradual_ddp = nn.parallel.DistributedDataParallel(gradual_model)
        torch.save(
            {
                "initial": initial,
                "masks": [layer.dense_mask() for layer in (model[0], model[2])],
                "weights": [layer.dense_weight().detach() for layer in (model[0], model[2])],
                "gradual": [layer.dense_weight().detach() for layer in (gradual_model[0], gradual_model[2])],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Both ranks finish every collective before either tears gloo down (a rank destroying its
        # process group while the other still talks to it aborts in gloo's threads).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_masks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for initial, mask0, mask1 in zip(rank0["initial"], rank0["masks"], rank1["masks"]):
        assert torch.equal(mask0, mask1)
        assert not torch.equal(initial, mask0), "RigL updated the masks"
    for weight0, weight1 in zip(rank0["weights"] + rank0["gradual"], rank1["weights"] + rank1["gradual"]):
        assert torch.equal(weight0, weight1)
    assert all(int((weight != 0).sum()) == weight.numel() // 4 for weight in rank0["gradual"])


def _fsdp_worker(rank, world_size, store_path, out_dir):
    dist = _init_gloo(rank, world_size, store_path)
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = _mlp(BlockSparse(16, 0.5), NM(2, 4))
        reference = copy.deepcopy(model)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        local_shapes = [tuple(layer.values.to_local().shape) for layer in (model[0], model[2])]
        try:
            RigL(model, None)
            refuses_sharded_updates = False
        except NotImplementedError:
            refuses_sharded_updates = True
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
        losses = _train(model, optimizer, [], 3)  # same data on both ranks: grads equal the single-process ones
        reference_losses = _train(reference, reference_optimizer, [], 3)
        full = [layer.values.full_tensor().detach() for layer in (model[0], model[2])]
        torch.save(
            {
                "local_shapes": local_shapes,
                "refuses_sharded_updates": refuses_sharded_updates,
                "losses": losses,
                "reference_losses": reference_losses,
                "values": full,
                "reference_values": [layer.values.detach() for layer in (reference[0], reference[2])],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Both ranks finish every collective before either tears gloo down (a rank destroying its
        # process group while the other still talks to it aborts in gloo's threads).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_kept_values_and_trains(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"torch.distributed.fsdp.fully_shard is not available in this torch: {error}")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "rank0.pt")
    assert result["local_shapes"] == [(2, 16, 16), (16, 32)], "dim 0 of values is sharded over 2 ranks"
    assert result["refuses_sharded_updates"], "RigL must refuse FSDP-sharded values with NotImplementedError"
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(result["reference_losses"]))
    for value, reference in zip(result["values"], result["reference_values"]):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- example
def test_example_runs_every_mode_at_a_tiny_size(tmp_path):
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_sparse_gpt.py")
    spec = importlib.util.spec_from_file_location("train_sparse_gpt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out, results = tmp_path / "curves.png", tmp_path / "results.json"
    tiny = ["--steps", "4", "--d-model", "128", "--layers", "1", "--batch", "2", "--seq", "16", "--eval-batches", "1"]
    assert example.main([*tiny, "--out", str(out), "--json", str(results)]) == 0
    assert out.stat().st_size > 0
    rows = {row["run"]: row for row in json.loads(results.read_text())["results"]}
    assert set(rows) == set(example.RUNS)
    assert all(math.isfinite(row["val_loss"]) and len(row["losses"]) == 4 for row in rows.values())
    assert rows["block-static"]["mlp_density"] == pytest.approx(6 / 64)
    assert rows["nm-srste"]["mlp_density"] == 0.5 and rows["dense"]["mlp_density"] == 1.0
