"""Kernel: the Optimal Brain Surgeon column sweep shared by GPTQ and SparseGPT.

GPTQ (Frantar et al. 2022), SparseGPT (Frantar & Alistarh 2023) and their joint
prune+quantize mode are one algorithm: walk the input columns in order; for each
column pick its final value q (zero if pruned, else the grid point, else unchanged),
charge the error err = (w - q) / d with d = Hinv[i, i], and move it onto the columns
not yet fixed, W[:, j] -= err * Hinv[i, j]. Hinv is the upper Cholesky factor of the
damped inverse Hessian, whose row i is exactly the OBS update once columns < i are
fixed, so no re-inversion is ever needed.

Lazy blocks: the update of column j > block end only needs the block's err vectors,
so it is deferred and applied as one GEMM per block (Err1 @ Hinv[block, later]). This
changes nothing mathematically; the tests compare against an unblocked loop.

The callers decide what happens per column through two hooks: a mask rule (SparseGPT
picks which weights to prune from the OBS saliency w^2 / d^2 of the weights as they
stand) and a column quantizer (GPTQ grids, possibly fitted lazily per group).

Asymmetric calibration (GPTAQ, Li et al. 2025): when the layer should reproduce W X~ (X~ its
inputs in the full-precision model) from its inputs X in the compressed model, each column's
weight w also owes w dX_i, which the later columns take on: with P = alpha triu(dXXT Hinv^T, 1)
Hinv (dXXT = (X~ - X) X^T, quant.gptq.asymmetric_update), fixing column i adds w_i P[i, j] to
every later column j, w_i its value when it is fixed. Lazily too: the block's w_i are kept.
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# (saliency w^2/d^2 [rows, span] of the columns start..start+span, start) -> bool mask.
MaskRule = Callable[[torch.Tensor, int], torch.Tensor]


class ColumnQuantizer(Protocol):
    """What the sweep needs from a quantizer (see quant.gptq.GroupQuantizer)."""

    refit_every: int  # > 0: call fit() at every column i with i % refit_every == 0

    def fit(self, start: int, current: torch.Tensor) -> None:
        """Fit the grid of columns start..start+refit_every on their current values."""

    def __call__(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """Quantize sweep column i (values [rows]); return the dequantized column."""


@dataclass
class SweepResult:
    Q: torch.Tensor  # final weights [rows, cols], sweep order, compute dtype
    mask: torch.Tensor  # bool [rows, cols], sweep order: True = forced to zero
    error: float  # OBS loss: sum over all weights of (w - q)^2 / d^2, halved
    errors: list[float]  # the same per matrix of a batched sweep ([error] for one matrix)


def compute_dtype(W: torch.Tensor, H: torch.Tensor | None = None) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 weights (half precision cannot carry the updates); fp64 when
    W or H is fp64 (an fp64 calibration's Hessian: the solve then depends on the data only,
    not on the machine's BLAS, see engine/calibration.py; the tests' rounding-free checks)."""
    wide = W.dtype == torch.float64 or (H is not None and H.dtype == torch.float64)
    return torch.float64 if wide else torch.float32


