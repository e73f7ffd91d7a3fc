"""Kernel: uniform integer quantization grids (scale, zero) as in GPTQ.

Asymmetric: zero = round(-xmin/scale) in [0, maxq]. Symmetric: zero = (maxq+1)/2,
the convention the GPTQ checkpoint format stores (so symmetric 4-bit qzeros read
0x77777777 after the v1 "-1" offset). Both grids contain 0 exactly, which is what
lets pruned weights survive quantization. Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def fit_grid(W: torch.Tensor, bits: int, sym: bool) -> Grid:
    """Min/max grid per row of W (a group of columns, or the whole row)."""
    maxq = 2**bits - 1
    W = W.to(torch.float32)
    zeros = torch.zeros(W.shape[0], device=W.device)
    xmin = torch.minimum(W.min(dim=1).values, zeros)
    xmax = torch.maximum(W.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
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
    return Grid(scale.unsqueeze(1), zero.unsqueeze(1), maxq)


def quantize_codes(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes in [0, maxq] (as fp32) for w [rows, k] on grid."""
    return torch.clamp(torch.round(w / grid.scale) + grid.zero, 0, grid.maxq)


def dequantize_codes(q: torch.Tensor, grid: Grid) -> torch.Tensor:
    return grid.scale * (q - grid.zero)


def quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round w onto the grid and back (fake quantization)."""
    return dequantize_codes(quantize_codes(w, grid), grid)
