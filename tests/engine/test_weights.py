"""engine/weights.py's narrowing cast and tied-embedding claim, engine/files.py's folder lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import ShrinkError
from engine.files import FolderBusy, FolderLock
from engine.weights import check_narrowing, check_tied, narrow, read_headers
from tests.conftest import ROOT, tiny_model


def test_narrowing_refuses_exactly_the_values_that_would_become_inf() -> None:
    fits = torch.tensor([65504.0, 65519.0, -65519.0, float("nan"), float("inf")])  # inf stays inf: not an overflow
    assert torch.equal(narrow(fits, torch.float16, "w", "key", "hint")[:3], fits[:3].half())
    with pytest.raises(ShrinkError, match=r"key: tensor 'w' holds 65520, beyond the range of float16 \(±65504\); hint"):
        narrow(torch.tensor([1.0, -65520.0]), torch.float16, "w", "key", "hint")
    assert narrow(torch.tensor([1e30]), torch.bfloat16, "w", "key", "hint").isfinite().all()  # bfloat16 holds it
    with pytest.raises(ShrinkError, match="'b'"):
        check_narrowing([("a", torch.ones(3)), ("b", torch.full((2,), 1e5))], torch.float16, "key", "hint")
    check_narrowing([("meta", torch.empty(3, device="meta")), ("int", torch.arange(70000))], torch.float16, "k", "h")


def test_a_tied_config_over_a_different_head_is_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    headers = read_headers(tmp_path)
    with pytest.raises(ShrinkError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        check_tied(tmp_path, model, headers)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # both written, the same values: fine
    save_file(state, tmp_path / "model.safetensors")
    check_tied(tmp_path, model, read_headers(tmp_path))


HOLD = ("import sys, time; from engine.files import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def test_a_folder_lock_refuses_a_second_holder_until_the_first_process_ends(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy) as busy:
            FolderLock(tmp_path).acquire()
        assert busy.value.pid == str(holder.pid)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run leaves its lock file, but no lock
        holder.wait()
    assert (tmp_path / ".lock").is_file()
    lock = FolderLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".lock").exists()
