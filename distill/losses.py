"""Loss kernels in the papers' notation: pure torch functions, no model knowledge.

AKT (Yuan 1.0) transfers attention knowledge on Q, K and V. Teacher and student widths
differ, so the transferred quantity is width-independent: MiniLMv2's self-attention
relations. For A in {Q, K, V} of one layer, [B, T, D] with all heads concatenated, split
D into R relation heads of d_r = D / R channels and form

    rel(A)_r = softmax(A_r A_r^T / sqrt(d_r))        (a [T, T] distribution per row)

The loss is KL(rel_teacher || rel_student) averaged over relation heads and rows, summed
over Q, K and V (or the subset `parts` names). R is the same for teacher and student; D may differ (so may head counts
and the K/V width of grouped-query attention), since only the [T, T] relations meet.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from distill.blockwise import blockwise_relation_kl


class QKV(NamedTuple):
    """Projected queries, keys and values of one layer, each [B, T, heads * head_dim]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def relation_logits(A: torch.Tensor, relation_heads: int, causal: bool = True) -> torch.Tensor:
    """A_r A_r^T / sqrt(d_r) for each relation head r: [B, T, D] -> [B, R, T, T] in fp32.

    With `causal`, a token's relations to later tokens are masked: a causal LM never
    attends forward, so those entries carry nothing the student should imitate.
    """
    B, T, D = A.shape
    if D % relation_heads:
        raise ValueError(f"width {D} is not divisible by {relation_heads} relation heads")
    d_r = D // relation_heads
    A = A.float().reshape(B, T, relation_heads, d_r).transpose(1, 2)
    scores = A @ A.transpose(-1, -2) / math.sqrt(d_r)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=A.device).triu(1)
        # a finite minimum, not -inf: softmax gives exact zeros and KL terms stay 0 * finite
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    return scores


def relation_kl(teacher: torch.Tensor, student: torch.Tensor, relation_heads: int, causal: bool = True) -> torch.Tensor:
    """KL(rel(teacher) || rel(student)), mean over batch, relation heads and rows."""
    log_t = F.log_softmax(relation_logits(teacher, relation_heads, causal), dim=-1)
    log_s = F.log_softmax(relation_logits(student, relation_heads, causal), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def valid_parts(parts: str) -> bool:
    """Whether `parts` names a non-empty subset of q, k, v, each at most once."""
    return bool(parts) and not set(parts) - set("qkv") and len(set(parts)) == len(parts)


def qkv_relation_loss(teacher: QKV, student: QKV, relation_heads: int, causal: bool = True,
                      parts: str = "qkv", block: Optional[int] = None) -> torch.Tensor:
    """AKT loss of one mapped layer pair: sum over Q, K, V (those named in `parts`) of the
    relation KL (MiniLMv2). With `block`, each KL is formed `block` rows at a time
    (distill/blockwise.py: the same value in memory linear in T); without, whole (the reference)."""
    if not valid_parts(parts):
        raise ValueError(f"parts must name each of q, k, v at most once, got {parts!r}")
    if block is None:
        return sum(relation_kl(teacher[i], student[i], relation_heads, causal) for i in map("qkv".index, parts))
    return sum(blockwise_relation_kl(teacher[i], student[i], relation_heads, causal, block)
               for i in map("qkv".index, parts))


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over the vocabulary, mean over tokens.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.).
    """
    V = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def topk_kd_loss(student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Logit KD against a cached top-k teacher: the teacher's distribution renormalized over
    its k largest logits, KL against the student's full-vocabulary softmax at those ids."""
    V = student_logits.shape[-1]
    k = top_values.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    log_s = log_s.gather(-1, top_indices.reshape(-1, k).long())
    log_t = F.log_softmax(top_values.float().reshape(-1, k) / temperature, dim=-1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over every predicted token (fp32)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), input_ids[:, 1:].reshape(-1))
