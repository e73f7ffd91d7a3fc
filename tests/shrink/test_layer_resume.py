"""Resume inside a stage: a CLI run killed by a real SIGKILL after decoder layer k (or while
writing a layer's checkpoint) and started again with resume=true goes on from its last finished
layer and ends with the very bytes (sha256 of every file in model/) and metrics of an
uninterrupted run; a resume with other settings or other input files is refused in one line."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import transformers

from engine.errors import ShrinkError
from tests.conftest import (SHAKESPEARE_EVAL, SHAKESPEARE_TRAIN, run_shrink, save_with_tokenizer, tiny_config,
                            tiny_data_overrides)
from tests.shrink.killpoint import shrink_process

LAYERS = 4
SAVE = "engine.layer_checkpoint:LayerCheckpoint.save"
WRITE = "engine.layer_checkpoint:save_file"  # 3 files per layer: state, extras, hidden

CASES = {
    # GPTQ, killed right after layer 2's checkpoint: goes on at layer 3
    "gptq_llama": ("llama", ["pipeline=quantize", "quant.group_size=32"], (SAVE, "after:2", "KILL"), 3),
    # SparseGPT, killed in the middle of layer 3's checkpoint (its state written, not yet published)
    "sparsegpt_llama_torn_write": ("llama", ["pipeline=prune", "prune=sparsegpt"], (WRITE, "after:7", "KILL"), 3),
    # prune then GPTQ, killed inside the second stage (which starts from the first one's checkpoint)
    "prune_quantize_llama": ("llama", ["pipeline=prune_quantize", "prune=sparsegpt_2of4", "quant.group_size=32"],
                             (SAVE, "after:5", "KILL"), 2),
    "gptq_mixtral": ("mixtral", ["pipeline=quantize", "quant.group_size=32"], (SAVE, "after:1", "KILL"), 2),
    # GPTAQ: the reference stream's hidden states are restored too
    "gptaq_llama": ("llama", ["pipeline=quantize", "quant.group_size=32", "quant.gptaq=true"],
                    (SAVE, "after:2", "KILL"), 3),
    # block refinement: the refined layers restored, the next one refined from the restored streams
    "refine_llama": ("llama", ["pipeline=quantize", "quant.group_size=32", "quant.scale_search=mse",
                               "quant.refine_steps=4"], (SAVE, "after:1", "KILL"), 2),
}


def deep_model(folder: Path, family: str, tokenizer: Path) -> Path:
    config = tiny_config(family)
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config).eval(), folder, tokenizer)


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def comparable(value, out: Path):
    """metrics.json without timings, peak memory and the run folder's own path."""
    if isinstance(value, dict):
        return {k: comparable(v, out) for k, v in value.items() if "seconds" not in k and k != "peak_memory_bytes"}
    if isinstance(value, list):
        return [comparable(v, out) for v in value]
    return value.replace(str(out), "OUT") if isinstance(value, str) else value


@pytest.mark.slow  # three CLI processes each
@pytest.mark.parametrize("case", list(CASES))
def test_a_run_killed_inside_a_stage_resumes_to_the_bytes_of_an_uninterrupted_run(case, tmp_path,
                                                                                  shipped_tokenizer) -> None:
    family, overrides, kill, resume_at = CASES[case]
    args = [f"model.path={deep_model(tmp_path / family, family, shipped_tokenizer)}", *tiny_data_overrides(),
            *overrides]
    reference = tmp_path / "reference"
    done = shrink_process(*args, f"out={reference}")
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "run"
    killed = shrink_process(*args, f"out={out}", kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    layers = next((out / "checkpoints").glob("*.layers"))
    torn = list(layers.glob(".tmp-layer-*"))
    assert bool(torn) == (kill[0] == WRITE)

    resumed = shrink_process(*args, f"out={out}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"resuming at layer {resume_at}/{LAYERS}" in log
    assert f"layer {resume_at - 1}/{LAYERS}:" not in log.split("resuming at layer")[-1]  # no finished layer again
    assert sha256s(out / "model") == sha256s(reference / "model")
    assert comparable(json.loads((out / "metrics.json").read_text()), out) == \
        comparable(json.loads((reference / "metrics.json").read_text()), reference)
    assert not (out / "checkpoints").exists()


class Interrupted(Exception):
    pass


def test_a_resume_with_other_settings_or_inputs_is_refused_in_one_line(tmp_path, shipped_tokenizer, monkeypatch,
                                                                        caplog) -> None:
    """In-process (an exception stands in for the kill, as the real one is tested above)."""
    from engine.layer_checkpoint import LayerCheckpoint

    calib = tmp_path / "calib.jsonl.gz"
    shutil.copy(SHAKESPEARE_TRAIN, calib)
    args = [f"model.path={deep_model(tmp_path / 'llama', 'llama', shipped_tokenizer)}", *tiny_data_overrides(),
            f"data.calib.path={calib}", "pipeline=quantize", "quant.group_size=32"]
    out = tmp_path / "run"
    save = LayerCheckpoint.save

    def save_then_die(self, index, *a, **kw):
        save(self, index, *a, **kw)
        if index == 1:
            raise Interrupted
    monkeypatch.setattr(LayerCheckpoint, "save", save_then_die)
    with pytest.raises(Interrupted):
        run_shrink(args, out)
    monkeypatch.undo()

    with pytest.raises(ShrinkError, match="settings differ") as error:
        run_shrink([*args, "quant.bits=3", "resume=true"], out)
    assert "\n" not in str(error.value)
    original = calib.read_bytes()
    shutil.copy(SHAKESPEARE_EVAL, calib)  # the calibration data changed under the killed run
    with pytest.raises(ShrinkError, match="input model or data files differ") as error:
        run_shrink([*args, "resume=true"], out)
    assert "\n" not in str(error.value)
    calib.write_bytes(original)
    caplog.set_level("INFO")
    run_shrink([*args, "resume=true"], out)  # the same inputs again: it goes on
    assert f"resuming at layer 3/{LAYERS}" in caplog.text and (out / "model").is_dir()
