"""Kernel: calibration-free pruning baselines and the mask-selection rules they share
with SparseGPT.

* magnitude: prune the smallest |W| over the whole layer (unstructured).
* Wanda (Sun et al. 2023): score |W_ij| * ||x_j||, compared within each output row
  (unstructured), since the row is what one output sums over.
* N:M (both, and SparseGPT): in every run of M consecutive input columns of a row,
  prune the N lowest scores.
Every function returns a bool mask, True = pruned; callers apply it. Counts are
exact: ties are broken by topk, never by a threshold that could take extra entries.
Imports only torch.
"""
from __future__ import annotations

import torch


def check_sparsity(sparsity: float, prune_n: int, prune_m: int, columns: int) -> None:
    """Unstructured: sparsity in [0, 1). N:M: 0 < N < M, M divides in_features
    (sparsity is then ignored: the pattern fixes it at N/M)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if prune_n == 0 and prune_m == 0:
        return
    if not 0 < prune_n < prune_m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {prune_n}:{prune_m}")
    if columns % prune_m:
        raise ValueError(f"M={prune_m} must divide in_features={columns}")


def _check_2d(W: torch.Tensor) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")


def smallest_mask(scores: torch.Tensor, k: int, per_row: bool = False) -> torch.Tensor:
    """True at exactly the k lowest scores of the tensor (or of each row if per_row)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if per_row:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    else:
        flat = mask.view(-1)
        flat[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n lowest scores of every m consecutive columns of each row."""
    rows, cols = scores.shape
    runs = scores.reshape(rows, cols // m, m)
    mask = torch.zeros(runs.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, torch.topk(runs, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def has_nm_pattern(W: torch.Tensor, n: int, m: int) -> bool:
    """At least n zeros in every run of m consecutive input columns of every row (M | in)."""
    rows, cols = W.shape
    return cols % m == 0 and bool(((W.reshape(rows, cols // m, m) == 0).sum(-1) >= n).all())


def magnitude_prune(
    W: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Mask of the int(sparsity * numel) smallest |W| in the layer, or N:M per row."""
    _check_2d(W)
    check_sparsity(sparsity, prune_n, prune_m, W.shape[1])
    scores = W.detach().abs().to(torch.float32)
    if prune_n:
        return nm_mask(scores, prune_n, prune_m)
    return smallest_mask(scores, int(sparsity * W.numel()))


def wanda_prune(
    W: torch.Tensor,
    input_norm: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
) -> torch.Tensor:
    """Wanda mask: lowest |W_ij| * ||x_j||, int(sparsity * in) per output row, or N:M.

    input_norm: ||x_j||_2 over the calibration tokens, [in] (HessianAccumulator.input_norm()).
    """
    _check_2d(W)
    check_sparsity(sparsity, prune_n, prune_m, W.shape[1])
    if input_norm.shape != (W.shape[1],):
        raise ValueError(
            f"input_norm must have shape [{W.shape[1]}], got {tuple(input_norm.shape)}"
        )
    scores = W.detach().abs().to(torch.float32) * input_norm.to(W.device, torch.float32)
    if prune_n:
        return nm_mask(scores, prune_n, prune_m)
    return smallest_mask(scores, int(sparsity * W.shape[1]), per_row=True)
