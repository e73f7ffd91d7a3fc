"""Masked least squares after pruning: the batched CG against a per-row direct solve."""
from __future__ import annotations

import pytest
import torch

from prune.baselines import magnitude_prune, wanda_prune
from prune.reconstruct import layer_error, masked_least_squares
from prune.sparsegpt import sparsegpt_prune

from tests.conftest import correlated_layer

ROWS, COLS, N = 24, 96, 400


def direct_solve(W0: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, damp: float) -> torch.Tensor:
    """One [k, k] system per row: H_kk D_k = H_kp W0_p with the damped H."""
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    out = torch.zeros_like(W0)
    for r in range(W0.shape[0]):
        k, p = ~mask[r], mask[r]
        d = torch.linalg.solve(Hd[k][:, k], Hd[k][:, p] @ W0[r, p])
        out[r, k] = W0[r, k] + d
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_cg_reaches_the_direct_solution(pattern) -> None:
    W0, H, _ = correlated_layer(0, torch.float64, ROWS, COLS, N)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    mask = magnitude_prune(W0, 0.5, n, m)
    res = masked_least_squares(W0, H, mask, damp=0.01, rtol=1e-12, max_iters=500)
    assert torch.allclose(res.W, direct_solve(W0, H, mask, 0.01), rtol=1e-7, atol=1e-9)
    assert res.residual < 1e-10
    assert bool((res.W[mask] == 0).all())


@pytest.mark.parametrize("n,m,sparsity", [(0, 0, 0.5), (0, 0, 0.7), (2, 4, 0.5), (4, 8, 0.5)])
def test_improves_on_sparsegpt_keeping_its_mask(n, m, sparsity) -> None:
    """SparseGPT only moves error to later columns: re-solving its own mask lowers the error."""
    W0, H, X = correlated_layer(1, torch.float32, ROWS, COLS, N)
    sg = sparsegpt_prune(W0, H, sparsity, n, m)
    res = masked_least_squares(W0, H, sg.mask, W=sg.W)
    assert torch.equal(res.W == 0, sg.W == 0)  # same zeros, hence the same sparsity and N:M pattern
    assert res.error_before == pytest.approx(layer_error(sg.W, W0, H), rel=1e-5)
    assert res.error_after < 0.9 * res.error_before
    # the error is the real output error on the calibration rows: 2/n ||(W - W0) X^T||^2
    out_err = 2 / N * float(((res.W - W0) @ X.T).pow(2).sum())
    assert res.error_after == pytest.approx(out_err, rel=1e-3)


def test_helps_wanda_and_magnitude_masks_more() -> None:
    W0, H, X = correlated_layer(2, torch.float32, ROWS, COLS, N)
    for mask in (magnitude_prune(W0, 0.5), wanda_prune(W0, (torch.diagonal(H) * N / 2).sqrt(), 0.5)):
        res = masked_least_squares(W0, H, mask)
        assert res.error_before == pytest.approx(layer_error(W0.masked_fill(mask, 0), W0, H), rel=1e-5)
        assert res.error_after < 0.5 * res.error_before


def test_nothing_pruned_is_identity_and_dead_columns_stay_zero() -> None:
    W0, H, _ = correlated_layer(3, torch.float32, ROWS, COLS, N)
    res = masked_least_squares(W0, H, torch.zeros_like(W0, dtype=torch.bool))
    assert torch.equal(res.W, W0) and res.iterations == 0 and res.residual == 0.0
    H[:, 5] = 0
    H[5, :] = 0
    mask = magnitude_prune(W0, 0.5)
    res = masked_least_squares(W0.half(), H, mask)
    assert res.W.dtype == torch.float32 and bool(torch.isfinite(res.W).all())
    assert bool((res.W[:, 5] == 0).all())  # an input that never fired gets no weight


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=torch.zeros(ROWS, COLS + 1, dtype=torch.bool)), "mask"),
    (dict(mask=torch.zeros(ROWS, COLS)), "mask"),
    (dict(damp=-1.0), "damp"),
])
def test_bad_arguments_raise(kwargs, match) -> None:
    W0, H, _ = correlated_layer(4, torch.float32, ROWS, COLS, N)
    args = dict(mask=torch.zeros(ROWS, COLS, dtype=torch.bool)) | kwargs
    with pytest.raises(ValueError, match=match):
        masked_least_squares(W0, H, **args)
