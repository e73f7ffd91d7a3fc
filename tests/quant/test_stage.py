"""`shrink pipeline=quantize` end to end: export, reload, exactness, errors, quality."""
from __future__ import annotations

import json

import pytest
import torch

from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, load_model
from engine.config import ModelConfig
from engine.state import RunState
from tests.conftest import TEACHER, needs_shared, run_shrink, tiny_data_overrides

pytestmark = needs_shared


@pytest.mark.parametrize("family,extra", [
    ("llama", ["quant.act_order=true", "quant.group_size=32"]),
    ("llama", ["quant.act_order=true", "quant.static_groups=true", "quant.group_size=32", "quant.sym=true"]),
    ("gpt2", ["quant.bits=3", "quant.group_size=-1"]),
    ("opt", ["quant.bits=8", "quant.group_size=32"]),
    ("gpt_neox", ["quant.bits=2", "quant.group_size=32", "quant.true_sequential=false"]),
])
def test_quantized_export_reloads_to_the_same_perplexity(tmp_path, tiny_model_dir, family, extra) -> None:
    folder = tiny_model_dir(family)
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), *extra], out)
    config = json.loads((out / "model" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    # the in-run evaluation already went through the packed QuantLinears that were exported
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)
    assert reloaded["params"] == metrics["params"]
    assert metrics["size_bytes"] < (folder / "model.safetensors").stat().st_size
    report = metrics["stages"]["quantize"]["layers"]
    assert len(report) == 2 * len([r for r in report if r["layer"] == 0])
    assert all(r["rel_error"] >= 0 and "damp" in r for r in report)


def test_group_size_not_dividing_the_inputs_gives_shorter_last_groups(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(),
                          "quant.group_size=48", "eval.baseline=false"], out)
    from safetensors.torch import load_file

    tensors = load_file(out / "model" / "model.safetensors")
    in_features = tensors["model.layers.0.mlp.down_proj.g_idx"].numel()
    assert in_features % 48  # the case under test
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape[0] == -(-in_features // 48)
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    assert reloaded["ppl"]["docs-en-test"] == pytest.approx(metrics["ppl"]["docs-en-test"], rel=1e-4)


@pytest.mark.parametrize("override,key", [("quant.bits=5", "quant.bits"), ("quant.method=awq", "quant.method"),
                                          ("quant.group_size=0", "quant.group_size")])
def test_bad_settings_are_refused(tmp_path, tiny_model_dir, override, key) -> None:
    with pytest.raises(ShrinkError, match=key):
        run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(), override],
                   tmp_path / "run")


def test_gptq_beats_rtn_on_the_shared_teacher(tmp_path) -> None:
    """Same calibration and eval windows: GPTQ 3-bit per-channel must beat RTN clearly."""
    common = ["pipeline=quantize", "model=llama_teacher", "data=docs_en", "data.calib.num_samples=32",
              "data.eval.max_windows=48", "eval.batch_size=8", "quant.bits=3", "quant.group_size=-1"]
    rtn = run_shrink(common + ["quant.method=rtn"], tmp_path / "rtn")["ppl"]["docs-en-test"]
    gptq = run_shrink(common + ["quant.method=gptq"], tmp_path / "gptq")["ppl"]["docs-en-test"]
    assert gptq < rtn - 0.3, (gptq, rtn)
