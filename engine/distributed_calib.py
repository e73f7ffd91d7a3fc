"""Calibration over torch.distributed: N ranks run one compression job together.

Under `torchrun --nproc_per_node N -m shrink` (shrink/launch.py) every rank loads the model
and runs the same compress_model with a `CalibComm`:
- the calibration windows are split into contiguous shares (rank r takes the r-th), so each
  rank captures and runs only its share through each layer;
- when a pass of Linears is due, each Hessian's fp32 running sum and its row count are
  summed over the ranks onto the rank that owns its Linears (a Hessian shared by Linears of
  several owners is summed onto all of them). Owners balance the sweep's cost (in^2 * out
  per Linear: the largest first, onto the least loaded rank); they depend on shapes only,
  so every rank computes the same. The sum itself is handed along the ranks in window order
  (`add_in_order`): rank r receives rank r-1's running sum, adds its own inputs (kept from
  its forwards: a lockstep pause holds them all; the re-run path of expert layers keeps them
  for one pass) and hands it on, exactly as one process adds them, so the Hessians and codes
  equal one process's bit for bit (with the same threads per process and the same batches);
  only the x^T x products are serialized, the forwards are not;
- each owner compresses its Linears, and every rank gathers every owner's results (the new
  weight, the stage's side outputs such as the packed GPTQ tensors, the report entry) and
  installs them, so the next layer's inputs are right on every rank.
Evaluation splits its windows the same way and sums NLL, tokens, bytes and characters.
The collectives run on groups of their own with a bounded timeout: a rank that dies or stops
answering becomes a one-line ShrinkError on the others, naming it where it can be found.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import ShrinkError
from engine.evaluation import Measured
from engine.experts import split_modules
from engine.hessian import HessianAccumulator
from engine.modeling import set_weight_matrix, weight_matrix

DEFAULT_TIMEOUT = timedelta(minutes=30)


@dataclass
class CalibComm:
    """This rank's side of a distributed calibration (see the module docstring)."""
    rank: int
    world: int
    group: Any  # Hessian sums, on the model's device (NCCL for CUDA tensors, gloo for CPU ones)
    objects: Any  # gloo: counts, pickled results, agreement
    peers: list[tuple[str, int]]  # (host, pid) per rank: to name a rank that died
    # Dicts keyed by a Linear's full name that the stage's compressor fills (packed tensors,
    # per-Linear figures): the owner's entries are copied into every rank's.
    outputs: tuple[dict[str, Any], ...] = ()
    # id(accumulator) -> the rank holding its whole sum, for sums handed along the ranks
    chained: dict[int, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, timeout: timedelta = DEFAULT_TIMEOUT) -> Optional["CalibComm"]:
        """Over the process group torchrun set up (every rank must call it, in the same order
        as its other new groups); None for a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        group = dist.new_group(timeout=timeout)
        objects = dist.new_group(backend="gloo", timeout=timeout)
        peers: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=objects)
        return cls(dist.get_rank(), dist.get_world_size(), group, objects, [tuple(p) for p in peers])

    def sharing(self, *outputs: dict[str, Any]) -> "CalibComm":
        """The same communicator, copying these compressor outputs from owners to every rank."""
        return dataclasses.replace(self, outputs=outputs)

    # -- work split -------------------------------------------------------------------------

    def shard(self, windows: torch.Tensor, key: str) -> torch.Tensor:
        """This rank's contiguous share of windows [n, seq_len] (sizes differ by at most one)."""
        n = windows.shape[0]
        if n < self.world:
            raise ShrinkError(f"{key}: {n} windows cannot be split over {self.world} ranks "
                              f"(torchrun --nproc_per_node); give at least one per rank")
        return windows[n * self.rank // self.world : n * (self.rank + 1) // self.world]

    def check_layers(self, targets: list[dict[str, nn.Module]]) -> None:
        """Every decoder layer has at least one Linear per rank to compress."""
        fewest = min(range(len(targets)), key=lambda i: len(targets[i]), default=None)
        if fewest is not None and len(targets[fewest]) < self.world:
            raise ShrinkError(f"torchrun: {self.world} ranks but decoder layer {fewest} has only "
                              f"{len(targets[fewest])} Linears to compress; use --nproc_per_node "
                              f"{len(targets[fewest])} or fewer")

    def owners(self, names: list[str], linears: dict[str, nn.Module]) -> dict[str, int]:
        """Linear name -> the rank that compresses it: largest sweep (in^2 * out) first, onto
        the least loaded rank (the lowest on a tie); ties in cost keep the given order."""
        def cost(name: str) -> int:
            out, cols = weight_matrix(linears[name]).shape
            return cols * cols * out

        load = [0] * self.world
        owner: dict[str, int] = {}
        for name in sorted(names, key=cost, reverse=True):
            rank = min(range(self.world), key=lambda r: load[r])
            owner[name] = rank
            load[rank] += cost(name)
        return owner

    # -- collectives ---------------------------------------------------------------------------

    def reduce(self, groups: list[list[str]], hessians: dict[str, HessianAccumulator],
               owner: dict[str, int], what: str) -> None:
        """Every group's whole Hessian (running sum and row count, handed along the ranks by
        add_in_order) sent from the rank holding it to the owners of its Linears; other ranks
        keep a partial sum they never read."""
        accs: list[tuple[HessianAccumulator, set[int]]] = []
        for group in groups:
            acc = hessians.get(group[0])
            if acc is not None:
                accs.append((acc, {owner[n] for n in group}))
        with self.guard(what):
            for acc, ranks in accs:
                holder = self.chained.pop(id(acc))
                total, count = acc.raw_sum(), torch.tensor([acc.n], dtype=torch.int64)
                if self.rank == holder:
                    for rank in sorted(ranks - {holder}):
                        dist.send(total, dst=rank, group=self.group)
                        dist.send(count, dst=rank, group=self.objects)
                elif self.rank in ranks:
                    dist.recv(total, src=holder, group=self.group)
                    dist.recv(count, src=holder, group=self.objects)
                    acc.n = int(count)

    def add_in_order(self, acc: HessianAccumulator, inputs: list[torch.Tensor], what: str) -> None:
        """acc += inputs of every rank, in window order: receive rank r-1's running state (sum,
        staged rows, counts), add this rank's inputs, hand it to rank r+1. The last rank then
        holds what one process would hold; reduce() passes it to the owners."""
        with self.guard(what):
            buffers = acc.chain_buffers()
            counts = torch.zeros(2, dtype=torch.int64, device=buffers[0].device)
            if self.rank > 0:
                for buffer in buffers:
                    dist.recv(buffer, src=self.rank - 1, group=self.group)
                dist.recv(counts, src=self.rank - 1, group=self.group)
                acc.n, acc.staged = (int(c) for c in counts.tolist())
            acc.add_all(inputs)
            if self.rank < self.world - 1:
                for buffer in acc.chain_buffers():
                    dist.send(buffer, dst=self.rank + 1, group=self.group)
                counts.copy_(torch.tensor([acc.n, acc.staged]))
                dist.send(counts, dst=self.rank + 1, group=self.group)
        self.chained[id(acc)] = self.world - 1

    def share(self, entries: dict[str, dict[str, Any]], linears: dict[str, nn.Module],
              what: str) -> dict[str, dict[str, Any]]:
        """Gather every owner's compressed Linears (weights, compressor outputs, report
        entries), install the others' here; returns every rank's entries by name."""
        mine = {name: (weight_matrix(linears[name]).detach().cpu(), entry,
                       [_to_cpu(out.get(entry["full_name"])) for out in self.outputs])
                for name, entry in entries.items()}
        parts: list[Any] = [None] * self.world
        with self.guard(what):
            dist.all_gather_object(parts, mine, group=self.objects)
        merged: dict[str, dict[str, Any]] = {}
        for rank, part in enumerate(parts):
            for name, (W, entry, extras) in part.items():
                if rank != self.rank:
                    target = weight_matrix(linears[name])
                    set_weight_matrix(linears[name], W.to(target.device, target.dtype))
                    for out, extra in zip(self.outputs, extras):
                        if extra is not None:
                            out[entry["full_name"]] = extra
                merged[name] = entry
        return merged

    @staticmethod
    def routed_before(layer: nn.Module) -> list[torch.Tensor]:
        """The layer's routed-token counters before its calibration (they add up over stages)."""
        return [block.routed.detach().cpu().clone() for block in split_modules(layer)]

    def sum_routed(self, layer: nn.Module, before: list[torch.Tensor], what: str) -> None:
        """The tokens routed to each expert during this layer's calibration, summed over the ranks."""
        with self.guard(what):
            for block, base in zip(split_modules(layer), before):
                counts = block.routed.cpu() - base
                dist.all_reduce(counts, group=self.objects)
                block.routed.copy_(base + counts)

    def agree(self, value: Any, what: str) -> Any:
        """Rank 0's value, on every rank (decisions taken from data each rank sees its share of)."""
        box = [value]
        with self.guard(what):
            dist.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def sum_measured(self, m: Measured, what: str) -> Measured:
        totals = torch.tensor([m.nll, m.tokens, m.bytes, m.chars], dtype=torch.float64)
        with self.guard(what):
            dist.all_reduce(totals, group=self.objects)
        nll, tokens, nbytes, chars = totals.tolist()
        return Measured(nll, int(tokens), int(nbytes), int(chars))

    # -- failures ------------------------------------------------------------------------------

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """A collective that fails (a peer died) or times out: one line naming the peer."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, ShrinkError):
                raise
            raise ShrinkError(self.blame(what, exc)) from None

    def blame(self, what: str, exc: BaseException, wait: float = 3.0) -> str:
        """'rank R stopped during WHAT ...': R found among the peers on this host whose process
        is gone (waiting a little, since the socket closes before the process ends)."""
        dead = self.dead_peers(wait)
        # the backend's own words, less its source location ("[.../pair.cc:537] Read error ...")
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [type(exc).__name__])[0])[:160]
        who = ", ".join(f"rank {r}" for r in dead) or "a peer rank"
        return f"torchrun: {who} stopped during {what}; rank {self.rank} stops too ({first})"

    def dead_peers(self, wait: float = 3.0) -> list[int]:
        """The peer ranks on this host whose process is gone, waiting up to `wait` seconds for one."""
        host = socket.gethostname()
        deadline = time.monotonic() + wait
        while True:
            dead = [r for r, (h, pid) in enumerate(self.peers)
                    if r != self.rank and h == host and not _alive(pid)]
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _to_cpu(value: Any) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to the CPU for pickling."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
