"""HessianAccumulator and inverse_hessian."""
from __future__ import annotations

import pytest
import torch

from engine.hessian import HessianAccumulator, HessianError, inverse_hessian


def inputs(n: int = 300, cols: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) + 0.3


def test_streaming_equals_one_shot():
    X = inputs()
    acc = HessianAccumulator(24)
    # Uneven batches, a 3-D batch, an empty one and a half-precision one.
    acc.add(X[:7])
    acc.add(X[7:7])
    acc.add(X[7:107].reshape(4, 25, 24))
    acc.add(X[107:200].half().float())
    acc.add(X[200:])
    Xr = torch.cat([X[:107], X[107:200].half().float(), X[200:]]).double()
    assert acc.n == 300
    torch.testing.assert_close(acc.H.double(), 2 / 300 * Xr.T @ Xr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.input_norm().double(), Xr.norm(dim=0), rtol=1e-5, atol=1e-5)
    assert acc.finite()


def test_half_precision_input_accumulates_in_fp32():
    acc = HessianAccumulator(24)
    acc.add(inputs().half())
    assert acc.H.dtype == torch.float32 and acc.finite()


def test_inverse_is_damped_inverse_cholesky():
    X = inputs().double()
    H = 2 / 300 * X.T @ X
    inv = inverse_hessian(H, 0.01)
    assert inv.Hinv.dtype == torch.float64  # fp64 in, fp64 out
    damp = 0.01 * float(torch.diagonal(H).mean())
    assert inv.damp == pytest.approx(damp) and inv.damp_fraction == 0.01
    assert torch.equal(inv.Hinv, torch.triu(inv.Hinv))
    expect = torch.linalg.inv(H + damp * torch.eye(24, dtype=H.dtype))
    torch.testing.assert_close(inv.Hinv.T @ inv.Hinv, expect)
    inv32 = inverse_hessian(H.float(), 0.01)
    assert inv32.Hinv.dtype == torch.float32
    torch.testing.assert_close(inv32.Hinv.double(), inv.Hinv, rtol=1e-3, atol=1e-4)


def test_dead_columns():
    X = inputs()
    X[:, [2, 11]] = 0
    acc = HessianAccumulator(24)
    acc.add(X)
    inv = inverse_hessian(acc.H)
    assert inv.dead.tolist() == [j in (2, 11) for j in range(24)]
    assert torch.isfinite(inv.Hinv).all()
    H = acc.H.clone()
    H[[2, 11], [2, 11]] = 1
    expect = torch.linalg.inv(H + inv.damp * torch.eye(24))
    torch.testing.assert_close(inv.Hinv.T @ inv.Hinv, expect, rtol=1e-3, atol=1e-5)
    # Dead columns are decoupled: no OBS update flows to or from them.
    off = inv.Hinv[[2, 11]].clone()
    off[0, 2] = off[1, 11] = 0
    assert torch.all(off == 0)
    col = inv.Hinv[:, [2, 11]].clone()
    col[2, 0] = col[11, 1] = 0
    assert torch.all(col == 0)


def test_auto_damping_on_singular_hessian():
    H = torch.ones(6, 6)  # rank one: undamped Cholesky fails deterministically
    inv = inverse_hessian(H, 0.0)
    assert inv.damp_fraction == 1e-4 and inv.damp == pytest.approx(1e-4)
    assert torch.isfinite(inv.Hinv).all()
    # Indefinite (eigenvalue -1.5, mean diag 1): needs damping above 1.5 -> 0.01, 0.1, 1, 10.
    H = torch.tensor([[1.0, 2.5], [2.5, 1.0]])
    assert inverse_hessian(H, 0.01).damp_fraction == pytest.approx(10.0)
    with pytest.raises(HessianError, match="damping 1 "):
        inverse_hessian(H, 0.01, max_tries=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad):
    H = torch.eye(4)
    H[1, 2] = bad
    with pytest.raises(HessianError, match="NaN/inf"):
        inverse_hessian(H)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="damp_fraction"):
        inverse_hessian(torch.eye(3), -0.1)
    with pytest.raises(ValueError, match="square"):
        inverse_hessian(torch.ones(3, 4))


def test_diagonal_only_accumulator_keeps_the_same_statistics_without_H():
    X = inputs()
    full, diag = HessianAccumulator(24), HessianAccumulator(24, full=False)
    for acc in (full, diag):
        acc.add(X[:100])
        acc.add(X[100:].reshape(5, 40, 24))
    assert diag.H is None and diag.n == full.n == 300
    torch.testing.assert_close(diag.diagonal(), torch.diagonal(full.H))
    torch.testing.assert_close(diag.input_norm(), full.input_norm())
    assert diag.finite()
    diag.add(torch.full((1, 24), float("nan")))
    assert not diag.finite()


def test_block_triangle_product_mirrors_to_the_full_gram_matrix():
    from engine.hessian import add_gram_

    X = inputs(n=64, cols=40).double()
    S = torch.zeros(40, 40, dtype=torch.float64)
    add_gram_(S, X, block=16)  # blocks of 16, 16, 8: the lower off-diagonal blocks are skipped
    full = X.T @ X
    torch.testing.assert_close(torch.triu(S), torch.triu(full))
    assert torch.all(S[16:, :16] == 0)


def test_small_inputs_are_staged_into_one_gemm_and_the_result_ignores_call_batching(monkeypatch):
    import engine.hessian as hessian

    monkeypatch.setattr(hessian, "MIN_GEMM_ROWS", 64)
    X = inputs(n=300)
    products = []
    real = hessian.add_gram_
    monkeypatch.setattr(hessian, "add_gram_", lambda S, x, **kw: products.append(x.shape[0]) or real(S, x, **kw))
    one, many = HessianAccumulator(24), HessianAccumulator(24)
    one.add_all([X[i : i + 10] for i in range(0, 300, 10)])
    for i in range(0, 300, 10):
        many.add(X[i : i + 10])
    assert one.n == many.n == 300 and torch.equal(one.H, many.H)
    assert products[:4] == [60, 60, 60, 60]  # 6 inputs of 10 rows per GEMM, not 30 GEMMs
    torch.testing.assert_close(one.H.double(), 2 / 300 * X.double().T @ X.double(), rtol=1e-5, atol=1e-4)
    big = HessianAccumulator(24)
    big.add(X)  # >= MIN_GEMM_ROWS rows: multiplied in place, not staged
    assert products[-1] == 300


def test_adding_after_reading_h_continues_the_sum():
    X = inputs()
    acc = HessianAccumulator(24)
    acc.add(X[:100])
    first = acc.H.clone()
    acc.add(X[100:])
    torch.testing.assert_close(first.double(), 2 / 100 * X[:100].double().T @ X[:100].double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(acc.H.double(), 2 / 300 * X.double().T @ X.double(), rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.H, acc.H.T)
