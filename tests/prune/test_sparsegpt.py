"""SparseGPT (and joint prune+quantize) against an unblocked reference, plus behaviour."""
from __future__ import annotations

import pytest
import torch

from prune.baselines import magnitude_prune, wanda_prune
from prune.sparsegpt import sparsegpt_prune
from quant.gptq import gptq_quantize, rtn_quantize
from quant.grid import dequantize_codes, fit_grid, quantize_codes

from tests.conftest import correlated_layer

ROWS, COLS, N = 20, 96, 400


def layer(seed: int = 0, dtype: torch.dtype = torch.float64, rows: int = ROWS, cols: int = COLS):
    return correlated_layer(seed, dtype, rows, cols, N)


def ref_sparsegpt(W, H, sparsity, n=0, m=0, block=128, damp=0.01, bits=None, group_size=-1,
                  sym=False):
    """Unblocked SparseGPT: full updates column by column. The unstructured mask is
    still chosen every `block` columns (the paper's rule), from the updated weights."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    H[dead, dead] = 1
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = torch.diagonal(U)
    mask = torch.zeros_like(W, dtype=torch.bool)
    grid = fit_grid(W, bits, sym) if bits and group_size == -1 else None
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    loss = 0.0
    for i in range(cols):
        if n and i % m == 0:
            sal = W[:, i:i + m] ** 2 / d[i:i + m] ** 2
            mask[:, i:i + m].scatter_(1, torch.argsort(sal, dim=1)[:, :n], True)
        if not n and sparsity > 0 and i % block == 0:
            stop = min(i + block, cols)
            sal = (W[:, i:stop] ** 2 / d[i:stop] ** 2).flatten()
            k = int(sparsity * rows * stop) - int(sparsity * rows * i)
            sub = torch.zeros(sal.numel(), dtype=torch.bool)
            sub[torch.argsort(sal)[:k]] = True
            mask[:, i:stop] = sub.view(rows, stop - i)
        if bits and group_size > 0 and i % group_size == 0:
            sl = slice(i, i + group_size)
            grid = fit_grid(W[:, sl].masked_fill(mask[:, sl], 0), bits, sym)
        w = W[:, i].clone()
        q = w.masked_fill(mask[:, i], 0)
        if bits:
            c = quantize_codes(q[:, None], grid)
            codes[:, i] = c[:, 0].int()
            q = dequantize_codes(c, grid)[:, 0].masked_fill(mask[:, i], 0)
        err = (w - q) / U[i, i]
        loss += float((err**2).sum())
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return W, mask, codes, loss / 2


def output_error(W, Wp, X) -> float:
    return float(((W.double() - Wp.double()) @ X.double().T).pow(2).sum())


CASES = [
    # sparsity, n, m, block_size, bits, group_size, sym
    (0.5, 0, 0, 32, None, -1, False),
    (0.3, 0, 0, 40, None, -1, False),  # last block is partial
    (0.7, 0, 0, 128, None, -1, False),  # one block
    (0.0, 2, 4, 32, None, -1, False),
    (0.5, 4, 8, 30, None, -1, False),  # block rounded down to a multiple of M
    (0.0, 1, 3, 16, None, -1, False),
    (0.5, 0, 0, 32, 4, -1, False),  # joint
    (0.5, 0, 0, 32, 3, 16, True),
    (0.4, 0, 0, 16, 4, 48, False),  # groups wider than blocks
    (0.0, 2, 4, 32, 4, 32, False),
    (0.0, 2, 4, 24, 8, 48, True),
    (0.0, 0, 0, 32, 2, 32, False),  # pure quantization through the pruning entry point
]


@pytest.mark.parametrize("sparsity,n,m,block_size,bits,group_size,sym", CASES)
def test_blocked_matches_unblocked_reference(sparsity, n, m, block_size, bits, group_size, sym):
    W, H, _ = layer(seed=n + m + (bits or 0))
    r = sparsegpt_prune(W, H, sparsity, n, m, block_size, quant_bits=bits,
                        quant_group_size=group_size, quant_sym=sym)
    ref_block = block_size if not n else max(m, block_size - block_size % m)
    W_ref, mask_ref, codes_ref, loss = ref_sparsegpt(W, H, sparsity, n, m, ref_block, bits=bits,
                                                     group_size=group_size, sym=sym)
    assert torch.equal(r.mask, mask_ref)
    assert r.error == pytest.approx(loss, rel=1e-9)
    if bits:
        assert torch.equal(r.quant.codes, codes_ref)
        assert torch.equal(r.W, r.quant.Q)
    torch.testing.assert_close(r.W, W_ref.float(), rtol=1e-5, atol=1e-5)
    assert r.W.dtype == torch.float32 and r.damp_fraction == 0.01


@pytest.mark.parametrize(
    "rows,cols,sparsity,block",
    [(20, 96, 0.5, 32), (7, 50, 0.37, 16), (13, 64, 0.9, 128), (5, 33, 0.11, 8)],
)
def test_exact_unstructured_sparsity(rows, cols, sparsity, block):
    W, H, _ = layer(seed=cols, dtype=torch.float32, rows=rows, cols=cols)
    r = sparsegpt_prune(W, H, sparsity, block_size=block)
    assert int(r.mask.sum()) == int(sparsity * rows * cols)
    assert torch.all(r.W[r.mask] == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 6)])
def test_exact_nm_pattern(n, m):
    W, H, _ = layer(seed=m, dtype=torch.float32)
    cols = COLS - COLS % m
    r = sparsegpt_prune(W[:, :cols], H[:cols, :cols], 0.5, n, m, block_size=32)
    assert torch.all(r.mask.view(ROWS, cols // m, m).sum(-1) == n)
    assert torch.all(r.W[r.mask] == 0)


@pytest.mark.parametrize("n,m,sparsity", [(0, 0, 0.5), (0, 0, 0.7), (2, 4, 0.0), (4, 8, 0.0)])
def test_reconstruction_beats_baselines(n, m, sparsity):
    W, H, X = layer(seed=11, dtype=torch.float32)
    r = sparsegpt_prune(W, H, sparsity, n, m, block_size=32)
    mag = W.masked_fill(magnitude_prune(W, sparsity, n, m), 0)
    norm = X.norm(dim=0)
    wanda = W.masked_fill(wanda_prune(W, norm, sparsity, n, m), 0)
    err = output_error(W, r.W, X)
    assert err <= output_error(W, mag, X)
    assert err <= output_error(W, wanda, X)


@pytest.mark.parametrize(
    "n,m,group_size,sym", [(0, 0, -1, False), (0, 0, 32, True), (2, 4, 16, False)]
)
def test_joint_mode(n, m, group_size, sym):
    W, H, X = layer(seed=12, dtype=torch.float32)
    r = sparsegpt_prune(W, H, 0.5, n, m, block_size=32, quant_bits=4,
                        quant_group_size=group_size, quant_sym=sym)
    q = r.quant
    g = q.g_idx.long()
    size = COLS if group_size == -1 else group_size
    assert torch.equal(q.g_idx.long(), torch.arange(COLS) // size)
    assert torch.equal(q.Q, (q.codes.float() - q.zero[g].T) * q.scale[g].T)
    assert torch.all(q.Q[r.mask] == 0)
    assert torch.equal(q.codes[r.mask].float(), q.zero[g].T[r.mask])
    assert int(r.mask.sum()) == ROWS * COLS // 2
    # One sweep doing both must beat pruning, then rounding the survivors blindly.
    pruned = sparsegpt_prune(W, H, 0.5, n, m, block_size=32)
    blind = rtn_quantize(pruned.W, 4, group_size, sym, mask=pruned.mask)
    assert output_error(W, r.W, X) < output_error(W, blind.Q, X)
    # And GPTQ on the pruned weights with the mask keeps the zeros too (the 2-pass path).
    two_pass = gptq_quantize(pruned.W, H, 4, group_size, sym, mask=pruned.mask)
    assert torch.all(two_pass.Q[pruned.mask] == 0)


def test_zero_sparsity_without_quant_is_identity():
    W, H, _ = layer(seed=13, dtype=torch.float32)
    r = sparsegpt_prune(W, H, 0.0)
    assert not r.mask.any() and r.error == 0.0
    assert torch.equal(r.W, W)


def test_dead_columns_and_half_precision():
    W, H, X = layer(seed=14)
    X[:, 7] = 0
    H = 2 / N * X.T @ X
    r = sparsegpt_prune(W.half(), H.float(), 0.5, block_size=32)
    assert r.W.dtype == torch.float32 and torch.isfinite(r.W).all()
    assert torch.all(r.W[:, 7] == 0)
    assert int(r.mask.sum()) == ROWS * COLS // 2


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=0.5, prune_n=4, prune_m=4), "0 < N < M"),
        (dict(sparsity=0.5, prune_n=0, prune_m=4), "0 < N < M"),
        (dict(sparsity=0.5, prune_n=2, prune_m=5), "divide"),
        (dict(sparsity=0.5, block_size=0), "block_size"),
        (dict(sparsity=0.5, quant_bits=5), "bits"),
    ],
)
def test_bad_arguments_raise(args, match):
    W, H, _ = layer()
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, H, **args)
