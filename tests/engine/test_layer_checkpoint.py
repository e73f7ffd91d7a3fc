"""Per-layer checkpoints (engine/layer_checkpoint.py): compress_model interrupted after layer k
goes on from layer k+1 and ends exactly where an uninterrupted run ends. The real SIGKILL of a
CLI run is in tests/shrink/test_layer_resume.py; here the interruption is an exception, so the
mechanism's cases run in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from engine.calibration import LinearJob, compress_model
from engine.errors import ShrinkError
from engine.layer_checkpoint import LayerCheckpoint
from engine.modeling import set_weight_matrix, weight_matrix
from tests.conftest import tiny_config

CPU = torch.device("cpu")
LAYERS = 4


class Interrupted(Exception):
    pass


def deep_model(family: str) -> torch.nn.Module:
    config = tiny_config(family)
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def windows() -> torch.Tensor:
    return torch.randint(0, 8192, (4, 16), generator=torch.Generator().manual_seed(0))


class Run:
    """compress_model with a data-dependent compressor that also keeps side tensors per Linear
    (as the GPTQ stage keeps packed tensors), checkpointed into `folder`."""

    def __init__(self, family: str, folder: Path, fingerprint: str = "f1", stop_after: int | None = None) -> None:
        self.model, self.extras, self.compressed = deep_model(family), {}, []
        self.checkpoint = LayerCheckpoint(folder, fingerprint)
        self.checkpoint.track(self.extras)
        if stop_after is not None:  # the run dies right after layer stop_after's checkpoint
            save = self.checkpoint.save

            def save_then_stop(index: int, *args, **kwargs) -> None:
                save(index, *args, **kwargs)
                if index == stop_after:
                    raise Interrupted
            self.checkpoint.save = save_then_stop

    def compressor(self, job: LinearJob) -> dict:
        W = weight_matrix(job.module).float()
        d = job.hessian.diagonal().float() if job.hessian is not None else torch.ones(W.shape[1])
        new = torch.round(W * (1 - 0.5 * d / d.max().clamp_min(1e-12)) * 1024) / 1024  # depends on the inputs
        set_weight_matrix(job.module, new.to(weight_matrix(job.module).dtype))
        self.extras[job.full_name] = {"codes": (new * 1024).to(torch.int32)}
        self.compressed.append(job.full_name)
        return {"norm": float(new.norm())}

    def __call__(self) -> tuple[list[dict], list[dict]]:
        profile: list[dict] = []
        report = compress_model(self.model, windows(), self.compressor, CPU, batch_size=2, profile=profile,
                                checkpoint=self.checkpoint)
        return report, profile


def without_seconds(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in entries]


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_an_interrupted_run_resumes_after_its_last_finished_layer_and_ends_identical(family, tmp_path) -> None:
    reference = Run(family, tmp_path / "reference")
    ref_report, ref_profile = reference()
    with pytest.raises(Interrupted):
        Run(family, tmp_path / "run", stop_after=1)()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["layer-00000", "layer-00001", "manifest.json"]
    assert not (tmp_path / "run" / "layer-00000" / "hidden.safetensors").exists()  # only the newest layer's
    resumed = Run(family, tmp_path / "run")
    report, profile = resumed()
    assert resumed.compressed and all(".layers.2." in n or ".layers.3." in n for n in resumed.compressed)
    assert without_seconds(report) == without_seconds(ref_report)
    assert without_seconds(profile) == without_seconds(ref_profile)
    assert list(resumed.extras) == list(reference.extras)
    assert all(torch.equal(resumed.extras[n]["codes"], reference.extras[n]["codes"]) for n in reference.extras)
    ref_state = reference.model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in resumed.model.state_dict().items())
    resumed.checkpoint.remove()
    assert not (tmp_path / "run").exists()


def test_a_layer_cut_off_while_being_written_is_ignored_and_removed(tmp_path) -> None:
    with pytest.raises(Interrupted):
        Run("llama", tmp_path / "run", stop_after=0)()
    torn = tmp_path / "run" / ".tmp-layer-00001.x1y2z3"  # what a kill during layer 1's write leaves
    torn.mkdir()
    (torn / "state.safetensors").write_bytes(b"\x00" * 10)
    resumed = Run("llama", tmp_path / "run")
    resumed()
    assert not torn.exists()
    assert {n.split(".")[2] for n in resumed.compressed} == {"1", "2", "3"}


def test_checkpoints_of_another_fingerprint_are_refused(tmp_path) -> None:
    with pytest.raises(Interrupted):
        Run("llama", tmp_path / "run", stop_after=1)()
    with pytest.raises(ShrinkError, match="other settings or input files"):
        Run("llama", tmp_path / "run", fingerprint="f2")()
