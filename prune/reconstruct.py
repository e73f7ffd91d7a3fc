"""Kernel: the best kept weights for a fixed pruning mask (masked least squares).

Given the dense layer W0 [out, in], its input Hessian H = 2/n X^T X and a mask
(True = pruned), the layer error ||(W - W0) X||^2 over W with W[mask] = 0 is minimized
row by row at

    D_p = -W0_p,   H_kk D_k = H_kp W0_p    (k: kept columns, p: pruned columns of the row)

SparseGPT's OBS sweep does not reach this optimum: the error of a pruned weight is only
moved onto the columns to its right (those not yet fixed), so the early columns of
every row are never revisited. Solving the system above for SparseGPT's mask lowers the
layer error (benchmarks/prune_quality.py reports by how much; Boza 2024 makes the same
observation and solves it by ADMM).

Every row has its own kept set, so a direct solve would factor one [k, k] matrix per
row, O(out * in^3): fine for a toy layer, hopeless at an MLP's 14336 inputs. We run
preconditioned conjugate gradients on all rows at once instead: the operator
K (H + lambda I) K (K masks the pruned columns) is SPD on the kept subspace, and each
iteration is a single [out, in] x [in, in] GEMM. The Jacobi preconditioner diag(H) plus
the damping lambda (as in GPTQ, a fraction of mean diag H, which keeps the condition
number bounded) make it converge in a few dozen iterations.
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hessian import damped_hessian
from engine.obs import prepare_layer


@dataclass
class ReconstructResult:
    W: torch.Tensor  # fp32 (fp64 if given) [out, in]: zeros where mask, optimal elsewhere
    error_before: float  # tr((W_in - W0) H (W_in - W0)^T) of the weights handed in
    error_after: float  # the same for W
    iterations: int  # CG iterations run
    residual: float  # final ||r|| / ||b|| over all rows (0 when nothing was pruned)


def layer_error(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - W0) H (W - W0)^T): the summed squared output error on the calibration rows."""
    D = (W - W0).to(H.dtype)
    return float(((D @ H) * D).sum())


def masked_least_squares(
    W0: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    W: torch.Tensor | None = None,
    damp: float = 0.01,
    max_iters: int = 100,
    rtol: float = 1e-5,
) -> ReconstructResult:
    """Optimal weights of W0 [out, in] under `mask` (bool, True = pruned) for Hessian H.

    W, if given, is the pruned layer to improve on (e.g. SparseGPT's output); it only
    serves as the starting point of CG and as `error_before`. The damped H is used for
    the solve, the plain H for both errors.
    """
    W0, H, _ = prepare_layer(W0, H, mask)  # dead input columns of W0 zeroed
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    keep = (~mask).to(W0.dtype)
    start = W0 * keep if W is None else W.to(W0.dtype) * keep
    error_before = layer_error(start, W0, H)
    Hd, _, _ = damped_hessian(H, damp)  # the same damped H that SparseGPT and GPTQ invert
    # Unknown: D_k = W_k - W0_k. Right-hand side: -K H D_p with D_p = -W0_p.
    b = keep * ((W0 * (1 - keep)) @ Hd)
    x = (start - W0) * keep
    r = b - keep * (x @ Hd)
    precond = keep / torch.diagonal(Hd)
    z = r * precond
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    b_norm = float(b.norm())
    tiny = torch.finfo(W0.dtype).tiny
    it = 0
    while b_norm > 0 and it < max_iters and float(r.norm()) > rtol * b_norm:
        Ap = keep * (p @ Hd)
        alpha = rz / (p * Ap).sum(1, keepdim=True).clamp_min(tiny)
        x += alpha * p
        r -= alpha * Ap
        z = r * precond
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + (rz_next / rz.clamp_min(tiny)) * p
        rz = rz_next
        it += 1
    out = (W0 + x) * keep
    residual = float(r.norm()) / b_norm if b_norm > 0 else 0.0
    return ReconstructResult(out, error_before, layer_error(out, W0, H), it, residual)
