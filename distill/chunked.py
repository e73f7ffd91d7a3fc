"""The LM term and logit KD through the LM head in token chunks: never the full [B, T, V] logits.

Notation of distill/losses.py. The student's final hidden states h ([N, D] over the N = B T
tokens) meet the head W ([V, D], bias b) one chunk of tokens at a time: z = h W^T + b for the
chunk, the teacher's logits z_t for the same tokens (a callable: its head runs under no_grad,
on its own device), and per chunk

    LM   = -log softmax(z)[next token]                     (every token but the last of a row)
    KD   = tau^2 sum_v p_t (log p_t - log softmax(z / tau))   with p_t = softmax(z_t / tau)
    top-k KD: the same with p_t renormalized over the teacher's k cached logits.

As for the relation KL (distill/blockwise.py) the loss is a scalar, so the gradient is formed
in the same pass while the chunk's probabilities are at hand:

    dL/dz = w_lm (softmax(z) - onehot(next)) / N_lm + w_logit tau (softmax(z / tau) - p_t) / N_kd
    dL/dh = dz W,   dL/dW = dz^T h,   dL/db = sum dz

and backward scales it by the incoming gradient. The loss holds a few [chunk, V] tensors at a
time and the gradients of h, W and b; the terms are returned weighted (one gradient for their
sum), and unweighted for the record.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

TeacherLogits = Callable[[int, int], torch.Tensor]  # tokens [r0, r1) of the flattened batch -> [r1 - r0, V_t]


class HeadLosses(NamedTuple):
    total: torch.Tensor  # w_lm LM + w_logit KD, with the gradient
    lm: Optional[torch.Tensor]  # unweighted values, no gradient (None: weight 0)
    logit: Optional[torch.Tensor]


class TopK(NamedTuple):
    """The cached teacher: its k largest logits and their token ids, [B, T, k] each."""

    values: torch.Tensor
    indices: torch.Tensor


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Flattened LM targets: position t of a row predicts ids[t + 1]; the last position none (-1)."""
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = ids[:, 1:]
    return targets.reshape(-1)


