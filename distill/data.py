"""Training windows as a pure function of the sample index.

Sample k of a run is window perm_e[k mod n] of the stream cut into n non-overlapping
windows, where perm_e is a seeded permutation for epoch e = k div n. Because a batch
depends only on (step, micro-batch, rank), a resumed run sees exactly the batches the
uninterrupted one would have, and ranks of a distributed run read disjoint samples
that together equal a single process's batch.
"""
from __future__ import annotations

import torch

from engine.errors import ShrinkError


class WindowSampler:
    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int, key: str = "distill.train_path") -> None:
        # seq_len > 1 is checked with the distill config; the stream's length only here
        self.num_windows = stream.numel() // seq_len
        if self.num_windows == 0:
            raise ShrinkError(f"{key}: {stream.numel()} tokens is shorter than one window of distill.seq_len={seq_len}")
        self.windows = stream[: self.num_windows * seq_len].view(self.num_windows, seq_len)
        self.seq_len, self.seed = seq_len, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_windows, generator=generator))
        return self._perm[1]

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Windows of samples start .. start + count - 1, [count, seq_len] int64."""
        rows = []
        for k in range(start, start + count):
            epoch, index = divmod(k, self.num_windows)
            rows.append(self.permutation(epoch)[index])
        return self.windows[torch.stack(rows)]


def sample_start(step: int, micro: int, rank: int, grad_accum: int, world: int, batch_size: int) -> int:
    """Index of the first sample of a micro-batch: steps, then micro-batches, then ranks."""
    return ((step * grad_accum + micro) * world + rank) * batch_size
