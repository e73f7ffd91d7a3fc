"""Grid search of each group's range (quant.scale_search): the kernel against a sequential scan,
its guarantees, GPTQ with a (Hessian-weighted) search against the unblocked reference sweep,
the packing, the config checks and a quantized export that reloads to the same perplexity."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.errors import ShrinkError
from quant.config import QuantConfig, check_quant_config
from quant.gptq import gptq_quantize, obs_weight, rtn_quantize
from quant.grid import Grid, ScaleSearch, fit_grid, grid_from_range, min_max, quantize
from quant.pack import pack_result, unpack_gptq
from tests.conftest import ROOT, run_shrink, tiny_data_overrides
from tests.quant.test_gptq import assert_invariant, layer, output_error, ref_gptq, ref_hinv

SEARCH = ScaleSearch(steps=50, max_shrink=0.8, norm=2.0)


def weighted_error(W: torch.Tensor, grid: Grid, norm: float, weight: torch.Tensor | None) -> torch.Tensor:
    err = (quantize(W, grid) - W).abs() ** norm
    return (err * (1 if weight is None else weight)).sum(1)


def sequential_search(W: torch.Tensor, bits: int, sym: bool, search: ScaleSearch, weight=None) -> Grid:
    """The GPTQ reference quantizer's loop: one shrink at a time, a row moves on a strictly smaller error."""
    xmin, xmax = min_max(W, sym)
    best = torch.full((W.shape[0],), float("inf"))
    scale = zero = None
    for k in range(int(search.max_shrink * search.steps)):
        p = 1 - k / search.steps
        cand = grid_from_range(p * xmin, p * xmax, bits, sym)
        err = weighted_error(W, cand, search.norm, weight)
        better = err < best
        best = torch.where(better, err, best)
        scale = cand.scale if scale is None else torch.where(better[:, None], cand.scale, scale)
        zero = cand.zero if zero is None else torch.where(better[:, None], cand.zero, zero)
    return Grid(scale, zero, 2**bits - 1)


@pytest.mark.parametrize("bits,sym,weighted", [(3, True, False), (4, False, False), (2, False, True), (3, True, True)])
def test_the_chunked_search_is_the_sequential_scan(bits: int, sym: bool, weighted: bool) -> None:
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(40, 64, generator=g) * (torch.rand(40, 1, generator=g) + 0.1)
    W[3, 7] = 9.0  # an outlier: the min/max range wastes most levels on it
    weight = torch.rand(64, generator=g) if weighted else None
    got = fit_grid(W, bits, sym, ScaleSearch(steps=50, chunk=7), weight)
    want = sequential_search(W, bits, sym, ScaleSearch(steps=50), weight)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


@pytest.mark.parametrize("sym", [True, False])
def test_the_search_never_does_worse_than_min_max_and_keeps_the_grid_rules(sym: bool) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g).pow(3)  # heavy tails
    minmax = fit_grid(W, 3, sym)
    searched = fit_grid(W, 3, sym, SEARCH)
    before, after = weighted_error(W, minmax, 2.0, None), weighted_error(W, searched, 2.0, None)
    assert bool((after <= before).all()) and float(after.sum()) < 0.95 * float(before.sum())
    assert bool((searched.scale <= minmax.scale + 1e-7).all())  # only ever shrinks the range
    if sym:
        assert bool((searched.zero == 4).all())  # the symmetric zero point the format stores
    else:
        assert bool((searched.zero >= 1).all())  # v1 checkpoints cannot store z = 0
    # steps=1: the min/max grid itself
    one = fit_grid(W, 3, sym, ScaleSearch(steps=1, max_shrink=0.5))
    assert torch.equal(one.scale, minmax.scale) and torch.equal(one.zero, minmax.zero)


CASES = [  # bits, group_size, sym, act_order, static, block_size, weighted
    (3, 16, True, False, False, 32, False),
    (4, 32, False, True, False, 16, True),
    (3, 40, True, True, True, 32, True),
    (2, -1, False, False, False, 32, True),
]


