"""Block-output refinement (quant.refine_steps): its start is GPTQ's solution exactly, its steps
lower the layer's output error, and the stage's exports reload, stream and resume like GPTQ's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine.calibration import LayerBatch, LayerOutputs
from engine.errors import ShrinkError
from quant.config import QuantConfig, check_quant_config
from quant.gptq import gptq_quantize
from quant.refine import RefineSettings, Tunable, _windows, reference_rows, refine_layer
from tests.conftest import ROOT, correlated_layer, run_shrink, tiny_data_overrides
from tests.engine.test_streaming import tensors
from tests.quant.test_gptaq import lazy_equals_eager_and_reloads

CPU = torch.device("cpu")


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the CPU's calibration default
def test_the_start_is_the_gptq_solution_exactly(act_order: bool, dtype: torch.dtype) -> None:
    W, H, _ = correlated_layer(0, dtype, 32, 96, 400)
    r = gptq_quantize(W, H, 3, 32, True, act_order)
    assert r.W_pre.dtype == dtype  # the values GPTQ rounded, in the precision it rounded them in
    t = Tunable(r, torch.device("cpu"))
    assert torch.equal(t.weight().to(r.Q.dtype), r.Q)
    # the written-out gradients are autograd's through round's straight-through estimator
    G = torch.randn_like(r.Q)
    V = torch.zeros_like(r.W_pre, requires_grad=True)
    c = torch.ones_like(t.c, requires_grad=True)
    ce = c @ t.E
    x = t.X0 / ce + V
    q = torch.clamp(x + (torch.round(x) - x).detach(), t.low, t.high)
    (t.s0 * ce * q * G).sum().backward()
    m = t.inside.to(dtype)
    torch.testing.assert_close(torch.sign(G) * m, torch.sign(V.grad))
    torch.testing.assert_close((G * t.s0 * (t.q - m * t.X0 / t.ce)) @ t.E.T, c.grad, rtol=1e-4, atol=1e-5)
    same = t.result()
    assert torch.equal(same.codes, r.codes) and torch.equal(same.scale, r.scale) and torch.equal(same.Q, r.Q)


class TwoLinears(nn.Module):
    """A decoder-layer stand-in: residual MLP of two Linears (the call signature the engine records)."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(width, 2 * width, bias=False), nn.Linear(2 * width, width, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.down(torch.relu(self.up(hidden_states)))


