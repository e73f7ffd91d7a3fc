"""GPTAQ (quant.gptaq): the asymmetric sweep against a textbook loop, the paired statistics of the
reference stream (engine/reference.py) against brute force, and the stage on dense and MoE
models, streamed (model.lazy) and on two ranks, each equal to the one-process eager run."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.calibration import compress_model
from engine.config import MoeConfig
from engine.errors import ShrinkError
from engine.hessian import HessianAccumulator
from engine.modeling import find_decoder_layers, find_linears, set_weight_matrix, weight_matrix
from engine.reference import PairedAccumulator
from quant.config import QuantConfig, check_quant_config
from quant.gptq import asymmetric_update, gptq_quantize, rtn_quantize
from quant.grid import dequantize_codes, fit_grid, quantize_codes
from tests.conftest import correlated_layer, run_shrink, tiny_data_overrides, tiny_model
from tests.engine.test_streaming import tensors
from tests.quant.test_gptq import ref_hinv
from tests.shrink.test_distributed_calib import single, torchrun

ROWS, COLS, N = 24, 96, 400


def asymmetric_layer(seed: int, noise: float = 0.3):
    """W, X (the compressed model's inputs), X~ (the full-precision model's): X~ = X + correlated noise."""
    W, _, X = correlated_layer(seed, torch.float64, ROWS, COLS, N)
    g = torch.Generator().manual_seed(seed + 100)
    Xt = X + noise * X @ (torch.randn(COLS, COLS, generator=g, dtype=torch.float64) / COLS**0.5)
    H = 2 / N * X.T @ X
    dXXT = 2 / N * (Xt - X).T @ X
    return W, H, X, Xt, dXXT


def ref_gptaq(W, H, dXXT, bits, group_size, sym, alpha, act_order=False, damp=0.01):
    """One column at a time: round column i, charge err = (w - q) / U_ii, W[:, i:] -= err U[i, i:]
    and += w P[i, i:], P = alpha triu(dXXT U^T, 1) U (the paper's update, w the column when fixed)."""
    W, H, dXXT = W.clone(), H.clone(), dXXT.clone()
    cols = W.shape[1]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H, dXXT = W[:, perm], H[perm][:, perm], dXXT[perm][:, perm]
    U = ref_hinv(H, damp)
    P = alpha * torch.triu(dXXT @ U.T, diagonal=1) @ U
    size = cols if group_size == -1 else group_size
    codes = torch.zeros_like(W, dtype=torch.int32)
    grid = None
    for i in range(cols):
        if i % size == 0:
            grid = fit_grid(W[:, i:i + size], bits, sym)
        w = W[:, i].clone()
        c = quantize_codes(w[:, None], grid)[:, 0]
        q = dequantize_codes(c[:, None], grid)[:, 0]
        W[:, i:] -= ((w - q) / U[i, i])[:, None] * U[i, i:][None, :]
        W[:, i:] += w[:, None] * P[i, i:][None, :]
        codes[:, perm[i]] = c.to(torch.int32)
    return codes


@pytest.mark.parametrize("bits,group_size,sym,act_order,block_size", [
    (4, 32, True, False, 32), (3, 40, False, False, 16), (3, 16, True, True, 32), (2, -1, False, False, 64)])
def test_the_blocked_asymmetric_sweep_is_the_textbook_loop(bits, group_size, sym, act_order, block_size) -> None:
    W, H, _, _, dXXT = asymmetric_layer(bits + group_size)
    r = gptq_quantize(W, H, bits, group_size, sym, act_order, block_size=block_size, dXXT=dXXT, alpha=0.5)
    assert torch.equal(r.codes, ref_gptaq(W, H, dXXT, bits, group_size, sym, 0.5, act_order))


def test_no_input_error_is_plain_gptq_and_the_batched_sweep_agrees() -> None:
    W, H, _, _, dXXT = asymmetric_layer(1)
    plain = gptq_quantize(W, H, 3, 32, True)
    same = gptq_quantize(W, H, 3, 32, True, dXXT=torch.zeros_like(H))
    assert torch.equal(plain.codes, same.codes) and plain.error == same.error
    W2, H2, _, _, dXXT2 = asymmetric_layer(2)
    from quant.gptq import gptq_quantize_batch
    both = gptq_quantize_batch([W, W2], [H, H2], 3, 32, True, dXXTs=[dXXT, dXXT2], alpha=0.3)
    for r, (w, h, d) in zip(both, [(W, H, dXXT), (W2, H2, dXXT2)]):
        assert torch.equal(r.codes, gptq_quantize(w, h, 3, 32, True, dXXT=d, alpha=0.3).codes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptaq_reproduces_the_full_precision_outputs_better_than_gptq(seed: int) -> None:
    """||W X~ - Q X||: what GPTAQ minimizes; GPTQ only sees X."""
    W, H, X, Xt, dXXT = asymmetric_layer(seed)
    target = W @ Xt.T

    def err(Q):
        return float(((target - Q @ X.T) ** 2).sum())

    gptq = gptq_quantize(W, H, 4, 32, True).Q.double()
    gptaq = gptq_quantize(W, H, 4, 32, True, dXXT=dXXT, alpha=1.0).Q.double()
    assert err(gptaq) < 0.8 * err(gptq)
    P = asymmetric_update(dXXT, ref_hinv(H, 0.01), 0.25)
    assert torch.equal(P, torch.triu(P, diagonal=1))  # strictly upper: a column never corrects itself


def test_the_paired_accumulator_holds_h_and_the_cross_term_whatever_the_batching() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 48, generator=g)
    Xt = X + 0.1 * torch.randn(3000, 48, generator=g)
    plain, paired, split = HessianAccumulator(48), PairedAccumulator(48), PairedAccumulator(48)
    plain.add(X)
    for a in range(0, 3000, 500):  # staged and multiplied in blocks of 2000 rows, however they come
        paired.add(paired.pair(X[a:a + 500], Xt[a:a + 500]))
    for a in range(0, 3000, 250):
        split.add(split.pair(X[a:a + 250], Xt[a:a + 250]))
    torch.testing.assert_close(paired.H, plain.H, rtol=1e-5, atol=1e-5)
    cross = 2 / 3000 * (Xt - X).double().T @ X.double()
    torch.testing.assert_close(paired.cross.double(), cross, rtol=1e-4, atol=1e-6)
    assert torch.equal(split.H, paired.H) and torch.equal(split.cross, paired.cross)
    assert paired.n == 3000 and paired.diagonal().shape == (48,)


def identity(job) -> dict:
    return {}


def record_cross(seen: dict, change=None):
    def compressor(job) -> dict:
        seen[job.full_name] = (job.cross.clone() if job.cross is not None else None, job.hessian.H.clone())
        if change is not None:
            W = weight_matrix(job.module)
            set_weight_matrix(job.module, change(W.float()).to(W.dtype))
        return {}
    return compressor


def windows(model, n: int = 8, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_the_reference_stream_pairs_every_input_with_itself_when_nothing_changes(family: str) -> None:
    """An identity compressor: the two streams are the same computation, so every cross term is 0
    exactly (expert Linears too: every token runs through every expert in both), and H is the
    unpaired run's."""
    model = tiny_model(family)
    data = windows(model)
    seen: dict = {}
    compress_model(model, data, record_cross(seen), torch.device("cpu"), batch_size=2, paired=True)
    plain: dict = {}
    compress_model(copy.deepcopy(model), data, lambda job: plain.__setitem__(job.full_name, job.hessian.H.clone()) or {},
                   torch.device("cpu"), batch_size=2)
    assert seen.keys() == plain.keys() and (family != "mixtral" or any(".experts." in k for k in seen))
    for name, (cross, H) in seen.items():
        assert cross is not None and torch.equal(cross, torch.zeros_like(cross)), name
        torch.testing.assert_close(H, plain[name], rtol=1e-5, atol=1e-6)


def test_routed_experts_are_not_paired() -> None:
    model = tiny_model("mixtral")
    seen: dict = {}
    compress_model(model, windows(model), record_cross(seen), torch.device("cpu"), batch_size=2, paired=True,
                   moe=MoeConfig(all_experts=False, min_tokens=0))
    assert all((v[0] is None) == (".experts." in k) for k, v in seen.items())


def rounded(W: torch.Tensor) -> torch.Tensor:
    return rtn_quantize(W, 2, 16, True).Q


@pytest.mark.parametrize("true_sequential", [False, True])
def test_the_cross_term_is_the_brute_force_one(true_sequential: bool) -> None:
    """Layer 1's inputs in the full-precision model against its inputs once layer 0 (and, true-
    sequentially, the groups before) are rounded: 2/n sum (x~ - x) x^T, for every Linear of layer 1."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    data = windows(model)
    seen: dict = {}
    compress_model(model, data, record_cross(seen, rounded), torch.device("cpu"), batch_size=2, paired=True,
                   true_sequential=true_sequential)
    _, layers = find_decoder_layers(model)
    _, fp_layers = find_decoder_layers(original)
    for name, (cross, _) in seen.items():  # layer 0's q/k/v read the embeddings: the same in both models
        if name.endswith("layers.0.self_attn.q_proj"):
            assert torch.equal(cross, torch.zeros_like(cross))
    fp_inputs = capture(original, fp_layers[1], data)
    # the compressed model's layer 1 inputs: its layer 0 rounded; its Linears rounded before them
    # (true-sequential) or not yet (all of layer 1 calibrated on the uncompressed layer)
    probe = copy.deepcopy(model)
    _, probe_layers = find_decoder_layers(probe)
    if not true_sequential:
        probe_layers[1].load_state_dict(fp_layers[1].state_dict())
        q_inputs = capture(probe, probe_layers[1], data)
    else:  # each group saw the groups before it rounded and itself not yet: one probe per group
        q_inputs = {}
        order = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
        for k, first in enumerate(order):
            later = order[k:]
            for lname, lin in find_linears(probe_layers[1]).items():
                src = find_linears(fp_layers[1] if any(lname == o or same_group(lname, o) for o in later)
                                   else layers[1])[lname]
                set_weight_matrix(lin, weight_matrix(src))
            q_inputs[first] = capture(probe, probe_layers[1], data)[first]
    for first in ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]:
        x, xt = q_inputs[first].double(), fp_inputs[first].double()
        want = 2 / x.shape[0] * (xt - x).T @ x
        got = seen[f"model.layers.1.{first}"][0].double()
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))


def test_every_engine_path_gives_the_same_cross_terms() -> None:
    """Lockstep, lockstep with all but one batch recomputed (memory), and the re-run reference path."""
    base = tiny_model("llama")
    data = windows(base)
    runs = []
    for kwargs in ({}, {"lockstep_memory": 1}, {"_rerun": True}):
        seen: dict = {}
        compress_model(copy.deepcopy(base), data, record_cross(seen, rounded), torch.device("cpu"), batch_size=2,
                       paired=True, **kwargs)
        runs.append(seen)
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for name, (cross, H) in runs[0].items():
            assert torch.equal(other[name][0], cross) and torch.equal(other[name][1], H), name


def same_group(a: str, b: str) -> bool:
    groups = [{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"mlp.gate_proj", "mlp.up_proj"}]
    return any(a in g and b in g for g in groups)


def capture(model, layer, data) -> dict[str, torch.Tensor]:
    """Every Linear's input rows in `layer` over the windows (one forward per window pair, as the engine)."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: rows.setdefault(n, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
               for n, m in find_linears(layer).items()]
    with torch.no_grad():
        for start in range(0, data.shape[0], 2):
            model(input_ids=data[start:start + 2], use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("change,key", [({"gptaq": True, "method": "rtn"}, "quant.gptaq"),
                                        ({"gptaq": True, "gptaq_alpha": 0.0}, "quant.gptaq_alpha"),
                                        ({"gptaq_alpha": 1.5}, "quant.gptaq_alpha")])
def test_bad_settings_are_refused(change: dict, key: str) -> None:
    with pytest.raises(ShrinkError, match=f"^{key}: "):
        check_quant_config(QuantConfig(**change))


@pytest.mark.parametrize("family,extra", [("llama", []), ("mixtral", ["quant.scale_search=hessian"]),
                                          ("qwen2", ["quant.act_order=true"])])
def test_a_gptaq_export_reloads_and_lazy_equals_eager(tmp_path, tiny_model_dir, family, extra) -> None:
    folder = tiny_model_dir(family)
    common = ["pipeline=quantize", f"model.path={folder}", "quant.group_size=32", "quant.gptaq=true",
              *tiny_data_overrides(), *extra]
    eager = lazy_equals_eager_and_reloads(tmp_path, common)
    plain = run_shrink([c for c in common if c != "quant.gptaq=true"], tmp_path / "plain")
    assert eager["ppl"] != plain["ppl"]  # the cross term changed the solution


def lazy_equals_eager_and_reloads(tmp_path, common: list[str]) -> dict:
    """The eager run's metrics, after checking that the streamed run wrote the same tensors and
    figures and that the export reloads to the same perplexity."""
    eager = run_shrink(common + ["model.lazy=false"], tmp_path / "eager")
    lazy = run_shrink(common + ["model.lazy=true"], tmp_path / "lazy")
    a, b = tensors(tmp_path / "eager" / "model"), tensors(tmp_path / "lazy" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lazy["ppl"] == eager["ppl"]
    reloaded = run_shrink(["pipeline=eval", f"model.path={tmp_path / 'eager' / 'model'}", *tiny_data_overrides()],
                          tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(eager["ppl"], rel=1e-5)
    return eager


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_two_ranks_gptaq_as_one_process(tmp_path, tiny_model_dir, family: str) -> None:
    folder = tiny_model_dir(family)
    common = ["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.group_size=32",
              "quant.gptaq=true", "quant.scale_search=hessian"]
    one = single(common, tmp_path / "one")
    proc = torchrun(common, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    name = next(iter(one["ppl"]))
    assert two["ppl"][name] == pytest.approx(one["ppl"][name], rel=1e-3)
