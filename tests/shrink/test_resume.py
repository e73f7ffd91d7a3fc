"""Reproducible recipes and resumable pipelines."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from engine.errors import ShrinkError
from tests.conftest import ROOT, SHAKESPEARE_EVAL, SHAKESPEARE_TRAIN, run_shrink, tiny_data_overrides


def prune_quantize(folder, extra=()) -> list[str]:
    return ["pipeline=prune_quantize", f"model.path={folder}", *tiny_data_overrides(), "prune.pattern='2:4'",
            "quant.group_size=32", "quant.act_order=true", *extra]


@pytest.mark.slow
def test_rerunning_recipe_yaml_reproduces_the_weights_byte_for_byte(tmp_path, tiny_model_dir) -> None:
    first = tmp_path / "first"
    run_shrink(prune_quantize(tiny_model_dir("llama")), first)
    recipe = yaml.safe_load((first / "recipe.yaml").read_text())
    assert recipe["defaults"] == ["shrink_schema", "_self_"]
    fp = recipe["fingerprints"]
    assert set(fp["inputs"]["model"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert set(fp["inputs"]["data"]) == {"data.calib.path", "data.eval.path"}
    assert fp["packages"]["torch"] and fp["seed"] == 0
    second = tmp_path / "second"
    result = subprocess.run([sys.executable, "-m", "shrink.cli", "--config-dir", str(first), "--config-name", "recipe",
                             f"out={second}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a = (first / "model" / "model.safetensors").read_bytes()
    assert a == (second / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_recipe_refuses_changed_inputs(tmp_path, tiny_model_dir) -> None:
    calib = tmp_path / "calib.jsonl.gz"
    shutil.copy(SHAKESPEARE_TRAIN, calib)
    first = tmp_path / "first"
    run_shrink(prune_quantize(tiny_model_dir("llama"), [f"data.calib.path={calib}"]), first)
    shutil.copy(SHAKESPEARE_EVAL, calib)  # the data changed under the recipe
    result = subprocess.run([sys.executable, "-m", "shrink.cli", "--config-dir", str(first), "--config-name", "recipe",
                             f"out={tmp_path / 'second'}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 2 and "data.calib.path" in result.stderr and "sha256" in result.stderr


def test_resume_skips_finished_stages_and_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_model_dir,
                                                                               monkeypatch) -> None:
    folder = tiny_model_dir("llama")
    reference = tmp_path / "reference"
    run_shrink(prune_quantize(folder), reference)

    out = tmp_path / "interrupted"
    import quant.stage

    def crash(state):
        raise ShrinkError("simulated failure in the quantize stage")
    monkeypatch.setattr(quant.stage, "quantize_stage", crash)
    with pytest.raises(ShrinkError, match="simulated"):
        run_shrink(prune_quantize(folder), out)
    assert (out / "checkpoints").is_dir() and not (out / "model").exists()
    with pytest.raises(ShrinkError, match="resume=true"):
        run_shrink(prune_quantize(folder), out)
    with pytest.raises(ShrinkError, match="settings differ"):
        run_shrink(prune_quantize(folder, ["quant.bits=3", "resume=true"]), out)
    monkeypatch.undo()

    import prune.stage

    monkeypatch.setattr(prune.stage, "prune_stage", lambda state: pytest.fail("prune ran again"))
    metrics = run_shrink(prune_quantize(folder, ["resume=true"]), out)
    assert (out / "model" / "model.safetensors").read_bytes() == \
        (reference / "model" / "model.safetensors").read_bytes()
    assert metrics["baseline_ppl"] and metrics["ppl"] and "prune" in metrics["stages"]
    assert not (out / "checkpoints").exists()
    with pytest.raises(ShrinkError, match="finished run"):
        run_shrink(prune_quantize(folder), out)


def test_a_failed_run_removes_only_the_folders_it_made(tmp_path) -> None:
    """out=new/x/a fails while a run beside it writes new/x/b: a's folder goes, b's and the
    folders b still needs stay; a busy out (another run's lock) is left as that run has it."""
    from shrink.resume import RunFolder

    a, b = tmp_path / "new" / "x" / "a", tmp_path / "new" / "x" / "b"
    with pytest.raises(RuntimeError):
        with RunFolder(a):
            b.mkdir()
            (b / "progress.json").write_text("{}")  # the other run's work
            (a / "partial").write_text("x")
            raise RuntimeError("stage failed")
    assert not a.exists() and (b / "progress.json").is_file()

    with RunFolder(b):
        with pytest.raises(ShrinkError, match="a second run must not write the same out"):
            with RunFolder(b):
                pass
        assert (b / "progress.json").is_file()
    lone = tmp_path / "lone" / "deep"
    with pytest.raises(RuntimeError):
        with RunFolder(lone):
            raise RuntimeError("stage failed")
    assert not (tmp_path / "lone").exists()
