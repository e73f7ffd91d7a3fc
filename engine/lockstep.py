"""Run a decoder layer over every calibration batch in lockstep, pausing at chosen modules.

True-sequential calibration needs, for each input group s of a layer, the inputs that
group's Linears see once the groups before it are compressed, over ALL calibration
batches, before group s itself may be compressed. Re-running the whole layer per group
gives that at the cost of one forward per group. Here each batch's forward runs once, on
its own thread, and stops in a forward-pre-hook of the group's first Linear (before it
runs) until every batch has got there; then `at_pause` compresses the group and all
batches go on, through the now-compressed group, to the next pause. After the last group
the forwards finish, already with every group compressed, and their outputs are the
layer's outputs for the next layer: one forward per layer, whatever its number of groups.

Only one thread computes at a time (a baton passed with semaphores), in batch order, so
every batch runs exactly the operations, shapes and thread count of a serial forward:
results are bitwise those of the re-run path. The pause is a wait inside the hook, not an
exception: nothing is unwound, the forward simply continues later.

A batch that reaches a later pause without calling an earlier one (e.g. an expert it did
not route to) skips the earlier one; a pause module called again after its group was
compressed does not pause (compress_model uses the re-run path for layers that call a
Linear twice, where the two would differ).

Paused batches keep their intermediate activations. `hold` caps how many may wait at once:
a batch reaching a pause when `hold` others already wait there hands its input to `observe`
and passes through: its forward runs to the end without pausing again and is thrown away
(nothing can stop it half-way but an exception), and at the next pause a fresh forward of
that batch starts from the layer's input, through the groups compressed by then. So memory
stays bounded by `hold` batches, at the price of up to one more forward per group for the
batches beyond it; the inputs seen at every pause, in batch order, are the same.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

# (stage, the input one batch's forward brings to pauses[stage]) -> None; called in batch order
Observe = Callable[[int, torch.Tensor], None]
# stage -> None: every batch has been observed at pauses[stage]; compress that group
AtPause = Callable[[int], None]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Give the free pages of every malloc arena back to the OS (glibc; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated where the activations live: free device memory, or
    the kernel's MemAvailable estimate for the CPU (free pages where /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Batch:
    """One forward of one batch on its own thread, resumed by the driver and handing back at a pause."""

    def __init__(self, run: Callable[[], Any], handback: threading.Semaphore, cuda_index: Optional[int]) -> None:
        self.run, self.handback, self.cuda_index = run, handback, cuda_index
        self.go = threading.Semaphore(0)
        self.pending: dict[int, list[torch.Tensor]] = {}  # inputs at pauses ahead of the current one
        self.paused_at = -1
        self.passing = False  # passed through a pause without waiting: its output is thrown away
        self.done = False
        self.output: Any = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.go.acquire()
        try:
            if self.cuda_index is not None:  # the current CUDA device is per host thread
                torch.cuda.set_device(self.cuda_index)
            with torch.no_grad():  # grad mode is per thread too
                output = self.run()
            self.output = None if self.passing else output  # a pass-through's output is thrown away
        except BaseException as exc:  # handed to the driver thread, which raises it
            self.error = exc
        finally:
            # the forward's closure refers to this batch and to the driver: dropped once run, so the
            # layer (its weights, the Linears at the pauses) is freed without a cyclic gc pass
            self.run = None  # type: ignore[assignment]
            self.done = True
            self.handback.release()

    @property
    def waiting(self) -> bool:
        return not self.done and not self.passing and self.paused_at >= 0

    def resume(self) -> None:
        """Let this batch compute until its next pause or its end (blocks the caller meanwhile)."""
        self.go.release()
        self.handback.acquire()


class Lockstep:
    """Drives the batches' forwards from one pause to the next; see the module docstring."""

    def __init__(self, pauses: list[nn.Module], observe: Observe, hold: Optional[int] = None) -> None:
        if hold is not None and hold < 1:
            raise ValueError(f"hold must be at least 1, got {hold}")
        self.pauses, self.observe, self.hold = pauses, observe, hold
        self.stage = 0  # the pause being gathered; pauses before it are done
        self.aborting = False
        self.handback = threading.Semaphore(0)
        self.local = threading.local()
        self.batches: list[_Batch] = []
        self.forward_seconds = 0.0  # time the batches computed (the driver waits meanwhile)
        self.restarts: list[int] = []  # per batch: forwards started again after passing through a pause

    def _room(self) -> bool:
        return self.hold is None or sum(b.waiting for b in self.batches) < self.hold

    def _hook(self, stage: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            batch: Optional[_Batch] = getattr(self.local, "batch", None)
            if batch is None or batch.passing or self.aborting or stage < self.stage or batch.paused_at >= stage:
                return
            if stage == self.stage:
                self.observe(stage, args[0])
            else:  # skipped the current pause: observed when the driver reaches it, in batch order
                batch.pending.setdefault(stage, []).append(args[0])
            if batch.paused_at < 0 and not self._room():
                batch.passing = True
                return
            batch.paused_at = stage  # hand back, wait for the group
            self.handback.release()
            batch.go.acquire()
        return hook

    def _start(self, run: Callable[[], Any], cuda_index: Optional[int]) -> _Batch:
        def body() -> Any:
            self.local.batch = batch
            return run()
        batch = _Batch(body, self.handback, cuda_index)
        batch.thread.start()
        return batch

    def _advance(self, runs: list[Callable[[], Any]], stage: int, cuda_index: Optional[int]) -> None:
        """In batch order: every batch still before `stage` computes up to its next pause (a batch
        that passed through an earlier one starts again), then its inputs at `stage` are observed."""
        start = time.perf_counter()
        for j, run in enumerate(runs):
            batch = self.batches[j]
            if batch.passing:
                batch.thread.join()
                self.batches[j] = batch = self._start(run, cuda_index)
                self.restarts[j] += 1
            if not batch.done and batch.paused_at < stage:
                batch.resume()
                release_free_memory()  # what this batch freed, in its own malloc arena
                if batch.error is not None:
                    break
            for x in batch.pending.pop(stage, []):
                self.observe(stage, x)
        self.forward_seconds += time.perf_counter() - start

    def run(self, runs: list[Callable[[], Any]], at_pause: AtPause, device: torch.device) -> list[Any]:
        """Each of `runs` is one batch's forward (returning what to keep); returns their results."""
        cuda_index = torch.cuda.current_device() if device.type == "cuda" else None
        handles = [m.register_forward_pre_hook(self._hook(s)) for s, m in enumerate(self.pauses)]
        self.batches = [self._start(run, cuda_index) for run in runs]
        self.restarts = [0] * len(runs)
        try:
            for stage in range(len(self.pauses) + 1):
                self.stage = stage
                self._advance(runs, stage, cuda_index)
                failed = next((b.error for b in self.batches if b.error is not None), None)
                if failed is not None:
                    raise failed
                if stage < len(self.pauses):
                    at_pause(stage)
            return [b.output for b in self.batches]
        finally:
            # on an error: let every batch still paused run to its end without pausing again
            self.aborting = True
            for batch in self.batches:
                if not batch.done:
                    batch.resume()
                batch.thread.join()
            for handle in handles:
                handle.remove()
