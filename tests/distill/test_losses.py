"""The loss kernels: relation KL (AKT / MiniLMv2), logit KD, top-k KD, LM loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import QKV, lm_loss, logit_kd_loss, qkv_relation_loss, relation_kl, relation_logits, topk_kd_loss


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def widen(A: torch.Tensor, heads: int, factor: int, seed: int = 1) -> torch.Tensor:
    """A wider tensor with the very same relations: per relation head A_r @ M with
    M M^T = sqrt(factor) I, so (A_r M)(A_r M)^T / sqrt(factor d_r) = A_r A_r^T / sqrt(d_r)."""
    B, T, D = A.shape
    d = D // heads
    Q, _ = torch.linalg.qr(rand(d * factor, d, seed=seed))  # [d*factor, d], orthonormal columns
    M = Q.T * factor ** 0.25  # [d, d*factor], M M^T = sqrt(factor) I
    return (A.view(B, T, heads, d) @ M).reshape(B, T, heads * d * factor)


def test_identical_qkv_give_zero_loss() -> None:
    qkv = QKV(rand(2, 12, 64), rand(2, 12, 32, seed=1), rand(2, 12, 32, seed=2))
    for causal in (True, False):
        loss = qkv_relation_loss(qkv, qkv, relation_heads=4, causal=causal)
        assert loss.abs().item() < 1e-6


def test_relations_are_independent_of_width_and_heads() -> None:
    # teacher: 6 heads x 16 (Q) and 2 KV heads (GQA); student 3x wider Q, 2x wider K/V
    teacher = QKV(rand(2, 10, 96), rand(2, 10, 32, seed=1), rand(2, 10, 32, seed=2))
    student = QKV(widen(teacher.q, 4, 3), widen(teacher.k, 4, 2, seed=3), widen(teacher.v, 4, 2, seed=4))
    assert student.q.shape[-1] == 288 and student.k.shape[-1] == 64
    assert qkv_relation_loss(teacher, student, relation_heads=4).item() < 1e-5
    other = QKV(rand(2, 10, 288, seed=5), rand(2, 10, 64, seed=6), rand(2, 10, 64, seed=7))
    assert qkv_relation_loss(teacher, other, relation_heads=4).item() > 0.05


def test_gqa_widths_and_gradient_reach_the_student_only() -> None:
    teacher = QKV(rand(2, 8, 384), rand(2, 8, 128, seed=1), rand(2, 8, 128, seed=2))  # 6 q / 2 kv heads of 64
    student = QKV(*(rand(2, 8, w, seed=10 + i).requires_grad_() for i, w in enumerate((256, 64, 64))))  # 4 / 1
    loss = qkv_relation_loss(teacher, student, relation_heads=8)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for a in student:
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert all(not t.requires_grad for t in teacher)


def test_causal_relations_mask_the_future_and_match_a_hand_computation() -> None:
    A = rand(1, 5, 8)
    logits = relation_logits(A, relation_heads=2, causal=True)
    probs = logits.softmax(-1)
    assert torch.all(probs[..., 0, 1:] == 0) and torch.allclose(probs.sum(-1), torch.ones(1, 2, 5))
    # head 0 by hand: softmax over j <= i of <a_i, a_j> / sqrt(4)
    a = A[0, :, :4]
    i = 3
    expected = torch.softmax(a[i] @ a[: i + 1].T / 2.0, -1)
    assert torch.allclose(probs[0, 0, i, : i + 1], expected, atol=1e-6)
    # KL by hand for one pair of inputs
    B = rand(1, 5, 8, seed=3)
    p, q = relation_logits(A, 2).softmax(-1), relation_logits(B, 2).softmax(-1)
    mask = torch.ones(5, 5).tril().bool()
    kl = torch.where(mask, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), 0).sum(-1).mean()
    assert torch.allclose(relation_kl(A, B, 2), kl, atol=1e-6)


def test_relation_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        relation_logits(rand(1, 4, 30), relation_heads=8)


def test_logit_kd_matches_a_hand_computation() -> None:
    s = torch.tensor([[[1.0, 2.0, 0.5]]])
    t = torch.tensor([[[0.0, 3.0, 1.0]]])
    T = 2.0
    p = [math.exp(x / T) for x in (0.0, 3.0, 1.0)]
    p = [x / sum(p) for x in p]
    q = [math.exp(x / T) for x in (1.0, 2.0, 0.5)]
    q = [x / sum(q) for x in q]
    expected = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert logit_kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert logit_kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_kd_with_the_whole_vocabulary_is_the_full_kd() -> None:
    s, t = rand(2, 5, 11), rand(2, 5, 11, seed=1)
    top = t.topk(11, dim=-1)
    assert torch.allclose(topk_kd_loss(s, top.values, top.indices, 1.5), logit_kd_loss(s, t, 1.5), atol=1e-6)
    top3 = t.topk(3, dim=-1)
    assert topk_kd_loss(s, top3.values, top3.indices).item() > 0


def test_lm_loss_is_shifted_cross_entropy() -> None:
    logits, ids = rand(2, 6, 9), torch.randint(0, 9, (2, 6))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(logits, ids), expected)


def test_relation_parts_pick_the_terms_of_q_k_v() -> None:
    teacher = QKV(rand(2, 9, 64), rand(2, 9, 32, seed=1), rand(2, 9, 32, seed=2))
    student = QKV(rand(2, 9, 96, seed=3), rand(2, 9, 32, seed=4), rand(2, 9, 32, seed=5))
    each = {p: relation_kl(getattr(teacher, p), getattr(student, p), 4) for p in "qkv"}
    assert torch.allclose(qkv_relation_loss(teacher, student, 4, parts="v"), each["v"])
    assert torch.allclose(qkv_relation_loss(teacher, student, 4, parts="kv"), each["k"] + each["v"])
    full = qkv_relation_loss(teacher, student, 4)
    assert torch.allclose(full, sum(each.values()))
    assert torch.allclose(qkv_relation_loss(teacher, student, 4, parts="vqk"), full)
    for bad in ("", "qq", "qx", "Q"):
        with pytest.raises(ValueError, match="at most once"):
            qkv_relation_loss(teacher, student, 4, parts=bad)