def kd_teacher(teacher: Optional[TeacherLogits], top: Optional[TopK], r0: int, r1: int, vocab: int,
               temperature: float, dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p_t of tokens r0..r1-1, dense [n, vocab] or over the k cached ids [n, k], and those ids (or None)."""
    if top is not None:
        k = top.values.shape[-1]
        values = top.values.reshape(-1, k)[r0:r1].to(dtype)
        return torch.log_softmax(values / temperature, -1), top.indices.reshape(-1, k)[r0:r1].long()
    return torch.log_softmax(teacher(r0, r1)[:, :vocab].to(dtype) / temperature, -1), None


def head_losses_chunks(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                       w_lm: float, w_logit: float, teacher: Optional[TeacherLogits], top: Optional[TopK],
                       temperature: float, vocab: int, chunk: int,
                       with_grad: tuple[bool, bool, bool]) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """([LM, KD] unweighted, [dh, dW, db] of w_lm LM + w_logit KD where with_grad asks), in fp32
    (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    B, T, D = h.shape
    flat = h.reshape(-1, D)
    targets = next_tokens(ids)
    n_lm, n_kd = B * (T - 1), B * T
    grads = [torch.zeros(shape, dtype=dtype, device=h.device) if need else None
             for need, shape in zip(with_grad, (flat.shape, weight.shape, weight.shape[:1]))]
    dh, dW, db = grads
    sums = [torch.zeros((), dtype=torch.float64, device=h.device) for _ in range(2)]
    for r0 in range(0, flat.shape[0], chunk):
        r1 = min(r0 + chunk, flat.shape[0])
        x = flat[r0:r1]
        z = torch.nn.functional.linear(x, weight, bias).to(dtype)  # [n, V]
        dz_kd = kd_chunk(z, teacher, top, r0, r1, vocab, temperature, sums, any(with_grad)) if w_logit else None
        dz = None
        if w_lm:
            dz = lm_chunk(z, targets[r0:r1], sums, any(with_grad))  # in place of z
            if dz is not None:
                dz.mul_(w_lm / n_lm)
        if dz_kd is not None:
            dz_kd.mul_(w_logit * temperature / n_kd)
            if dz is None:
                dz = torch.zeros_like(z) if vocab < z.shape[1] else dz_kd
            if dz is not dz_kd:
                dz[:, :vocab] += dz_kd
        if dz is None:
            continue
        if dh is not None:
            dh[r0:r1] = dz @ weight.to(dtype)
        if dW is not None:
            dW.addmm_(dz.T, x.to(dtype))
        if db is not None:
            db += dz.sum(0)
    values = [(sums[0] / n_lm).to(dtype), (sums[1] * temperature**2 / n_kd).to(dtype)]
    return values, [None if dh is None else dh.view(h.shape), dW, db]


def lm_chunk(z: torch.Tensor, targets: torch.Tensor, sums: list[torch.Tensor], grad: bool) -> Optional[torch.Tensor]:
    """Adds the chunk's summed cross-entropy to sums[0]; with `grad`, d(sum)/dz, formed in place of z."""
    rows = (targets >= 0).nonzero().squeeze(-1)
    picked = targets[rows]
    lse = torch.logsumexp(z, -1)
    sums[0] += (lse[rows] - z[rows, picked]).sum().double()
    if not grad:
        return None
    dz = z.sub_(lse[:, None]).exp_()
    dz[targets < 0] = 0  # the last token of a row predicts nothing
    dz[rows, picked] -= 1
    return dz


def kd_chunk(z: torch.Tensor, teacher: Optional[TeacherLogits], top: Optional[TopK], r0: int, r1: int, vocab: int,
             temperature: float, sums: list[torch.Tensor], grad: bool) -> Optional[torch.Tensor]:
    """Adds the chunk's summed KL / tau^2 to sums[1]; with `grad`, softmax(z / tau) - p_t over the first
    `vocab` logits (None without KD: no teacher, no cache)."""
    if teacher is None and top is None:
        return None
    z_s = z[:, :vocab] / temperature
    lse_s = torch.logsumexp(z_s, -1)
    log_t, ids_t = kd_teacher(teacher, top, r0, r1, vocab, temperature, z.dtype)
    p_t = log_t.exp()
    # log p_t - log p_s entry by entry, as the reference does: a small KL is not left to the
    # cancellation of terms of the size of log V
    log_s = (z_s if ids_t is None else z_s.gather(-1, ids_t)) - lse_s[:, None]
    sums[1] += torch.linalg.vecdot(p_t, log_t - log_s).sum().double()
    if not grad:
        return None
    dz = z_s.sub_(lse_s[:, None]).exp_()  # softmax(z / tau), in place of z_s
    return dz.sub_(p_t) if ids_t is None else dz.scatter_add_(-1, ids_t, -p_t)


class _HeadLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                w_lm: float, w_logit: float, teacher: Optional[TeacherLogits], top: Optional[TopK],
                temperature: float, vocab: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        needs = tuple(ctx.needs_input_grad[:3])
        (lm, kd), grads = head_losses_chunks(h, weight, bias, ids, w_lm, w_logit, teacher, top, temperature,
                                             vocab, chunk, needs)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(lm, kd)
        return w_lm * lm + w_logit * kd, lm, kd

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grads = [None if saved is None else (saved * g).to(dtype) for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, *[None] * 8)


def chunked_head_losses(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
                        w_lm: float = 1.0, w_logit: float = 0.0, teacher: Optional[TeacherLogits] = None,
                        top: Optional[TopK] = None, temperature: float = 1.0, vocab: Optional[int] = None,
                        chunk: int = 256) -> HeadLosses:
    """w_lm LM + w_logit KD of hidden states `h` [B, T, D] through the head (weight, bias), `chunk`
    tokens at a time; the KD teacher is `teacher` (live logits) or `top` (cached top-k). `vocab`:
    the teacher's and student's common vocabulary for KD (None: the head's rows). Equal to
    lm_loss / logit_kd_loss / topk_kd_loss of distill.losses on the full logits."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if w_logit and (teacher is None) == (top is None):
        raise ValueError("logit KD needs either the teacher's logits or its cached top-k, not both")
    vocab = vocab or weight.shape[0]
    args = (float(w_lm), float(w_logit), teacher, top, float(temperature), vocab, chunk)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias)):
        total, lm, kd = _HeadLosses.apply(h, weight, bias, ids, *args)
    else:
        (lm, kd), _ = head_losses_chunks(h, weight, bias, ids, *args, with_grad=(False, False, False))
        total = w_lm * lm + w_logit * kd
    return HeadLosses(total, lm if w_lm else None, kd if w_logit else None)
