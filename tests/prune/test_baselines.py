"""Magnitude / Wanda masks and the shared selection helpers."""
from __future__ import annotations

import pytest
import torch

from prune.baselines import has_nm_pattern, magnitude_prune, nm_mask, smallest_mask, wanda_prune


def weights(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.37, 0.99])
def test_magnitude_unstructured_is_exact_and_smallest(sparsity):
    W = weights(7, 50)
    mask = magnitude_prune(W, sparsity)
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert int(mask.sum()) == int(sparsity * W.numel())
    if 0 < int(mask.sum()) < W.numel():
        assert W.abs()[mask].max() <= W.abs()[~mask].min()  # per layer, not per row


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.37])
def test_wanda_is_per_row_and_uses_input_norm(sparsity):
    W = weights(8, 40)
    norm = torch.rand(40) + 0.5
    norm[3] = 1e6  # a column with a huge activation is never pruned
    mask = wanda_prune(W, norm, sparsity)
    assert torch.all(mask.sum(1) == int(sparsity * 40))
    assert not mask[:, 3].any()
    score = W.abs() * norm
    for r in range(8):
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (3, 8)])
def test_nm_patterns_exact(n, m):
    W = weights(6, 64).half()
    norm = torch.rand(64)
    for mask, score in ((magnitude_prune(W, 0.0, n, m), W.float().abs()),
                        (wanda_prune(W, norm, 0.5, n, m), W.float().abs() * norm)):
        runs, s = mask.view(6, 64 // m, m), score.view(6, 64 // m, m)
        assert torch.all(runs.sum(-1) == n)
        pruned_max = s.masked_fill(~runs, -1).amax(-1)
        kept_min = s.masked_fill(runs, float("inf")).amin(-1)
        assert torch.all(pruned_max <= kept_min)
        pruned = W.masked_fill(mask, 0)
        assert has_nm_pattern(pruned, n, m) and not has_nm_pattern(W, n, m)
        assert not has_nm_pattern(pruned[:, 1:], n, m)  # M no longer divides the columns


def test_helpers_count_exactly_under_ties():
    flat = torch.ones(4, 8)
    assert int(smallest_mask(flat, 13).sum()) == 13
    assert torch.all(smallest_mask(flat, 3, per_row=True).sum(1) == 3)
    assert torch.all(nm_mask(flat, 2, 4).view(4, 2, 4).sum(-1) == 2)
    assert not smallest_mask(flat, 0).any()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda W: magnitude_prune(W, 1.0), "sparsity"),
        (lambda W: magnitude_prune(W, -0.5), "sparsity"),
        (lambda W: magnitude_prune(W, 0.5, 2, 2), "0 < N < M"),
        (lambda W: magnitude_prune(W, 0.5, 2, 0), "0 < N < M"),
        (lambda W: magnitude_prune(W, 0.5, 2, 5), "divide"),
        (lambda W: magnitude_prune(W[0], 0.5), "2-D"),
        (lambda W: wanda_prune(W, torch.ones(3), 0.5), "input_norm"),
        (lambda W: wanda_prune(W, torch.ones(64), 0.5, 3, 7), "divide"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(weights())
