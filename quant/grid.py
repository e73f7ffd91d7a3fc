"""Kernel: uniform integer quantization grids (scale, zero) as in GPTQ.

Asymmetric: zero = round(-xmin/scale) in [0, maxq]. Symmetric: zero = (maxq+1)/2,
the convention the GPTQ checkpoint format stores (so symmetric 4-bit qzeros read
0x77777777 after the v1 "-1" offset). Both grids contain 0 exactly, which is what
lets pruned weights survive quantization.

The range is min/max by default. With a `ScaleSearch` it is chosen per row from the
min/max range shrunk by p = 1 - k/steps (k = 0 .. max_shrink*steps - 1; the zero point
follows for asymmetric grids), keeping the p with the least sum_j weight_j |w_j - q_j|^norm
(the GPTQ reference quantizer's `mse` search; weight_j = 1 is its plain form, the OBS cost
1/[Hinv]_jj^2 of the sweep the Hessian-weighted one). p = 1 is a candidate, so the chosen
grid never has a larger error of that kind than min/max. Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# The integer widths a grid (and the GPTQ checkpoint packing) supports.
SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


@dataclass
class Grid:
    scale: torch.Tensor  # [rows, 1] fp32
    zero: torch.Tensor  # [rows, 1] fp32, integer-valued
    maxq: int


@dataclass(frozen=True)
class ScaleSearch:
    """Candidates and error measure of the per-row range search (see the module docstring)."""

    steps: int = 100  # p = 1 - k/steps
    max_shrink: float = 0.8  # k < max_shrink * steps: the range shrinks at most to 1 - max_shrink (+1/steps)
    norm: float = 2.0  # the error's exponent (the GPTQ paper's code used 2.4, gptqmodel's mse=2.0 uses 2)
    chunk: int = 16  # candidates evaluated at once (memory: chunk * rows * cols floats)
    # weight each column's error by the cost the caller gives it (GPTQ: the sweep's OBS cost)
    weighted: bool = False

    def problem(self) -> Optional[tuple[str, str]]:
        """(field, what is wrong with it), or None when the settings are valid."""
        if self.steps < 1:
            return "steps", f"{self.steps} must be >= 1"
        if not 0 < self.max_shrink < 1:
            return "max_shrink", f"{self.max_shrink} must be in (0, 1)"
        if not self.norm > 0:
            return "norm", f"{self.norm} must be > 0"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(f"scale search {problem[0]}: {problem[1]}")


def min_max(W: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of W: the range [xmin, xmax] holding 0 (symmetric: [-m, m], m = max |w|)."""
    W = W.to(torch.float32)
    zeros = torch.zeros(W.shape[0], device=W.device)
    xmin = torch.minimum(W.min(dim=1).values, zeros)
    xmax = torch.maximum(W.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    return xmin, xmax


def grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> Grid:
    """The grid spanning [xmin, xmax] per row (any leading shape; scale/zero get a last dim of 1)."""
    maxq = 2**bits - 1
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
        # The standard (v1) GPTQ checkpoint stores z - 1 in an unsigned field, so z = 0
        # (a group with no negative weight) cannot be written: readers would see maxq + 1.
        # Such grids are stretched to z = 1, i.e. [-scale, (maxq - 1) * scale] still reaching xmax.
        low = zero < 1
        scale = torch.where(low, xmax / (maxq - 1), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return Grid(scale.unsqueeze(-1), zero.unsqueeze(-1), maxq)


def fit_grid(W: torch.Tensor, bits: int, sym: bool, search: Optional[ScaleSearch] = None,
             weight: Optional[torch.Tensor] = None) -> Grid:
    """Grid per row of W (a group of columns, or the whole row): min/max, or with `search` the
    shrunk range of least weighted error; `weight` [cols] or [rows, cols] (None: all 1)."""
    xmin, xmax = min_max(W, sym)
    grid = grid_from_range(xmin, xmax, bits, sym)
    if search is None:
        return grid
    W = W.to(torch.float32)
    weight = None if weight is None else weight.to(W.device, torch.float32)
    best = _range_error(W, grid, search.norm, weight)  # p = 1 (min/max) first: kept on ties
    scale, zero = grid.scale.clone(), grid.zero.clone()
    shrinks = [1 - k / search.steps for k in range(1, int(search.max_shrink * search.steps))]
    for start in range(0, len(shrinks), search.chunk):
        p = torch.tensor(shrinks[start : start + search.chunk], device=W.device).unsqueeze(1)  # [P, 1]
        cand = grid_from_range(p * xmin, p * xmax, bits, sym)  # scale, zero [P, rows, 1]
        err = _range_error(W, cand, search.norm, weight)  # [P, rows]
        # the first best candidate per row (the widest range on ties), as a sequential scan keeps
        low, at = err.min(dim=0)
        better = low < best
        best = torch.where(better, low, best)
        rows = torch.arange(W.shape[0], device=W.device)
        scale = torch.where(better.unsqueeze(1), cand.scale[at, rows], scale)
        zero = torch.where(better.unsqueeze(1), cand.zero[at, rows], zero)
    return Grid(scale, zero, grid.maxq)


def _range_error(W: torch.Tensor, grid: Grid, norm: float, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """sum_j weight_j |w_j - q_j|^norm per row (and candidate, for a batched grid), in place on
    `quantize`'s fresh buffer (the search's cost is this memory traffic)."""
    err = quantize(W, grid).sub_(W)
    err = err.square_() if norm == 2 else err.abs_().pow_(norm)
    if weight is not None:
        err.mul_(weight)
    return err.sum(-1)


def quantize_codes(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes in [0, maxq] (as fp32) for w [rows, k] on grid (in place on the quotient's buffer)."""
    return (w / grid.scale).round_().add_(grid.zero).clamp_(0, grid.maxq)


def dequantize_codes(q: torch.Tensor, grid: Grid) -> torch.Tensor:
    return grid.scale * (q - grid.zero)


def quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round w onto the grid and back (fake quantization): dequantize_codes in place on the fresh codes."""
    return quantize_codes(w, grid).sub_(grid.zero).mul_(grid.scale)
