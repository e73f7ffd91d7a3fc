"""The multi-process side of training: FSDP2 sharding of the student under torchrun.

Every rank holds a full teacher (or its own device_map slice) and reads its own samples;
the student's parameters, gradients and optimizer state are sharded with
`torch.distributed.fsdp.fully_shard` (one unit per decoder layer, plus the root for the
embeddings, final norm and head). On CPU the gloo backend runs the same code, which is
how CI tests it.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    mesh: Any = None
    device: torch.device = torch.device("cpu")  # where collectives run: NCCL takes CUDA tensors only

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @classmethod
    def current(cls, device: torch.device) -> "DistContext":
        """The process group torchrun set up (see shrink/launch.py), or a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return cls(dist.get_rank(), dist.get_world_size(), mesh, device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average over ranks (for logging; gradients are averaged by FSDP)."""
        if self.sharded:
            total = values.to(self.device, copy=True)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            values = total.to(values.device) / self.world
        return values

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def gather_strings(self, text: str) -> list[str]:
        if not self.sharded:
            return [text]
        out: list[Optional[str]] = [None] * self.world
        dist.all_gather_object(out, text)
        return [str(t) for t in out]


def local_device(device: torch.device) -> torch.device:
    """One GPU per rank under torchrun (LOCAL_RANK); the CPU stays the CPU."""
    if device.type != "cuda" or "LOCAL_RANK" not in os.environ:
        return device
    local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.index is not None and device.index != local.index:
        raise ShrinkError(f"device {device} under torchrun: each rank trains on its own GPU (this one: {local}); "
                          "give model.device=cuda")
    return local


def shard(model: nn.Module, ctx: DistContext) -> Optional[nn.Module]:
    """Shard `model` in place with FSDP2 (its shards land on the mesh's device); returns an
    unsharded CPU copy to receive the result."""
    if not ctx.sharded:
        return None
    from torch.distributed.fsdp import fully_shard

    shell = copy.deepcopy(model).to("cpu")
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return shell


def full_state(model: nn.Module, ctx: DistContext, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU: on rank 0 only, or on every rank.

    One tensor at a time: each DTensor is all-gathered on the device and copied to the CPU
    before the next, so no rank ever holds the whole unsharded model on its GPU. Tied weights
    (one Parameter under two names, the same on every rank) are gathered once and stay tied."""
    from torch.distributed.tensor import DTensor

    keep = everywhere or ctx.main
    first: dict[int, str] = {}
    canonical = {name: first.setdefault(id(t), name) for name, t in
                 [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    state: dict[str, torch.Tensor] = {}
    gathered: set[str] = set()  # the same on every rank, kept or not: every rank joins the same collectives
    for name, value in model.state_dict().items():
        source = canonical.get(name, name)
        if source not in gathered:
            full = value.full_tensor() if isinstance(value, DTensor) else value  # a collective: every rank
            gathered.add(source)
            if keep:
                state[source] = full.detach().cpu()
        if keep:
            state[name] = state[source]
    return state


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and exact bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


DONE = "done"


def send(message: str) -> None:
    """Rank 0 -> workers: the name of a stage to join, or DONE."""
    dist.broadcast_object_list([message], src=0)


def receive() -> str:
    box: list[Optional[str]] = [None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])
