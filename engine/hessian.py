"""Kernel: the layer Hessian H = 2/n * sum_i x_i x_i^T and its damped inverse.

Shared by every second-order method (GPTQ, SparseGPT, Wanda's activation norms).
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class HessianError(ValueError):
    """The Hessian cannot be inverted or holds non-finite values."""


class HessianAccumulator:
    """Streaming H = 2/n * sum x x^T in fp32, plus the per-feature mean of x^2.

    Kept as a running mean so that after any number of batches H equals the
    one-shot formula over every row seen so far (exact under streaming, unlike
    summing then dividing by a guessed n).

    With full=False only the diagonal statistic is kept (H is None): methods that
    need no more than activation norms (Wanda) then skip the [cols, cols] GEMM, which
    at LLM widths (an MLP's 14336 inputs) costs far more than the layer's forward.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", full: bool = True) -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device) if full else None
        self.sq_norm = torch.zeros(columns, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows of inputs x [..., columns] (any leading shape)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sq_norm.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.sq_norm.mul_(self.n / total)
        self.sq_norm.add_((x * x).sum(0) / total)
        if self.H is not None:
            self.H.mul_(self.n / total)
            # addmm runs this at GEMM speed; sqrt(2/total) folds the 2/n factor into x.
            xs = x * (2.0 / total) ** 0.5
            self.H.addmm_(xs.t(), xs)
        self.n = total

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sq_norm if self.H is None else self.H).all())

    def diagonal(self) -> torch.Tensor:
        """diag(H) = 2/n * sum_i x_ij^2, available in both modes."""
        return 2.0 * self.sq_norm

    def input_norm(self) -> torch.Tensor:
        """||x_j||_2 over all rows seen (Wanda's activation statistic)."""
        return (self.sq_norm * self.n).sqrt()


@dataclass
class InverseHessian:
    Hinv: torch.Tensor  # upper Cholesky factor of (H + damp*I)^-1, [cols, cols]
    damp: float  # absolute damping added to the diagonal
    damp_fraction: float  # damp as a fraction of mean(diag(H))
    dead: torch.Tensor  # bool [cols]: columns whose input was always zero


def damped_hessian(H: torch.Tensor, damp_fraction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H + lambda I, dead columns, lambda), in fp32 or fp64, H left untouched.

    Dead columns (diag 0: the input feature never fired) first get H_jj = 1 so the
    matrix stays invertible; lambda = damp_fraction * mean(diag H) over that diagonal.
    """
    H = H.to(torch.promote_types(H.dtype, torch.float32)).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    damp = damp_fraction * float(diag.mean())
    diag += damp
    return H, dead, damp


def inverse_hessian(
    H: torch.Tensor, damp_fraction: float = 0.01, max_tries: int = 6
) -> InverseHessian:
    """Damped inverse Hessian in the form the OBS column loops need.

    Dead columns (diag 0: the input feature never fired) get H_jj = 1 so the
    matrix stays invertible; the caller zeroes those weight columns since they
    cannot affect the output. Damping is lambda = fraction * mean(diag H); if
    Cholesky still fails it is raised tenfold up to max_tries times before we
    give up with HessianError.

    Works in fp32, or fp64 when H is fp64 (tests use that to compare blocked and
    unblocked sweeps without rounding noise).
    """
    if damp_fraction < 0:
        raise ValueError(f"damp_fraction must be >= 0, got {damp_fraction}")
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise HessianError("Hessian has NaN/inf entries (non-finite calibration activations)")
    fraction = damp_fraction
    tried = fraction
    for _ in range(max_tries):
        tried = fraction
        Hd, dead, damp = damped_hessian(H, fraction)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            # A nearly singular H can pass the first Cholesky yet give an inverse with
            # inf/NaN; treat that as a failure too and damp harder.
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return InverseHessian(U, damp, fraction, dead)
        fraction = fraction * 10 if fraction > 0 else 1e-4
    raise HessianError(
        f"Hessian is not positive definite even with damping {tried:g} x mean(diag)"
    )
