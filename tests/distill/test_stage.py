"""The distill and pretrain stages through the pipeline and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.trainer import Trainer
from engine.errors import ShrinkError
from tests.conftest import ROOT, run_shrink
from tests.distill.helpers import tiny_distill, tiny_llama


def shrink_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shrink.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_cli_distills_a_pretrained_student_into_a_loadable_model(tmp_path: Path, on_shipped_shared: Path) -> None:
    """The preset for a pretrained student (conf/distill/akt_pretrained.yaml), as a user runs it,
    on the presets' models and data (../shared's layout, here built from what ships)."""
    out = tmp_path / "out"
    student = on_shipped_shared / "models" / "llama-student"
    proc = shrink_cli("pipeline=distill", "model=llama_teacher", "data=docs_en", "distill=akt_pretrained",
                      f"distill.student.path={student}", "distill.steps=2", "distill.seq_len=32",
                      "distill.batch_size=2", "data.eval.seq_len=64", "data.eval.max_windows=2", f"out={out}")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert "ppl[docs-en-test]" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ppl"]["docs-en-test"] > 1 and metrics["baseline_ppl"]["docs-en-test"] > 1
    report = metrics["stages"]["distill"]
    assert report["steps"] == 2 and report["tokens"] == 2 * 2 * 32
    assert report["layer_map"] == [[0, 0], [1, 2], [2, 5], [3, 7]]
    assert set(report["final"]) >= {"loss", "lm", "logit", "akt.0", "akt.3"}
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    shape = json.loads((student / "config.json").read_text())
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == shape["hidden_size"]
    assert not (out / "checkpoints").exists()


def test_width_student_through_the_pipeline(tmp_path: Path, teacher_dir: Path) -> None:
    m = run_shrink(tiny_distill(teacher_dir, "distill.student.init=width", "distill.student.hidden_size=32",
                                "distill.student.num_heads=2", "distill.student.num_kv_heads=1",
                                "distill.student.calib_samples=4", "distill.layer_map=last:1",
                                "distill.eval_init=true"), tmp_path / "out")
    report = m["stages"]["distill"]
    assert report["student"]["hidden_size"] == 32 and report["student"]["num_kv_heads"] == 1
    assert report["layer_map"] == [[1, 3]] and "init_ppl" in report
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").config.hidden_size == 32


def test_pretrain_pipeline_trains_a_scratch_student_without_the_teacher(tmp_path: Path, teacher_dir: Path,
                                                                        monkeypatch) -> None:
    teachers = []
    original = Trainer.micro_loss

    def spy(self, *args):
        teachers.append(self.teacher)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "micro_loss", spy)
    m = run_shrink(tiny_distill(teacher_dir, "pipeline=pretrain", "distill.student.hidden_size=32",
                                "distill.steps=4"), tmp_path / "out")
    assert list(m["stages"]) == ["pretrain", "eval", "export"]
    assert m["stages"]["pretrain"]["student"]["init"] == "scratch"
    assert set(m["stages"]["pretrain"]["final"]) == {"step", "lr", "loss", "lm", "grad_norm"}
    assert len(teachers) == 4 and all(t is None for t in teachers)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").config.hidden_size == 32


def test_bad_layer_map_and_vocab_mismatch_fail_before_training(tmp_path: Path, teacher_dir: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ShrinkError, match="student layer 5 does not exist"):
        run_shrink(tiny_distill(teacher_dir, "distill.layer_map='0:1,5:3'"), tmp_path / "a")
    with pytest.raises(ShrinkError, match="relation_heads=5 does not divide"):
        run_shrink(tiny_distill(teacher_dir, "distill.relation_heads=5"), tmp_path / "b")
    with pytest.raises(ShrinkError, match="distill.relations='qx'"):
        run_shrink(tiny_distill(teacher_dir, "distill.relations=qx"), tmp_path / "b2")
    assert not (tmp_path / "b2").exists()  # refused by the config check, before anything is loaded or written
    other = tmp_path / "other"
    tiny_llama(layers=2, vocab=300).save_pretrained(other)
    from tests.distill.test_student import other_tokenizer

    other_tokenizer(other)
    with pytest.raises(ShrinkError, match="differs from the teacher's"):
        run_shrink(tiny_distill(teacher_dir, "distill.student.init=pretrained", f"distill.student.path={other}"),
                   tmp_path / "c")


@pytest.mark.parametrize("overrides,message", [
    (["distill.relation_heads=5"], "distill.relation_heads=5 does not divide the teacher's Q width 64"),
    (["distill.relation_heads=32", "distill.student.init=width", "distill.student.hidden_size=48"],
     "distill.relation_heads=32 does not divide the student's Q width 48"),
    (["distill.relation_block=0"], "distill.relation_block: 0 must be > 0"),
    (["distill.logit_chunk=-1"], "distill.logit_chunk: -1 must be > 0"),
    (["distill.kernels=fast"], "distill.kernels: unknown kernels 'fast'"),
    (["distill.seq_len=4096"], "distill.seq_len=4096 is beyond the teacher's 2048 positions"),
    (["pipeline=pretrain", "distill.seq_len=2049"], "distill.seq_len=2049 is beyond the teacher's 2048 positions"),
])
def test_bad_long_context_settings_fail_before_any_model_loads(tmp_path: Path, teacher_dir: Path, monkeypatch,
                                                               overrides: list[str], message: str) -> None:
    monkeypatch.setattr("shrink.pipeline.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ShrinkError, match=message):
        run_shrink(tiny_distill(teacher_dir, *overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_seq_len_beyond_the_teachers_positions_is_one_line_and_exit_2(tmp_path: Path, teacher_dir: Path) -> None:
    proc = shrink_cli(*tiny_distill(teacher_dir, "distill.seq_len=8192"), f"out={tmp_path / 'run'}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == ("shrink: error: distill.seq_len=8192 is beyond the teacher's 2048 "
                                            "positions (max_position_embeddings)")
    assert not (tmp_path / "run").exists()


def test_a_reloaded_teacher_after_a_modifying_stage_is_refused_before_anything_runs(tmp_path: Path,
                                                                                     teacher_dir: Path) -> None:
    """An 8-bit or device_map teacher is read again from model.path: after prune it would be the
    unpruned model, silently. Refused at the config check, nothing written."""
    args = tiny_distill(teacher_dir, "distill.teacher.load_in_8bit=true")
    with pytest.raises(ShrinkError, match="distill must come before"):
        run_shrink(args + ["pipeline.stages=[prune,distill,eval]"], tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ShrinkError, match="device_map: .*plan.json does not exist"):
        run_shrink(tiny_distill(teacher_dir, f"distill.teacher.device_map={tmp_path}/plan.json"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_student(tmp_path: Path, teacher_dir: Path) -> None:
    args = tiny_distill(teacher_dir, "distill.steps=80", "distill.checkpoint_every=2", "distill.loss=akt+logits+lm")
    run_shrink(args, tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = shrink_cli(*args, f"out={killed}")
    meta = killed / "checkpoints" / "distill-train" / "trainer.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    step = json.loads(meta.read_text())["step"]
    assert 4 <= step < 80 and not (killed / "model").exists()
    m = run_shrink(args + ["resume=true"], killed)
    assert m["stages"]["distill"]["resumed_from"] >= step
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_topk_logit_cache_through_the_pipeline(tmp_path: Path, teacher_dir: Path) -> None:
    m = run_shrink(tiny_distill(teacher_dir, "distill.loss=logits", "distill.teacher.topk_logits=16",
                                f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "out")
    assert m["stages"]["distill"]["final"]["logit"] > 0
    (folder,) = (tmp_path / "cache" / "distill-topk").iterdir()
    assert (folder / "shard-000000.safetensors").is_file()
