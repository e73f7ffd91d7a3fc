"""The AKT relation KL in memory linear in T: row blocks of the [T, T] relations.

Notation of distill/losses.py: for A in {Q, K, V}, [B, T, D], split into R relation heads of
d = D / R channels, S = A_r A_r^T / sqrt(d) and rel(A)_r = softmax(S) row by row. Per row i,

    KL_i = sum_j p_t(i, j) (S_t(i, j) - S_s(i, j)) - lse_t(i) + lse_s(i)

with p_t = softmax(S_t) and lse the row log-sum-exp, since sum_j p_t(i, j) = 1. A block of
rows I needs only S(I, J) for the columns J it sees (J = 0 .. max(I) with the causal mask:
the blocks above the diagonal are never formed), so the loss holds O(R T block) floats at a
time, never O(R T^2), and causal relations cost half the full matrix.

The loss is a scalar, so its gradient is known once the forward has seen each block:
dL/dS_s(i, j) = (p_s(i, j) - p_t(i, j)) / (B R T) and, with X = A_r d^(-1/4) (so S = X X^T),
dL/dX = (dS + dS^T) X. It is accumulated block by block during the forward, while p_s and
p_t are at hand, and backward only scales it by the incoming gradient: nothing of size T^2
is kept for backward and no block is formed twice (a recomputing backward would form every
block of both models a second time). The teacher side never gets a gradient.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def row_blocks(T: int, block: int, causal: bool) -> Iterator[tuple[int, int, int]]:
    """(first row, end row, end column) of each block of rows; any T, the last block may be short."""
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        yield i0, i1, i1 if causal else T


def scaled_heads(A: torch.Tensor, relation_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """X = A_r d^(-1/4) per relation head: [B, T, D] -> [B, R, T, d], so that X X^T = A_r A_r^T / sqrt(d)."""
    B, T, D = A.shape
    if D % relation_heads:
        raise ValueError(f"width {D} is not divisible by {relation_heads} relation heads")
    d = D // relation_heads
    return (A.to(dtype).reshape(B, T, relation_heads, d).transpose(1, 2) * d ** -0.25).contiguous()


def block_scores(X: torch.Tensor, i0: int, i1: int, cols: int, causal: bool) -> torch.Tensor:
    """S(I, J) for rows I = i0..i1-1 and columns J = 0..cols-1, later columns of the diagonal masked.

    The mask is a finite minimum, as in distill/losses.py: masked entries get probability 0
    and S_t - S_s = 0 there, so they add exact zeros to the KL and its gradient."""
    S = X[:, :, i0:i1] @ X[:, :, :cols].transpose(-1, -2)
    if causal:
        n = i1 - i0
        future = torch.ones(n, n, dtype=torch.bool, device=X.device).triu(1)
        S[..., i0:i1].masked_fill_(future, torch.finfo(S.dtype).min)
    return S


def softmax_parts(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, 1 / l, lse) of each row of S with E = exp(S - max), l = sum E, formed in place of S:
    softmax(S) = E / l with one exp per entry."""
    m = S.amax(-1, keepdim=True)
    E = S.sub_(m).exp_()
    l = E.sum(-1, keepdim=True)
    return E, l.reciprocal(), m + l.log()


def relation_kl_blocks(teacher: torch.Tensor, student: torch.Tensor, relation_heads: int, causal: bool,
                       block: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL(rel(teacher) || rel(student)), mean over batch, relation heads and rows, and (with_grad)
    its gradient wrt `student`, one block of rows at a time. fp32 (fp64 for fp64 inputs).

    The expectations under p_t are matrix products, not passes over the block:
    sum_j p_t(i, j) S(i, j) = x_i . (P_t X)_i for S = X X^T, so per row
    KL_i = x_t,i . (P_t X_t)_i - lse_t(i) - x_s,i . (P_t X_s)_i + lse_s(i)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    X_t = scaled_heads(teacher, relation_heads, dtype)
    X_s = scaled_heads(student, relation_heads, dtype)
    B, R, T, d_s = X_s.shape
    dX = torch.zeros_like(X_s) if with_grad else None
    total = torch.zeros((), dtype=dtype, device=X_s.device)
    for i0, i1, cols in row_blocks(T, block, causal):
        E_t, r_t, lse_t = softmax_parts(block_scores(X_t, i0, i1, cols, causal))
        E_s, r_s, lse_s = softmax_parts(block_scores(X_s, i0, i1, cols, causal))
        cross_t = torch.linalg.vecdot(X_t[:, :, i0:i1], E_t @ X_t[:, :, :cols]) * r_t[..., 0]
        cross_s = torch.linalg.vecdot(X_s[:, :, i0:i1], E_t @ X_s[:, :, :cols]) * r_t[..., 0]
        total += (cross_t - cross_s).sum() - (lse_t - lse_s).sum()
        if dX is not None:
            dS = E_s.mul_(r_s).addcmul_(E_t, -r_t)  # p_s - p_t, in place
            dX[:, :, i0:i1] += dS @ X_s[:, :, :cols]
            dX[:, :, :cols] += dS.transpose(-1, -2) @ X_s[:, :, i0:i1]
    rows = B * R * T
    grad = None
    if dX is not None:  # dA = dX d^(-1/4) / rows, back to [B, T, D]
        grad = (dX * (d_s ** -0.25 / rows)).transpose(1, 2).reshape(student.shape).to(student.dtype)
    return total / rows, grad


class _RelationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, teacher: torch.Tensor, student: torch.Tensor, relation_heads: int, causal: bool,
                block: int) -> torch.Tensor:
        loss, grad = relation_kl_blocks(teacher, student, relation_heads, causal, block, with_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return None, grad * g.to(grad.dtype), None, None, None


def blockwise_relation_kl(teacher: torch.Tensor, student: torch.Tensor, relation_heads: int, causal: bool = True,
                          block: int = 64) -> torch.Tensor:
    """distill.losses.relation_kl in O(R T block) memory: the same value and student gradient."""
    if block <= 0:
        raise ValueError(f"block must be > 0, got {block}")
    teacher = teacher.detach()
    if torch.is_grad_enabled() and student.requires_grad:
        return _RelationKL.apply(teacher, student, relation_heads, causal, block)
    return relation_kl_blocks(teacher, student, relation_heads, causal, block, with_grad=False)[0]