def prepare_layer(
    W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return (W copy in compute dtype, H on W's device, dead columns).

    Dead columns (diag H == 0: the input never fired) are zeroed in the copy: they
    cannot influence the output, and inverse_hessian decouples them from the rest.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(
            f"H must be [{cols}, {cols}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != W.shape):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape)}")
    dtype = compute_dtype(W, H)
    W = W.to(dtype=dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype)
    dead = torch.diagonal(H) == 0
    W[:, dead] = 0
    return W, H, dead


def obs_sweep(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    block_size: int = 128,
    mask: torch.Tensor | None = None,
    choose: MaskRule | None = None,
    choose_every: int = 0,
    quantizer: ColumnQuantizer | None = None,
    P: torch.Tensor | None = None,
) -> SweepResult:
    """One OBS pass over the columns of W (already in sweep order; updated in place).

    Batched: W [B, rows, cols] with Hinv [B, cols, cols] sweeps B independent matrices
    (e.g. the experts of one MoE block) in one column loop; the quantizer then sees the
    B * rows rows stacked. Mask rules are per matrix only (W 2-D).

    mask: weights forced to zero from the start. choose: called at every column i with
    i % choose_every == 0 on the saliency of columns i..min(i+choose_every, block end);
    its mask is added (SparseGPT: choose_every = block_size for the per-block
    unstructured choice, M for N:M). choose_every must divide block_size so a decision
    never straddles a block. quantizer: rounds each non-pruned column onto its grid.
    P: the asymmetric-calibration update ([cols, cols] or [B, cols, cols], sweep order, strictly
    upper triangular; see the module docstring), None for the plain OBS sweep.
    """
    cols = W.shape[-1]
    if W.ndim not in (2, 3) or Hinv.shape[:-2] != W.shape[:-2]:
        raise ValueError(f"W {tuple(W.shape)} and Hinv {tuple(Hinv.shape)}: expected [rows, cols] + [cols, cols] "
                         f"or [B, rows, cols] + [B, cols, cols]")
    if choose is not None and W.ndim != 2:
        raise ValueError("a mask rule needs a single matrix (W 2-D)")
    if P is not None and P.shape != Hinv.shape:
        raise ValueError(f"P {tuple(P.shape)} must have the shape of Hinv {tuple(Hinv.shape)}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if choose is not None and (choose_every <= 0 or block_size % choose_every):
        raise ValueError(f"choose_every ({choose_every}) must divide block_size ({block_size})")
    mask = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask.clone()
    Q = torch.zeros_like(W)
    losses = torch.zeros(W.shape[:-2], dtype=W.dtype, device=W.device)
    d_all = torch.diagonal(Hinv, dim1=-2, dim2=-1)
    refit = quantizer.refit_every if quantizer is not None else 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[..., i1:i2].clone()  # fully up to date: earlier blocks' lazy updates applied
        Err1 = torch.zeros_like(W1)
        Pre1 = torch.zeros_like(W1) if P is not None else None  # each column's value when fixed
        Hinv1 = Hinv[..., i1:i2, i1:i2]
        for i in range(i1, i2):
            j = i - i1
            if choose is not None and i % choose_every == 0:
                stop = min(i + choose_every, i2)
                saliency = W1[:, j : stop - i1] ** 2 / d_all[i:stop] ** 2
                mask[:, i:stop] |= choose(saliency, i)
            if refit and i % refit == 0:
                stop = min(i + refit, cols)
                current = _current(W, W1, Err1, Hinv, i1, i, stop, Pre1, P)
                # Pruned weights will be 0, which every grid holds: leave them out of
                # the min/max so they do not stretch it.
                current = current.masked_fill(mask[..., i:stop], 0)
                quantizer.fit(i, current.reshape(-1, current.shape[-1]))
            w = W1[..., j]
            q = w.masked_fill(mask[..., i], 0)
            if quantizer is not None:
                q = quantizer(i, q.reshape(-1)).reshape(q.shape).masked_fill(mask[..., i], 0)
            err = (w - q) / Hinv1[..., j, j].unsqueeze(-1)
            losses += (err * err).sum(-1)
            if P is not None:  # P[i, i] = 0: column i itself is left as it is
                Pre1[..., j] = w
                W1[..., j:] += Pre1[..., j].unsqueeze(-1) * P[..., i, i:i2].unsqueeze(-2)
            W1[..., j:] -= err.unsqueeze(-1) * Hinv1[..., j, j:].unsqueeze(-2)
            Q[..., i] = q
            Err1[..., j] = err
        W[..., i2:] -= Err1 @ Hinv[..., i1:i2, i2:]  # the deferred (lazy) update, one GEMM
        if P is not None:
            W[..., i2:] += Pre1 @ P[..., i1:i2, i2:]
    return SweepResult(Q, mask, float(losses.sum()) / 2, (losses.reshape(-1) / 2).tolist())


def _current(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
    i1: int, i: int, stop: int, Pre1: torch.Tensor | None = None, P: torch.Tensor | None = None,
) -> torch.Tensor:
    """Columns i..stop as they stand when the sweep reaches column i.

    Inside the block they are in W1; columns past the block end still owe the lazy
    update from this block's columns i1..i-1, which is added here so that a group
    wider than (or straddling) a block is fitted exactly as an unblocked sweep would.
    """
    i2 = i1 + W1.shape[-1]
    inside = W1[..., i - i1 : min(stop, i2) - i1]
    if stop <= i2:
        return inside.clone()
    later = W[..., i2:stop] - Err1[..., : i - i1] @ Hinv[..., i1:i, i2:stop]
    if P is not None:
        later = later + Pre1[..., : i - i1] @ P[..., i1:i, i2:stop]
    return torch.cat([inside, later], dim=-1)
