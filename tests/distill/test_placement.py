"""GPU wiring of distillation that the gloo tests cannot reach: collectives on the device the
backend serves, the teacher's placement under torchrun, each rank on its own GPU. (The ranks'
backend set-up is shrink/launch.py's: tests/shrink/test_launch.py.)"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from distill import teacher
from distill.config import TeacherConfig
from distill.distributed import DistContext
from engine.config import ModelConfig
from engine.errors import ShrinkError
from tests.conftest import ROOT


def test_mean_all_reduces_on_the_context_device_and_returns_where_it_was(monkeypatch) -> None:
    seen: list[torch.device] = []

    def all_reduce(t: torch.Tensor, op: Any) -> None:
        seen.append(t.device)
        t.mul_(2)  # as if a second rank held the same values

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    ctx = DistContext(rank=0, world=2, device=torch.device("meta"))
    values = torch.tensor([1.0, 3.0], dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # meta tensors cannot come back: proof the reduce ran there
        ctx.mean(values)
    assert seen == [torch.device("meta")]
    out = DistContext(rank=0, world=2, device=torch.device("cpu")).mean(values)
    assert out.tolist() == [1.0, 3.0] and out.device == values.device  # (2 x values) / 2 ranks
    assert values.tolist() == [1.0, 3.0]  # the caller's tensor is not reduced in place


@pytest.mark.parametrize("ranked", [False, True])
def test_quantized_teacher_goes_to_the_rank_gpu_under_torchrun(monkeypatch, ranked: bool) -> None:
    loads: list[dict[str, Any]] = []

    class Loaded(Exception):
        pass

    def load_checked(folder: Any, check_kinds: bool = True, **kwargs: Any) -> None:
        loads.append(kwargs)
        raise Loaded

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(teacher, "load_checked", load_checked)
    monkeypatch.setattr(teacher, "check_model_folder", lambda path: path)
    monkeypatch.setattr(teacher.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(dist, "is_initialized", lambda: ranked)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    gpu = torch.device("cuda", 1)
    plan = ROOT / "benchmarks" / "results" / "plan_llama2-70b_gptq4_4xA100-80GB" / "device_map.json"
    for device_map in (None, "balanced", str(plan)):
        with pytest.raises(Loaded):
            teacher.load_sharded_teacher(ModelConfig(path="t"), TeacherConfig(load_in_8bit=True, device_map=device_map),
                                         torch.float16, gpu)
    assert [kw["device_map"] for kw in loads[:2]] == [{"": gpu} if ranked else "auto", "balanced"]
    assert loads[2]["device_map"]["model.layers.0"] == 0 and loads[2]["device_map"]["lm_head"] == 3  # shrink plan's


def test_a_device_map_file_must_exist_and_map_modules(tmp_path) -> None:
    with pytest.raises(ShrinkError, match="device_map: .*missing.json does not exist"):
        teacher.teacher_device_map(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[0, 1]")
    with pytest.raises(ShrinkError, match="must map module names to devices"):
        teacher.teacher_device_map(str(tmp_path / "list.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ShrinkError, match="not valid JSON"):
        teacher.teacher_device_map(str(tmp_path / "bad.json"))
    assert teacher.teacher_device_map("auto") == "auto" and teacher.teacher_device_map(None) is None


def test_under_torchrun_cuda_means_the_rank_gpu_and_another_index_is_refused(monkeypatch) -> None:
    from distill.distributed import local_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ShrinkError, match="cuda:0 under torchrun.*cuda:1"):
        local_device(torch.device("cuda", 0))
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # one process: as asked
