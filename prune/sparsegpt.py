"""Kernel: SparseGPT (Frantar & Alistarh 2023), optionally joint with quantization.

The OBS column sweep of engine.obs with a mask rule: pruned weights are set to zero
and their error is spread over the columns not yet visited, exactly like GPTQ spreads
rounding error. Which weights to prune is decided on the weights as already updated,
by the OBS saliency w^2 / Hinv_ii^2 (Hinv = upper Cholesky of the damped inverse):

* unstructured: at the start of every lazy block, the lowest-saliency weights of the
  block. The per-block counts follow k(c) = int(sparsity * out * c) evaluated at the
  block edges, so blocks get (almost) equal shares and the layer total is exactly
  int(sparsity * out * in).
* N:M: at the first column of every run of M, the N lowest of the run in each row.
  The lazy block is rounded down to a multiple of M (at least M) so runs never
  straddle blocks; the result does not depend on the block size otherwise.

Joint mode (quant_bits set, the paper's 16-bit -> sparse + quantized in one pass):
the same sweep also rounds every kept weight onto a GPTQ grid, so pruning and
quantization errors are compensated together with a single Hessian.
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prune.baselines import check_sparsity, nm_mask, smallest_mask
from quant.gptq import GroupQuantizer, QuantResult, check_quant_args
from engine.hessian import inverse_hessian
from engine.obs import MaskRule, obs_sweep, prepare_layer


@dataclass
class PruneResult:
    W: torch.Tensor  # fp32 [out, in] pruned and updated weight (== quant.Q in joint mode)
    mask: torch.Tensor  # bool [out, in], True = pruned
    error: float  # OBS loss sum (w - q)^2 / d^2 / 2 over the sweep
    damp_fraction: float  # damping actually used (fraction of mean diag H)
    quant: QuantResult | None = None  # joint mode only


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    quant_bits: int | None = None,
    quant_group_size: int = -1,
    quant_sym: bool = False,
) -> PruneResult:
    """Prune W [out, in] to `sparsity` (or N:M) with OBS updates from H [in, in].

    With quant_bits, also quantizes in the same sweep (groups of quant_group_size
    fitted lazily on the updated weights, pruned entries excluded; -1: one grid per row
    fitted on W up front). Pruned entries then have code == zero point and Q == 0.
    """
    W, H, _ = prepare_layer(W, H)
    rows, cols = W.shape
    check_sparsity(sparsity, prune_n, prune_m, cols)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if quant_bits is not None:
        check_quant_args(quant_bits, quant_group_size)
    choose: MaskRule | None = None
    every = 0
    if prune_n:
        block_size = max(prune_m, block_size - block_size % prune_m)
        every = prune_m
        choose = lambda saliency, start: nm_mask(saliency, prune_n, prune_m)  # noqa: E731
    elif sparsity > 0:
        every = block_size
        choose = _unstructured_rule(sparsity, rows)
    quantizer = None
    if quant_bits is not None:
        quantizer = GroupQuantizer(W, quant_bits, quant_sym, quant_group_size)
    inv = inverse_hessian(H, damp)
    sweep = obs_sweep(
        W, inv.Hinv, block_size=block_size, choose=choose, choose_every=every, quantizer=quantizer
    )
    quant = quantizer.result(sweep.error, inv.damp_fraction) if quantizer is not None else None
    W_out = quant.Q if quant is not None else sweep.Q.to(torch.float32)
    return PruneResult(W_out, sweep.mask, sweep.error, inv.damp_fraction, quant)


def _unstructured_rule(sparsity: float, rows: int) -> MaskRule:
    """Per-block choice whose counts telescope to exactly int(sparsity * rows * cols)."""

    def quota(c: int) -> int:  # pruned weights among the first c columns
        return int(sparsity * rows * c)

    def choose(saliency: torch.Tensor, start: int) -> torch.Tensor:
        k = quota(start + saliency.shape[1]) - quota(start)
        return smallest_mask(saliency, k)

    return choose
