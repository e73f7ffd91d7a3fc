"""The memory-linear kernels against the reference kernels of distill/losses.py: the relation KL
in row blocks (distill/blockwise.py) and the LM / logit KD terms through the head in token
chunks (distill/chunked.py): same values and gradients, and no tensor of size T^2 or T V."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.blockwise import blockwise_relation_kl
from distill.chunked import TopK, chunked_head_losses
from distill.losses import QKV, lm_loss, logit_kd_loss, qkv_relation_loss, relation_kl, topk_kd_loss


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


# (B, T, teacher width, student width, R, block): T a multiple of the block, not one, block > T, block 1
SHAPES = [(2, 37, 48, 32, 4, 8), (1, 64, 64, 96, 8, 16), (3, 20, 24, 24, 2, 64), (1, 9, 16, 32, 4, 1),
          (2, 50, 128, 64, 16, 7)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,T,d_t,d_s,R,block", SHAPES)
def test_blockwise_relation_kl_equals_the_reference(B: int, T: int, d_t: int, d_s: int, R: int, block: int,
                                                    causal: bool) -> None:
    teacher = rand(B, T, d_t, seed=T) * 2  # sharper relations than unit-variance ones
    student = (rand(B, T, d_s, seed=T + 1) * 2).requires_grad_()
    ref = relation_kl(teacher, student, R, causal)
    (g_ref,) = torch.autograd.grad(ref, student)
    new = blockwise_relation_kl(teacher, student, R, causal, block)
    (g_new,) = torch.autograd.grad(new, student)
    assert ref.item() > 0.01
    assert torch.allclose(new, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g_new, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


@pytest.mark.parametrize("causal", [True, False])
def test_blockwise_relation_kl_gradcheck_in_float64(causal: bool) -> None:
    teacher = rand(2, 7, 8, seed=1, dtype=torch.float64)
    student = rand(2, 7, 12, seed=2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: blockwise_relation_kl(teacher, s, 2, causal, 3), (student,))


def test_blockwise_relation_kl_keeps_the_teacher_out_of_autograd_and_runs_without_grad() -> None:
    teacher = rand(1, 12, 16, seed=3).requires_grad_()
    student = rand(1, 12, 16, seed=4).requires_grad_()
    blockwise_relation_kl(teacher, student, 4, True, 5).backward()
    assert teacher.grad is None and student.grad is not None
    with torch.no_grad():
        value = blockwise_relation_kl(teacher, student, 4, True, 5)
    assert not value.requires_grad and torch.allclose(value, relation_kl(teacher, student, 4), atol=1e-6)
    assert blockwise_relation_kl(student, student, 4, True, 5).abs().item() < 1e-6
    with pytest.raises(ValueError, match="block must be > 0"):
        blockwise_relation_kl(teacher, student, 4, True, 0)
    with pytest.raises(ValueError, match="not divisible"):
        blockwise_relation_kl(rand(1, 4, 30), rand(1, 4, 30), 8)


def test_qkv_relation_loss_with_blocks_is_the_reference_per_part() -> None:
    teacher = QKV(rand(2, 21, 64), rand(2, 21, 32, seed=1), rand(2, 21, 32, seed=2))
    student = QKV(*(rand(2, 21, w, seed=3 + i).requires_grad_() for i, w in enumerate((96, 32, 32))))
    for parts in ("qkv", "v", "kq"):
        ref = qkv_relation_loss(teacher, student, 4, parts=parts)
        g_ref = torch.autograd.grad(ref, [getattr(student, p) for p in parts])
        new = qkv_relation_loss(teacher, student, 4, parts=parts, block=8)
        g_new = torch.autograd.grad(new, [getattr(student, p) for p in parts])
        assert torch.allclose(new, ref, rtol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_new, g_ref))


def test_blockwise_relation_kl_holds_no_T_squared_tensor() -> None:
    B, T, D, R, block = 1, 256, 64, 4, 16
    teacher, student = rand(B, T, D), rand(B, T, D, seed=1).requires_grad_()
    with LargestTensor() as new:
        blockwise_relation_kl(teacher, student, R, True, block).backward()
    with LargestTensor() as ref:
        relation_kl(teacher, student, R).backward()
    assert ref.numel == B * R * T * T
    assert new.numel <= max(B * R * block * T, B * T * D)  # a block of relations, or A itself


def head_case(B: int = 2, T: int = 13, D: int = 16, V: int = 40, v: int = 35, seed: int = 0,
              dtype: torch.dtype = torch.float32):
    h = rand(B, T, D, seed=seed, dtype=dtype).requires_grad_()
    W = rand(V, D, seed=seed + 1, dtype=dtype).requires_grad_()
    b = rand(V, seed=seed + 2, dtype=dtype).requires_grad_()
    z_t = rand(B, T, D, seed=seed + 3, dtype=dtype) @ rand(v, D, seed=seed + 4, dtype=dtype).T
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return h, W, b, z_t, ids


@pytest.mark.parametrize("teacher_kind", ["live", "topk"])
@pytest.mark.parametrize("w_lm,w_logit,temperature,chunk", [(1.0, 1.0, 1.0, 5), (0.7, 1.3, 2.0, 7), (1.0, 0.0, 1.0, 4),
                                                            (0.0, 1.0, 0.5, 26), (0.3, 2.0, 1.0, 100)])
def test_chunked_head_losses_equal_the_reference(teacher_kind: str, w_lm: float, w_logit: float, temperature: float,
                                                 chunk: int) -> None:
    h, W, b, z_t, ids = head_case()
    v = z_t.shape[-1]
    z = h @ W.T + b  # the full logits the reference kernels need
    top = TopK(*z_t.topk(6, dim=-1)) if teacher_kind == "topk" else None
    kd = (topk_kd_loss(z[..., :v], top.values, top.indices, temperature) if top
          else logit_kd_loss(z[..., :v], z_t, temperature))
    lm = lm_loss(z, ids)
    ref = w_lm * lm + w_logit * kd
    g_ref = torch.autograd.grad(ref, (h, W, b))
    live = None if top else (lambda r0, r1: z_t.reshape(-1, v)[r0:r1])
    out = chunked_head_losses(h, W, b, ids, w_lm, w_logit, live, top, temperature, v, chunk)
    g_new = torch.autograd.grad(out.total, (h, W, b))
    assert torch.allclose(out.total, ref, rtol=1e-5)
    assert (out.lm is None) == (w_lm == 0) and (out.logit is None) == (w_logit == 0)
    if out.lm is not None:
        assert torch.allclose(out.lm, lm, rtol=1e-5) and not out.lm.requires_grad
    if out.logit is not None:
        assert torch.allclose(out.logit, kd, rtol=1e-5)
    for a, r in zip(g_new, g_ref):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_chunked_head_losses_gradcheck_in_float64() -> None:
    h, W, b, z_t, ids = head_case(B=1, T=6, D=4, V=9, v=7, dtype=torch.float64)
    live = lambda r0, r1: z_t.reshape(-1, 7)[r0:r1]  # noqa: E731
    assert torch.autograd.gradcheck(
        lambda h, W, b: chunked_head_losses(h, W, b, ids, 0.5, 1.0, live, None, 2.0, 7, 4).total, (h, W, b))
    top = TopK(*z_t.topk(3, dim=-1))
    assert torch.autograd.gradcheck(
        lambda h, W: chunked_head_losses(h, W, None, ids, 1.0, 1.0, None, top, 1.5, 7, 5).total, (h, W))


def test_chunked_head_losses_never_form_the_full_logits() -> None:
    B, T, D, V, chunk = 1, 128, 8, 300, 16
    h, W, b, _, ids = head_case(B, T, D, V, V)
    h_t, W_t = rand(B * T, D, seed=5), rand(V, D, seed=6)
    live = lambda r0, r1: h_t[r0:r1] @ W_t.T  # the teacher's head, a chunk at a time  # noqa: E731
    with LargestTensor() as new:
        chunked_head_losses(h, W, b, ids, 1.0, 1.0, live, None, 1.0, V, chunk).total.backward()
    assert new.numel <= max(chunk * V, W.numel())
    with torch.no_grad():
        value = chunked_head_losses(h, W, b, ids, 1.0, 1.0, live, None, 1.0, V, chunk)
    assert not value.total.requires_grad
    with pytest.raises(ValueError, match="chunk must be > 0"):
        chunked_head_losses(h, W, b, ids, chunk=0)
