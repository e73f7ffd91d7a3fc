"""The `shrink` CLI as a user runs it: presets compose, bad input fails cleanly, eval is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine.errors import ShrinkError
from shrink.config import compose
from tests.conftest import ROOT, SHAKESPEARE_EVAL, TEACHER, needs_shared

CONF = ROOT / "conf"


def presets() -> list[tuple[str, str]]:
    return [(group.name, f.stem) for group in sorted(CONF.iterdir()) if group.is_dir()
            for f in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("group,name", presets())
def test_every_preset_composes_against_the_schema(group: str, name: str) -> None:
    cfg = compose([f"{group}={name}"])
    OmegaConf.to_container(cfg[group], resolve=True)  # every value typed & resolvable


def test_unknown_key_and_bad_type_are_rejected_when_composing() -> None:
    with pytest.raises(ShrinkError, match="quant.nbits"):
        compose(["quant.nbits=4"])
    with pytest.raises(ShrinkError, match="quant.bits"):
        compose(["quant.bits=four"])


def shrink(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "shrink.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


@pytest.mark.slow
def test_bad_inputs_exit_nonzero_with_one_line_and_no_model_folder(tmp_path, tiny_model_dir) -> None:
    out = tmp_path / "out"
    model = tiny_model_dir("llama")
    cases = {
        "model.path": ["pipeline=eval", f"model.path={tmp_path / 'nope'}"],
        "data.eval.path": ["pipeline=eval", f"model.path={model}", f"data.eval.path={tmp_path / 'none.jsonl'}"],
        "pipeline.stages": ["pipeline=eval", f"model.path={model}", "pipeline.stages=[eval,compile]"],
    }
    for key, args in cases.items():
        result = shrink(*args, f"out={out}")
        assert result.returncode == 2, result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("shrink: error:")]
        assert len(error_lines) == 1 and key in error_lines[0], result.stderr
        assert not (out / "model").exists()
    result = shrink("pipeline=eval", "quant.nbits=4", f"out={out}")
    assert result.returncode != 0 and "quant.nbits" in result.stderr


@pytest.mark.slow
def test_every_job_of_a_sweep_is_checked_before_anything_is_written(tmp_path) -> None:
    """A bad value anywhere in a sweep (wrong type, unknown method, unsupported bits, unknown
    stage) fails the whole command at once: no job runs and no sweep folder is created."""
    sweep = tmp_path / "sweep"
    cases = {
        "quant.bits": ["quant.bits=4,four"],
        "prune.method": ["pipeline=prune", "prune.method=sparsegpt,magnitude,obc"],
        "quant.bits: 5": ["pipeline=quantize", "quant.bits=4,5"],
        "unknown stage 'compile'": ["pipeline.stages=[eval],[eval,compile]"],
    }
    for expected, args in cases.items():
        result = shrink("-m", *args, f"hydra.sweep.dir={sweep}")
        assert result.returncode == 2, result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("shrink: error:")]
        assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
        assert not sweep.exists()


@pytest.mark.slow
def test_tokenizer_vocab_larger_than_embedding_is_refused(tmp_path, shipped_tokenizer) -> None:
    import transformers

    from tests.conftest import save_with_tokenizer, tiny_config

    config = tiny_config("llama")
    config.vocab_size = 1000
    folder = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "small-vocab",
                                 shipped_tokenizer)
    result = shrink("pipeline=eval", f"model.path={folder}", f"data.eval.path={SHAKESPEARE_EVAL}",
                    f"out={tmp_path / 'out'}")
    assert result.returncode == 2 and "tokenizer/vocab mismatch" in result.stderr


@pytest.mark.slow
@needs_shared
def test_eval_of_the_shared_teacher_matches_the_reference_perplexity(tmp_path) -> None:
    """The protocol of ../shared/README.md: 16.597 in fp32 on docs-en test."""
    out = tmp_path / "run"
    result = shrink("pipeline=eval", "model=llama_teacher", "data=docs_en", "eval.batch_size=8", f"out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    # torchao's CPU "Failed to load" lines and torch's pytree deprecations are kept out of the log
    assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr[:2000]
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["ppl"]["docs-en-test"] - 16.597) < 0.01
    assert metrics["params"] == 15_700_000 or abs(metrics["params"] - 15.7e6) < 0.05e6
    assert metrics["size_bytes"] == (TEACHER / "model.safetensors").stat().st_size
    assert metrics["peak_memory_bytes"]["cpu"] > 0
    recipe = OmegaConf.load(out / "recipe.yaml")
    assert recipe.model.path == str(TEACHER) or Path(recipe.model.path).resolve() == TEACHER.resolve()
    assert not (out / "model").exists()  # eval changes nothing, so nothing is exported
