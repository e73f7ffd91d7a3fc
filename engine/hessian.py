"""Kernel: the layer Hessian H = 2/n * sum_i x_i x_i^T and its damped inverse.

Shared by every second-order method (GPTQ, SparseGPT, Wanda's activation norms).
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class HessianError(ValueError):
    """The Hessian cannot be inverted or holds non-finite values."""


# Columns per block of the triangular X^T X product: wide enough for GEMM speed, narrow
# enough that skipping the blocks below the diagonal saves most of the lower half.
TRIANGLE_BLOCK = 256
# Inputs of fewer rows than this are staged and multiplied together (a GEMM whose
# reduction dimension is a few short windows leaves the cores idle).
MIN_GEMM_ROWS = 2048


def add_gram_(S: torch.Tensor, X: torch.Tensor, block: int = TRIANGLE_BLOCK) -> None:
    """S += X^T X on the upper block triangle only (blocks on the diagonal in full).

    About half the FLOPs of the full product at the same GEMM speed; column slices of X
    are strided views (GEMMs read them in place), so nothing is copied. In S's own dtype even
    inside a forward under torch.autocast (the calibration's hooks run there).
    """
    cols = X.shape[1]
    with torch.autocast(S.device.type, enabled=False):
        for start in range(0, cols, block):
            end = min(start + block, cols)
            S[:end, start:end].addmm_(X[:, :end].t(), X[:, start:end])


class HessianAccumulator:
    """H = 2/n * sum x x^T over every input row seen, plus the per-feature sum of x^2.

    Kept as a running SUM in `dtype` (fp32; fp64 for an fp64 calibration) with an exact row
    count, divided once when H is read (no rescaling of the whole matrix per batch). The
    product runs on the upper block triangle (add_gram_) and is mirrored when H is read.
    Inputs of fewer than MIN_GEMM_ROWS rows are copied into a staging block and multiplied
    together once it is full (or H is read); larger ones are multiplied in place (a view,
    converted to `dtype` only if they are not). So the result depends only on the sequence
    of inputs, not on how the caller batches its calls.

    With full=False only the diagonal statistic is kept (H is None): methods that
    need no more than activation norms (Wanda) then skip the [cols, cols] GEMM, which
    at LLM widths (an MLP's 14336 inputs) costs far more than the layer's forward.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", full: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"a Hessian sums in float32 or float64, not {dtype}")
        self.columns = columns
        self.device = torch.device(device)
        self.dtype = dtype
        # sum x x^T (upper block triangle while accumulating; H itself once read)
        self._sum = torch.zeros(columns, columns, dtype=dtype, device=device) if full else None
        self._sq = None if full else torch.zeros(columns, dtype=dtype, device=device)
        self._final = False  # _sum holds H = 2/n * (the full symmetric sum), n = _final_n
        self._final_n = 1
        self._stage: torch.Tensor | None = None  # [MIN_GEMM_ROWS, cols] small inputs waiting
        self._staged = 0
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows of inputs x [..., columns] (any leading shape)."""
        rows = x.reshape(-1, x.shape[-1])
        m = rows.shape[0]
        self.n += m
        if m >= MIN_GEMM_ROWS:
            self._flush()
            self._add_rows(rows.to(self.device, self.dtype))
            return
        if self._staged + m > MIN_GEMM_ROWS:
            self._flush()
        if self._stage is None:
            self._stage = torch.empty(MIN_GEMM_ROWS, self.columns, dtype=self.dtype, device=self.device)
        self._stage[self._staged : self._staged + m].copy_(rows)
        self._staged += m

    def add_all(self, xs: Sequence[torch.Tensor]) -> None:
        """Add several inputs, in order (the same as add() on each)."""
        for x in xs:
            self.add(x)

    def raw_sum(self) -> torch.Tensor:
        """The running sum itself, staged rows added: sum x x^T on the upper block triangle
        (sum x^2 per feature with full=False), in self.dtype. A distributed reduction adds these up in
        place and then sets `n` to the total rows; only valid before H is read."""
        if self._final:
            raise RuntimeError("raw_sum: H was already read (the sum is divided)")
        self._flush()
        return self._sum if self._sum is not None else self._sq

    def chain_buffers(self) -> list[torch.Tensor]:
        """The running sum and the staging block, in place (the block allocated if need be).
        A distributed chain copies a predecessor's into them, with its `n` and `staged`, and
        adds on from there exactly as one process would have gone on."""
        if self._final:
            raise RuntimeError("chain_buffers: H was already read (the sum is divided)")
        if self._stage is None:
            self._stage = torch.empty(MIN_GEMM_ROWS, self.columns, dtype=self.dtype, device=self.device)
        return [self._sum if self._sum is not None else self._sq, self._stage]

    @property
    def staged(self) -> int:
        """Rows waiting in the staging block."""
        return self._staged

    @staged.setter
    def staged(self, rows: int) -> None:
        self._staged = rows

    def _flush(self) -> None:
        if self._staged:
            self._add_rows(self._stage[: self._staged])
            self._staged = 0

    def _add_rows(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        if self._sum is None:
            self._sq.add_((x * x).sum(0))
        else:
            if self._final:  # reading H then adding more: back to the raw sum
                self._sum.mul_(self._final_n / 2.0)
                self._final = False
            add_gram_(self._sum, x)

    @property
    def H(self) -> torch.Tensor | None:
        """2/n * sum x x^T, symmetric, in self.dtype (None with full=False)."""
        self._flush()
        self._stage = None
        if self._sum is not None and not self._final:
            S = self._sum
            S.triu_()
            S.add_(S.triu(1).t())
            S.mul_(2.0 / max(self.n, 1))
            self._final, self._final_n = True, max(self.n, 1)
        return self._sum

    def finite(self) -> bool:
        H = self.H  # flushes the staged rows
        return bool(torch.isfinite(self._sq if H is None else H).all())

    def _sum_sq(self) -> torch.Tensor:
        """sum_i x_ij^2 per feature j."""
        H = self.H  # flushes the staged rows
        return self._sq if H is None else torch.diagonal(H) * (max(self.n, 1) / 2.0)

    def diagonal(self) -> torch.Tensor:
        """diag(H) = 2/n * sum_i x_ij^2, available in both modes."""
        H = self.H  # flushes the staged rows
        return torch.diagonal(H).clone() if H is not None else self._sq * (2.0 / max(self.n, 1))

    def input_norm(self) -> torch.Tensor:
        """||x_j||_2 over all rows seen (Wanda's activation statistic)."""
        return self._sum_sq().sqrt()


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
        # each [cols, cols] intermediate is dropped as soon as the next exists: at an MLP's
        # 14336 inputs one is 0.8 GB in fp32, and holding all four would double the peak
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            # A nearly singular H can pass the first Cholesky yet give an inverse with
            # inf/NaN; treat that as a failure too and damp harder.
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return InverseHessian(U, damp, fraction, dead)
        fraction = fraction * 10 if fraction > 0 else 1e-4
    raise HessianError(
        f"Hessian is not positive definite even with damping {tried:g} x mean(diag)"
    )