def test_refinement_lowers_the_output_error_of_a_gptq_layer() -> None:
    width, windows, seq = 32, 16, 24
    layer = TwoLinears(width, 0)
    original = TwoLinears(width, 0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, seq, width, generator=g) for _ in range(windows // 4)]
    with torch.no_grad():
        targets = [original(x) for x in xs]
    results = {}
    for name in ("up", "down"):  # GPTQ on each Linear's own inputs (as calibration gives them)
        linear = getattr(layer, name)
        with torch.no_grad():
            inp = torch.cat([x.reshape(-1, width) for x in xs]) if name == "up" else \
                torch.relu(torch.cat([layer.up(x).reshape(-1, 2 * width) for x in xs]))
        r = gptq_quantize(linear.weight.detach(), 2 / inp.shape[0] * inp.T @ inp, 2, 16, True)
        linear.weight.data.copy_(r.Q)
        results[f"l.{name}"] = r

    def error() -> float:
        with torch.no_grad():
            return sum(float(((layer(x) - t) ** 2).mean()) for x, t in zip(xs, targets))

    before = error()
    out = LayerOutputs(0, layer, [LayerBatch((x,), {}) for x in xs], targets, {"up": layer.up, "down": layer.down},
                       {"up": "l.up", "down": "l.down"}, torch.device("cpu"))
    stats = refine_layer(out, results, RefineSettings(steps=40, lr=0.01, windows=2))
    after = error()
    assert after < 0.9 * before, (before, after)
    assert 0 < stats["refine_codes_changed"] < 0.5
    for name in ("up", "down"):  # the layer holds the refined results, on the same grids
        r = results[f"l.{name}"]
        assert torch.equal(getattr(layer, name).weight.data, r.Q)
        g_idx = r.g_idx.long()
        assert torch.equal(r.Q, (r.codes.float() - r.zero[g_idx].T) * r.scale[g_idx].T)
        assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= 3


@pytest.mark.parametrize("change,key", [({"refine_steps": -1}, "quant.refine_steps"),
                                        ({"refine_steps": 5, "method": "rtn"}, "quant.refine_steps"),
                                        ({"refine_lr": 0.0}, "quant.refine_lr"),
                                        ({"refine_windows": 0}, "quant.refine_windows")])
def test_bad_settings_are_refused(change: dict, key: str) -> None:
    with pytest.raises(ShrinkError, match=f"^{key}: "):
        check_quant_config(QuantConfig(**change))


def test_torchrun_is_refused_in_one_line_before_any_model_loads(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "shrink", "pipeline=quantize", "model.path=/nonexistent/model", "quant.refine_steps=5",
                           f"out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "shrink: error: quant.refine_steps: the block refinement runs in one process, not under torchrun" \
        in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,extra", [("llama", ["quant.gptaq=true"]), ("mixtral", ["quant.scale_search=mse"]),
                                          ("qwen2", ["quant.act_order=true", "quant.bits=3"])])
def test_a_refined_export_reloads_and_lazy_equals_eager(tmp_path, tiny_model_dir, family, extra) -> None:
    folder = tiny_model_dir(family)
    common = ["pipeline=quantize", f"model.path={folder}", "quant.group_size=32", "quant.refine_steps=6",
              *tiny_data_overrides(), *extra]
    eager = lazy_equals_eager_and_reloads(tmp_path, common)
    profile = eager["stages"]["quantize"]["profile"]
    assert all(p["after_layer"]["refine_mse_first"] > 0 and p["after_layer"]["refine_mse_after"] > 0 for p in profile)
    # the report's fingerprints name the refined weights, and GPTQ's beside them: layer 0 (the same
    # inputs with or without refinement) was solved to exactly the weights of a run without it
    refined = eager["stages"]["quantize"]["layers"]
    plain_run = run_shrink([*common, "quant.refine_steps=0"], tmp_path / "plain")["stages"]["quantize"]
    plain = plain_run["layers"]
    # forwards: + the reference stream's (GPTAQ runs it anyway) and the refined layer's, but the expert
    # layers' rerun path spares its output forward (the refined one replaces it)
    extra = ("quant.gptaq=true" not in extra) + (family != "mixtral")
    assert [p["forwards"] for p in profile] == pytest.approx([p["forwards"] + extra for p in plain_run["profile"]])
    moved = [e for e in refined if "weights_before_hook" in e["fingerprint"]]
    assert moved and all(e["fingerprint"]["weights"] != e["fingerprint"]["weights_before_hook"] for e in moved)
    gptq = {e["full_name"]: e["fingerprint"]["weights"] for e in plain if e["layer"] == 0}
    assert {e["full_name"]: e["fingerprint"].get("weights_before_hook", e["fingerprint"]["weights"])
            for e in refined if e["layer"] == 0} == gptq


@pytest.mark.parametrize("sizes,steps,windows", [([8] * 16, 25, 2), ([8, 8, 1], 10, 2), ([4, 4, 3], 7, 3),
                                                 ([8, 8], 30, 2), ([5], 3, 8)])
def test_the_reference_stream_keeps_the_rows_the_steps_read_and_no_more(sizes, steps, windows) -> None:
    """The steps walk the same windows whether the targets hold every row or the heads the
    reference stream keeps (compress_model's reference_rows), and read the last head row."""
    settings = RefineSettings(steps, 0.01, windows)
    rows = reference_rows(settings, sizes)

    def walk(kept: int) -> list[tuple[int, int, int]]:
        out = LayerOutputs(0, nn.Identity(), [], [torch.zeros(min(n, kept), 1) for n in sizes], {}, {}, CPU)
        return [(b, r.start, r.stop) for b, r in _windows(out, settings)]

    full = walk(max(sizes))
    assert walk(rows) == full
    assert max(stop for _b, _start, stop in full) == rows
    if (sizes, steps) == ([8] * 16, 25):  # quant=best's steps on 128 windows in batches of 8: half of them
        assert rows == 4


def test_pruned_zeros_stay_zero(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    run_shrink(["pipeline=prune_quantize", f"model.path={folder}", "prune=sparsegpt_2of4", "quant.group_size=32",
                "quant.refine_steps=6", *tiny_data_overrides()], tmp_path / "run")
    from quant.layout import from_disk
    from quant.pack import dequantize_gptq

    qcfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]
    t = from_disk(tensors(tmp_path / "run" / "model"), qcfg)  # GPTQ tensors whatever the layout
    base = "model.layers.1.mlp.down_proj"
    fmt = "gptq_v2" if qcfg["quant_method"] == "awq" else "gptq"  # from_disk gives v2 zero points
    W = dequantize_gptq(t[f"{base}.qweight"], t[f"{base}.qzeros"], t[f"{base}.scales"], t[f"{base}.g_idx"], 4,
                        checkpoint_format=fmt)
    zeros = (W == 0).reshape(W.shape[0], -1, 4).sum(-1)
    assert bool((zeros >= 2).all())  # 2:4: at least two zeros in every four inputs


def test_the_best_preset_composes_and_passes_the_checks() -> None:
    from shrink.config import compose

    quant = compose(["quant=best"]).quant
    check_quant_config(quant)
    assert quant.method == "gptq" and quant.scale_search is not None
    assert compose(["quant=best", "quant.bits=3", "quant.sym=true"]).quant.bits == 3
    # it sets the calibration's precision too, over the data preset's, under the command line's
    assert not quant.true_sequential and quant.refine_steps > 0
    assert compose(["data=docs_en", "quant=best"]).data.calib.dtype == "bfloat16-autocast"
    assert compose(["quant=best", "data.calib.dtype=float64"]).data.calib.dtype == "float64"
    assert compose([]).data.calib.dtype == "auto"
