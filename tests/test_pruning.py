"""sparsekernels.pruning: scores, block and N:M masks, transposable N:M masks (exact, checked by brute force)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsekernels import BlockSparseMatrix, NMMatrix
from sparsekernels.pruning import (
    block_mask,
    block_scores,
    magnitude_scores,
    nm_mask,
    taylor_scores,
    transposable_nm_mask,
    transposable_patterns,
)


def test_magnitude_and_taylor_scores():
    weight = torch.tensor([[1.0, -2.0], [0.5, -0.25]], dtype=torch.bfloat16)
    grad = torch.tensor([[-3.0, 1.0], [2.0, 4.0]])
    assert torch.equal(magnitude_scores(weight), torch.tensor([[1.0, 2.0], [0.5, 0.25]]))
    assert magnitude_scores(weight).dtype == torch.float32
    assert torch.equal(taylor_scores(weight, grad), torch.tensor([[3.0, 2.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="grad must have the weight's shape"):
        taylor_scores(weight, grad[:1])
    with pytest.raises(TypeError, match="grad must be a torch.Tensor"):
        taylor_scores(weight, [1.0])
    with pytest.raises(ValueError, match="must be 2-D"):
        magnitude_scores(torch.ones(4))


def test_block_scores_are_block_frobenius_norms():
    scores = torch.randn(48, 32)
    per_block = block_scores(scores, 16)
    assert per_block.shape == (3, 2)
    for i, j in itertools.product(range(3), range(2)):
        expected = scores[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)].norm()
        torch.testing.assert_close(per_block[i, j], expected)
    with pytest.raises(ValueError, match="block_size must be one of"):
        block_scores(scores, 8)
    with pytest.raises(ValueError, match="multiples of block_size=32"):
        block_scores(scores, 32)


@pytest.mark.parametrize("density", [0.01, 0.25, 0.5, 1.0])
def test_block_mask_keeps_top_blocks_like_the_format(density):
    weight = torch.randn(96, 64)
    mask = block_mask(magnitude_scores(weight), 16, density)
    assert mask.shape == (6, 4) and mask.dtype == torch.bool
    assert int(mask.sum()) == max(1, round(density * 24))
    expected = BlockSparseMatrix.from_dense(weight, 16, density).block_mask()
    assert torch.equal(mask, expected)
    norms = block_scores(weight.abs(), 16)
    if not bool(mask.all()):
        assert norms[mask].min() >= norms[~mask].max()


def test_block_mask_allowed_restricts_the_choice():
    weight = torch.randn(64, 64)
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    allowed[0] = True
    allowed[3, :2] = True
    mask = block_mask(magnitude_scores(weight), 16, 0.25, allowed=allowed)
    assert int(mask.sum()) == 4 and not bool((mask & ~allowed).any())
    with pytest.raises(ValueError, match="fewer than the 8 to keep"):
        block_mask(magnitude_scores(weight), 16, 0.5, allowed=allowed)
    with pytest.raises(ValueError, match="allowed must be a bool block mask"):
        block_mask(magnitude_scores(weight), 16, 0.25, allowed=allowed.float())


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (3, 16)])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_nm_mask_keeps_exactly_n_largest_per_group(n, m, rows):
    scores = torch.rand(rows, 3 * m)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(rows, 3, m)
    assert bool((groups.sum(-1) == n).all())
    kept = torch.where(groups, scores.reshape(rows, 3, m), torch.inf).amin(-1)
    dropped = torch.where(groups, -torch.inf, scores.reshape(rows, 3, m)).amax(-1)
    assert bool((kept >= dropped).all())
    weight = torch.randn(rows, 3 * m)
    assert torch.equal(nm_mask(weight.abs(), n, m), NMMatrix.from_dense(weight, n, m).mask())


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.rand(4, 6), 2, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_mask(torch.rand(4, 8), 4, 4)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        nm_mask([[1.0]], 1, 2)


def _brute_force_patterns(n: int, m: int) -> list[torch.Tensor]:
    """Every m*m bit pattern with n per row and column, by filtering all subsets (independent of the module)."""
    patterns = []
    for kept in itertools.combinations(range(m * m), n * m):
        tile = torch.zeros(m * m, dtype=torch.bool)
        tile[list(kept)] = True
        tile = tile.reshape(m, m)
        if bool((tile.sum(0) == n).all()) and bool((tile.sum(1) == n).all()):
            patterns.append(tile)
    return patterns


@pytest.mark.parametrize("n,m,count", [(1, 2, 2), (1, 4, 24), (2, 4, 90), (3, 4, 24)])
def test_transposable_patterns_are_all_valid_patterns(n, m, count):
    patterns = transposable_patterns(n, m)
    assert patterns.shape == (count, m, m)
    assert bool((patterns.sum(1) == n).all()) and bool((patterns.sum(2) == n).all())
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == count
    assert count == len(_brute_force_patterns(n, m))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2)])
@pytest.mark.parametrize("shape", [(4, 4), (12, 20), (36, 8)])
def test_transposable_mask_holds_both_ways_and_is_optimal(n, m, shape):
    rows, cols = shape
    scores = torch.rand(rows, cols)
    mask = transposable_nm_mask(scores, n, m)
    assert mask.shape == shape and mask.dtype == torch.bool
    assert bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all()), "rows are not N:M"
    assert bool((mask.T.reshape(cols, rows // m, m).sum(-1) == n).all()), "columns are not N:M"
    # Optimal per tile: compare the kept score with the best over every valid pattern.
    patterns = torch.stack(_brute_force_patterns(n, m)).float()
    tiles = scores.reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    kept_tiles = mask.reshape(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    kept = (tiles * kept_tiles).sum(dim=(-1, -2))
    best = torch.einsum("abij,pij->abp", tiles, patterns).amax(-1)
    torch.testing.assert_close(kept, best)
    # An N:M layer takes the mask as it is, forward and transposed.
    weight = torch.randn(rows, cols)
    assert torch.equal(NMMatrix.from_dense(weight, n, m, mask=mask).mask(), mask)
    assert torch.equal(NMMatrix.from_dense(weight.T.contiguous(), n, m, mask=mask.T).mask(), mask.T)


def test_transposable_mask_of_a_2_4_pattern_is_itself():
    tile = transposable_patterns(2, 4)[37]
    scores = tile.float().repeat(3, 5) + 0.01 * torch.rand(12, 20)
    assert torch.equal(transposable_nm_mask(scores), tile.repeat(3, 5))


def test_transposable_mask_is_deterministic_and_handles_nan():
    scores = torch.rand(8, 8)
    scores[0, 0] = float("nan")
    mask = transposable_nm_mask(scores)
    assert bool(mask[0, 0]), "a NaN score ranks as largest so a NaN weight stays visible"
    assert torch.equal(mask, transposable_nm_mask(scores))


def test_transposable_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="m in \\(2, 4\\)"):
        transposable_nm_mask(torch.rand(8, 8), 4, 8)
    with pytest.raises(ValueError, match="multiples of m=4"):
        transposable_nm_mask(torch.rand(6, 8))
    with pytest.raises(ValueError, match="2-D"):
        transposable_nm_mask(torch.rand(8))
    with pytest.raises(ValueError, match="1 <= n < m"):
        transposable_patterns(0, 4)
