"""GPTQ / RTN kernels against an unblocked column-by-column reference, plus behaviour."""
from __future__ import annotations

import pytest
import torch

from quant.gptq import QuantResult, gptq_quantize, rtn_quantize
from quant.grid import dequantize_codes, fit_grid, quantize_codes
from engine.hessian import HessianError

from tests.conftest import correlated_layer

ROWS, COLS, N = 24, 96, 400


def layer(seed: int = 0, dtype: torch.dtype = torch.float64, rows: int = ROWS, cols: int = COLS):
    return correlated_layer(seed, dtype, rows, cols, N)


def ref_hinv(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(H), upper=True)


def ref_gptq(W, H, bits, group_size=-1, sym=False, act_order=False, static=False, damp=0.01,
             mask=None, search=None, weight=None):
    """Textbook GPTQ: one column at a time, full row-of-Hinv updates, no lazy blocks (grids fitted
    with `search`, its error weighted by `weight` [cols] in original column order)."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    mask = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask
    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diagonal(H).masked_fill(dead, 1), descending=True, stable=True)
    size = cols if group_size == -1 else group_size
    fixed = {}
    if group_size == -1 or static:
        fixed = {g: fit_grid(W.masked_fill(mask, 0)[:, g * size:(g + 1) * size], bits, sym, search,
                             None if weight is None else weight[g * size:(g + 1) * size])
                 for g in range(-(-cols // size))}  # ceil: a shorter last group
    W, H, mask = W[:, perm], H[perm][:, perm], mask[:, perm]
    U = ref_hinv(H, damp)
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    g_idx = torch.zeros(cols, dtype=torch.int32)
    grids, loss = dict(fixed), 0.0
    for i in range(cols):
        if not fixed and i % size == 0:
            sl = slice(i, i + size)
            grids[i // size] = fit_grid(W[:, sl].masked_fill(mask[:, sl], 0), bits, sym, search,
                                        None if weight is None else weight[perm][sl])
        g = int(perm[i]) // size if fixed else i // size
        w = W[:, i].clone()
        c = quantize_codes(w.masked_fill(mask[:, i], 0)[:, None], grids[g])[:, 0]
        q = dequantize_codes(c[:, None], grids[g])[:, 0].masked_fill(mask[:, i], 0)
        err = (w - q) / U[i, i]
        loss += float((err**2).sum())
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        codes[:, perm[i]] = c.to(torch.int32)
        g_idx[perm[i]] = g
    scale = torch.stack([grids[g].scale[:, 0] for g in sorted(grids)])
    zero = torch.stack([grids[g].zero[:, 0] for g in sorted(grids)])
    return codes, g_idx, scale, zero, loss / 2


def output_error(W, Q, X) -> float:
    return float(((W.double() - Q.double()) @ X.double().T).pow(2).sum())


def assert_invariant(r: QuantResult, shape) -> None:
    assert r.Q.dtype == torch.float32 and r.Q.shape == shape
    assert r.codes.dtype == torch.int32 and r.g_idx.dtype == torch.int32
    assert r.scale.dtype == torch.float32 and r.zero.dtype == torch.float32
    assert r.scale.shape == r.zero.shape == (int(r.g_idx.max()) + 1, shape[0])
    # the codes are clamped into [0, maxq]; a min/max grid must also reach both ends (no wasted level)
    assert int(r.codes.min()) == 0 and int(r.codes.max()) == 2**r.bits - 1
    assert torch.equal(r.zero, r.zero.round())
    g = r.g_idx.long()
    assert torch.equal(r.Q, (r.codes.float() - r.zero[g].T) * r.scale[g].T)


CASES = [
    # bits, group_size, sym, act_order, static, block_size
    (4, -1, False, False, False, 32),
    (4, -1, True, True, False, 32),
    (3, 16, False, False, False, 32),
    (2, 48, False, True, False, 32),  # groups straddle lazy blocks
    (4, 48, True, False, False, 16),  # groups wider than a block
    (8, 32, False, True, False, 40),  # block size not a multiple of the group
    (4, 32, False, True, True, 32),  # static groups + act_order
    (3, 16, True, True, True, 24),
    (4, 24, False, True, False, 128),  # one block: no lazy update at all
    (4, 40, False, False, False, 32),  # 40 does not divide 96: a shorter last group
    (3, 40, True, True, True, 32),  # ... with static groups and act_order
    (4, 40, False, True, False, 32),  # ... with lazy groups in sweep order
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,static,block_size", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_matches_unblocked_reference(
    bits, group_size, sym, act_order, static, block_size, masked
):
    W, H, _ = layer(seed=bits + group_size)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.4 if masked else None
    args = (W, H, bits, group_size, sym, act_order, static)
    r = gptq_quantize(*args, block_size=block_size, mask=mask)
    codes, g_idx, scale, zero, loss = ref_gptq(*args, mask=mask)
    assert torch.equal(r.codes, codes)
    assert torch.equal(r.g_idx, g_idx)
    torch.testing.assert_close(r.scale, scale.float(), rtol=1e-6, atol=0)
    assert torch.equal(r.zero, zero.float())
    assert r.error == pytest.approx(loss, rel=1e-9)
    assert r.damp_fraction == 0.01
    assert_invariant(r, W.shape)


def test_g_idx_layouts():
    W, H, _ = layer()
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    dyn = gptq_quantize(W, H, 4, 16, act_order=True)
    assert torch.equal(dyn.g_idx[perm].long(), torch.arange(COLS) // 16)
    static = gptq_quantize(W, H, 4, 16, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx.long(), torch.arange(COLS) // 16)
    whole = gptq_quantize(W, H, 4)
    assert torch.equal(whole.g_idx, torch.zeros(COLS, dtype=torch.int32))
    assert whole.scale.shape == (1, ROWS)


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, -1), (4, 32), (2, 16)])
def test_gptq_output_error_beats_rtn(bits, group_size):
    W, H, X = layer(seed=3, dtype=torch.float32)
    g = gptq_quantize(W, H, bits, group_size, block_size=32)
    r = rtn_quantize(W, bits, group_size)
    assert output_error(W, g.Q, X) < 0.8 * output_error(W, r.Q, X)
    act = gptq_quantize(W, H, bits, group_size, act_order=True, block_size=32)
    assert output_error(W, act.Q, X) < output_error(W, r.Q, X)


def test_fp32_path_agrees_with_fp64():
    W, H, X = layer(seed=4)
    r64 = gptq_quantize(W, H, 4, 32, act_order=True, block_size=32)
    r32 = gptq_quantize(W.float(), H.float(), 4, 32, act_order=True, block_size=32)
    # Rounding ties may flip a few codes and cascade slightly, never much.
    assert (r32.codes == r64.codes).float().mean() > 0.97
    assert output_error(W, r32.Q, X) == pytest.approx(output_error(W, r64.Q, X), rel=0.05)


def test_half_precision_weights():
    W, H, X = layer(seed=5, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        r = gptq_quantize(W.to(dtype), H, 4, 32, block_size=32)
        assert_invariant(r, W.shape)
        assert output_error(W, r.Q, X) < output_error(W, rtn_quantize(W, 4, 32).Q, X)


@pytest.mark.parametrize(
    "sym,act_order,group_size", [(False, False, -1), (True, True, 16), (False, True, 32)]
)
def test_masked_zeros_survive(sym, act_order, group_size):
    W, H, _ = layer(seed=6, dtype=torch.float32)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    W = W.masked_fill(mask, 0)  # as after pruning; the sweep's updates would move them
    r = gptq_quantize(W, H, 3, group_size, sym, act_order, block_size=32, mask=mask)
    assert torch.all(r.Q[mask] == 0)
    assert torch.equal(r.codes[mask].float(), r.zero[r.g_idx.long()].T[mask])
    assert_invariant(r, W.shape)


def test_symmetric_zero_point():
    W, H, _ = layer(seed=7)
    for bits in (2, 3, 4, 8):
        r = gptq_quantize(W, H, bits, 32, sym=True)
        assert torch.all(r.zero == 2 ** (bits - 1))


def test_dead_columns_are_zeroed():
    W, H, X = layer(seed=8)
    X[:, [5, 40]] = 0
    H = 2 / N * X.T @ X
    r = gptq_quantize(W, H, 4, 16, act_order=True, block_size=32)
    assert torch.all(r.Q[:, [5, 40]] == 0)
    assert torch.isfinite(r.Q).all()


def test_singular_hessian_raises_damping():
    W, H, _ = layer(seed=9)
    H = torch.ones(COLS, COLS, dtype=torch.float64)  # rank one: fails Cholesky undamped
    r = gptq_quantize(W, H, 4, damp=0.0)
    assert r.damp_fraction > 0
    assert torch.isfinite(r.Q).all()


def test_rtn_matches_grid_and_mask():
    W, _, _ = layer(seed=10, dtype=torch.float32)
    r = rtn_quantize(W, 4, 32)
    for g in range(COLS // 32):
        cols = slice(32 * g, 32 * (g + 1))
        grid = fit_grid(W[:, cols], 4, False)
        assert torch.equal(r.codes[:, cols], quantize_codes(W[:, cols], grid).int())
    assert_invariant(r, W.shape)
    assert r.error == pytest.approx(float(((W - r.Q) ** 2).sum()) / 2)
    mask = W.abs() < 0.5
    rm = rtn_quantize(W, 3, -1, sym=True, mask=mask)
    assert torch.all(rm.Q[mask] == 0) and torch.all(rm.codes[mask] == 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, static_groups=True), "static_groups"),
        (dict(bits=4, block_size=0), "block_size"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    W, H, _ = layer()
    with pytest.raises(ValueError, match=match):
        gptq_quantize(W, H, **kwargs)


def test_bad_shapes_and_values_raise():
    W, H, _ = layer()
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, H[:-1, :-1], 4)
    with pytest.raises(ValueError, match="mask"):
        gptq_quantize(W, H, 4, mask=torch.zeros(ROWS, COLS))
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(W[0], H, 4)
    H = H.clone()
    H[0, 0] = float("nan")
    with pytest.raises(HessianError):
        gptq_quantize(W, H, 4)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(W, 1)


def test_grids_never_have_zero_point_zero_so_v1_checkpoints_can_store_them() -> None:
    """A group with no negative weight would get z = 0, which the v1 format (z - 1) cannot hold."""
    from quant.grid import fit_grid, quantize
    from quant.pack import pack_gptq, unpack_gptq

    W = torch.rand(64, 32) + 0.1  # all positive
    W[1] = -W[1]  # one all-negative row, one mixed row
    W[2, :16] = -W[2, :16]
    grid = fit_grid(W, 4, sym=False)
    assert bool((grid.zero >= 1).all())
    err = (quantize(W, grid) - W).abs().max(dim=1).values
    assert bool((err <= grid.scale.squeeze(1) / 2 + 1e-6).all())  # still round-to-nearest within range
    result = rtn_quantize(W, 4, group_size=-1)
    packed = pack_gptq(result.codes, result.scale, result.zero, result.g_idx, 4)
    codes, zero, _ = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    assert torch.equal(codes, result.codes) and torch.equal(zero.float(), result.zero)


@pytest.mark.parametrize("group_size,static", [(32, False), (-1, False), (32, True)])
def test_a_batched_sweep_equals_separate_gptq_runs(group_size: int, static: bool) -> None:
    """The experts of one block in one column sweep: each matrix with its own Hessian and
    damping, results identical to quantizing each alone."""
    from quant.gptq import gptq_quantize_batch

    layers = [correlated_layer(seed, torch.float64, 24, 64, 256) for seed in range(3)]
    Ws, Hs = [layer[0] for layer in layers], [layer[1] for layer in layers]
    mask = torch.rand(24, 64, generator=torch.Generator().manual_seed(5)) < 0.3
    masks = [None, mask, None]
    batched = gptq_quantize_batch(Ws, Hs, 4, group_size, static_groups=static, masks=masks)
    for W, H, m, got in zip(Ws, Hs, masks, batched):
        alone = gptq_quantize(W, H, 4, group_size, static_groups=static, mask=m)
        assert torch.equal(got.codes, alone.codes) and torch.equal(got.scale, alone.scale)
        torch.testing.assert_close(got.Q, alone.Q, rtol=0, atol=1e-12)
        assert got.error == pytest.approx(alone.error, rel=1e-9) and got.damp_fraction == alone.damp_fraction