@pytest.mark.parametrize("bits,group_size,sym,act_order,static,block_size,weighted", CASES)
def test_gptq_with_a_search_matches_the_unblocked_reference(bits, group_size, sym, act_order, static, block_size,
                                                            weighted) -> None:
    W, H, _ = layer(seed=bits + group_size)
    search = ScaleSearch(steps=20, weighted=weighted)
    r = gptq_quantize(W, H, bits, group_size, sym, act_order, static, block_size=block_size, search=search)
    # the reference sweep with its grids fitted by the same search, weighted by 1/U_jj^2 of its own Hinv
    weight = None
    if weighted:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(W.shape[1])
        U = ref_hinv(H[perm][:, perm], 0.01)
        weight = torch.empty(W.shape[1], dtype=torch.float64)
        weight[perm] = obs_weight(U, torch.zeros(W.shape[1], dtype=torch.bool)).double()
    codes, g_idx, scale, zero, loss = ref_gptq(W, H, bits, group_size, sym, act_order, static,
                                               search=search, weight=weight)
    assert torch.equal(r.codes, codes) and torch.equal(r.g_idx, g_idx)
    torch.testing.assert_close(r.scale, scale.float(), rtol=1e-6, atol=0)
    assert torch.equal(r.zero, zero.float())
    assert r.error == pytest.approx(loss, rel=1e-9)
    assert_invariant_loose(r, W.shape)


def assert_invariant_loose(r, shape) -> None:
    """assert_invariant, less its check that the codes reach both ends (a shrunk range clips them anyway)."""
    g = r.g_idx.long()
    assert r.Q.shape == shape and torch.equal(r.Q, (r.codes.float() - r.zero[g].T) * r.scale[g].T)


@pytest.mark.parametrize("weighted", [False, True])
def test_gptq_with_a_search_has_less_output_error_at_3_bits(weighted: bool) -> None:
    W, H, X = layer(seed=7, dtype=torch.float32, rows=64, cols=128)
    W[5, 9] *= 8  # an outlier per some groups
    plain = gptq_quantize(W, H, 3, 32, sym=True)
    searched = gptq_quantize(W, H, 3, 32, sym=True, search=ScaleSearch(weighted=weighted))
    assert output_error(W, searched.Q, X) < 0.9 * output_error(W, plain.Q, X)


def test_rtn_search_and_the_packing_is_unchanged() -> None:
    W, _, _ = layer(seed=3, dtype=torch.float32, rows=64, cols=128)
    plain, searched = rtn_quantize(W, 3, 32, True), rtn_quantize(W, 3, 32, True, search=SEARCH)
    assert float(((searched.Q - W) ** 2).sum()) < float(((plain.Q - W) ** 2).sum())
    assert torch.equal(searched.W_pre, W) and torch.equal(plain.W_pre, W)
    linear = torch.nn.Linear(128, 64, bias=False)
    packed = pack_result(searched, linear)
    codes, zero, scale = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 3)
    assert torch.equal(codes, searched.codes) and torch.equal(zero, searched.zero)
    assert torch.equal(scale, searched.scale.half().float())
    full = layer(seed=3, dtype=torch.float32, rows=64, cols=128)
    assert_invariant(rtn_quantize(full[0], 3, 32, True), W.shape)


@pytest.mark.parametrize("change,key", [
    ({"scale_search": "l1"}, "quant.scale_search"),
    ({"scale_search": "hessian", "method": "rtn"}, "quant.scale_search"),
    ({"scale_search": "mse", "scale_steps": 0}, "quant.scale_steps"),
    ({"scale_search": "mse", "scale_max_shrink": 1.0}, "quant.scale_max_shrink"),
    ({"scale_search": "mse", "scale_norm": 0.0}, "quant.scale_norm"),
])
def test_bad_settings_are_refused_by_the_config_check(change: dict, key: str) -> None:
    with pytest.raises(ShrinkError, match=f"^{key}: "):
        check_quant_config(QuantConfig(**change))


def test_a_bad_value_is_one_line_before_any_model_loads(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "shrink.cli", "pipeline=quantize", "model.path=/nonexistent/model",
                           "quant.scale_search=minmax", f"out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "shrink: error: quant.scale_search: 'minmax' is not one of mse | hessian | null"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,extra", [("llama", ["quant.scale_search=hessian", "quant.sym=true"]),
                                          ("qwen2", ["quant.scale_search=mse", "quant.bits=3", "quant.group_size=32"]),
                                          ("llama", ["quant.method=rtn", "quant.scale_search=mse"])])
def test_a_searched_export_reloads_to_the_same_perplexity(tmp_path, tiny_model_dir, family, extra) -> None:
    folder = tiny_model_dir(family)
    common = [f"model.path={folder}", *tiny_data_overrides()]
    metrics = run_shrink(["pipeline=quantize", *common, *extra], tmp_path / "run")
    reloaded = run_shrink(["pipeline=eval", f"model.path={tmp_path / 'run' / 'model'}", *tiny_data_overrides()],
                          tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)
