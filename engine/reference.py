"""The uncompressed model's activations beside the compressed one's, for compressors that want both.

Calibration feeds each layer the outputs of the layers compressed before it; a compressor may
also want what the layer would see in the full-precision model (the reference stream): GPTAQ
asks each Linear to reproduce W x~ (x~ its reference input) from its input x, and a refinement
of a whole block asks for the reference block's outputs. The engine then keeps a second list of
hidden states, runs each layer once on it before compressing it (capturing each Linear's
reference inputs and the reference outputs, the next layer's reference inputs), and pairs every
input x a Linear sees with the same token's reference input.

A `PairedAccumulator` takes the pairs as one Gram of the concatenation [x, x~ - x] (2c columns):
its top-left block is the usual H = 2/n sum x x^T and its bottom-left block the cross term
2/n sum (x~ - x) x^T (GPTAQ's dXXT), each from the same running sum. Being a HessianAccumulator
over 2c columns, it sums along the ranks of a torchrun job (CalibComm.add_in_order) exactly like
one, so 2 ranks still give one process's statistics bit for bit. Its cost: 3x the products of H
alone (the [x~ - x]^T [x~ - x] block is a quarter of the work and unused).
"""
from __future__ import annotations

from typing import Optional

import torch

from engine.hessian import HessianAccumulator


class PairedAccumulator(HessianAccumulator):
    """H of the inputs x and the cross term of the reference inputs x~ (see the module docstring).
    add() takes pair(x, x~); H and cross are [c, c] views of the one symmetric [2c, 2c] matrix."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(2 * columns, device, full=True, dtype=dtype)
        self.width = columns

    def pair(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """One row [x, x~ - x] per token, in the accumulator's dtype."""
        if x.shape != ref.shape:
            raise ValueError(f"reference input {tuple(ref.shape)} does not pair with input {tuple(x.shape)}")
        x = x.to(self.dtype)
        return torch.cat([x, ref.to(x.device, self.dtype) - x], dim=-1)

    @property
    def H(self) -> torch.Tensor:
        return super().H[: self.width, : self.width]

    def finite(self) -> bool:
        return bool(torch.isfinite(super().H).all())

    @property
    def cross(self) -> torch.Tensor:
        """2/n sum_t (x~_t - x_t) x_t^T, [c, c]: row i the reference error of input feature i."""
        return super().H[self.width :, : self.width]


class ReferenceInputs:
    """One layer's reference inputs per Linear, batch and call, captured by a forward of the
    uncompressed layer over the reference stream; handed out in the same order the compressed
    layer's forwards ask for them."""

    def __init__(self, paired: set[str]) -> None:
        self.paired = paired  # the Linears whose inputs pair token by token with the reference
        self.inputs: dict[str, list[list[torch.Tensor]]] = {name: [] for name in paired}
        self._taken: dict[tuple[str, int], int] = {}

    def record(self, name: str, batch: int, x: torch.Tensor) -> None:
        calls = self.inputs[name]
        while len(calls) <= batch:
            calls.append([])
        calls[batch].append(x)

    def accumulator(self, name: str, columns: int, device: torch.device, full: bool,
                    dtype: torch.dtype = torch.float32) -> HessianAccumulator:
        """The statistics of a group whose first Linear is `name`: paired when it can be."""
        if full and name in self.paired:
            return PairedAccumulator(columns, device, dtype)
        return HessianAccumulator(columns, device, full, dtype)

    def pair(self, acc: HessianAccumulator, name: str, batch: int, x: torch.Tensor) -> torch.Tensor:
        """What `acc` takes for input x of `name` in calibration batch `batch` (its next call)."""
        if not isinstance(acc, PairedAccumulator):
            return x
        call = self._taken.get((name, batch), 0)
        self._taken[(name, batch)] = call + 1
        batches = self.inputs[name]
        if batch >= len(batches) or call >= len(batches[batch]):
            raise ValueError(f"{name}: called more often than in the reference forward")
        return acc.pair(x, batches[batch][call])

    def drop(self, names: list[str]) -> None:
        """The reference inputs of Linears whose statistics are complete."""
        for name in names:
            if name in self.inputs:
                self.inputs[name] = []


def reference_of(acc: Optional[HessianAccumulator]) -> Optional[torch.Tensor]:
    """The cross term of a paired accumulator, None for any other."""
    return acc.cross if isinstance(acc, PairedAccumulator) else None
