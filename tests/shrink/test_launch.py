"""`torchrun --nproc_per_node N -m shrink`: each rank's backend, set up before the first
collective (NCCL ranks on their own GPU, gloo on CPUs)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from shrink import launch


def test_nccl_ranks_each_take_their_local_gpu_before_the_first_collective(monkeypatch) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", (backend, kw["device_id"]))))
    monkeypatch.setenv("LOCAL_RANK", "3")
    launch.init_backend()
    gpu = torch.device("cuda", 3)
    assert calls == [("set_device", gpu), ("init", ("cpu:gloo,cuda:nccl", gpu))]


def test_cpu_ranks_use_gloo(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    launch.init_backend()
    assert calls == ["gloo"]
