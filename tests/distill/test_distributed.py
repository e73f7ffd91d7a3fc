"""The multi-process path: FSDP2 under torchrun, two CPU processes with gloo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_shrink
from tests.distill.helpers import tiny_distill


@pytest.mark.slow
# progressive: its AKT-only phases put no module output on the loss path, which FSDP2's hooks need
@pytest.mark.parametrize("schedule", ["joint", "progressive"])
def test_two_gloo_processes_agree_and_match_a_single_process(tmp_path: Path, teacher_dir: Path, schedule: str) -> None:
    common = tiny_distill(teacher_dir, "distill.steps=3", "distill.grad_accum=2", "distill.loss=akt+logits+lm",
                          "eval.baseline=false", f"distill.schedule={schedule}", "distill.progressive_steps=2",
                          "distill.checkpoint_every=2")  # sharded checkpoints are written on the way
    single = run_shrink(common + ["distill.batch_size=2"], tmp_path / "single")
    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "shrink", *common, "distill.batch_size=1", f"out={out}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())["stages"]["distill"]
    assert report["world_size"] == 2 and report["tokens"] == single["stages"]["distill"]["tokens"]
    digests = report["weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks end with identical weights
    a = load_file(tmp_path / "single" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # same samples, gradients averaged over ranks: equal up to float rounding
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), name
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"],
                           load_file(teacher_dir / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"])
