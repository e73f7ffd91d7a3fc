"""Q/K/V capture from the projections, checked against what SDPA actually receives.

SDPA gets Q/K after RoPE (a rotation of channel pairs, which keeps each head's norm) and
V untouched, so: captured V must equal SDPA's value exactly, and captured Q/K must have
SDPA's per-head, per-token norms. That checks the split of fused projections too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from distill.capture import QKVCapture, attention_shape, find_qkv, head_reproduces_logits
from distill.chunked import chunked_head_losses
from distill.losses import lm_loss
from engine.errors import ShrinkError
from tests.conftest import FAMILIES, MOE_FAMILIES, tiny_model
from tests.distill.helpers import tiny_llama


def heads(x: torch.Tensor, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """[B, T, n*d] -> [B, heads, T, d] repeated to SDPA's head count (GQA repeat_kv)."""
    B, T, _ = x.shape
    x = x.view(B, T, n, d).transpose(1, 2)
    return x.repeat_interleave(like.shape[1] // n, dim=1) if like.shape[1] != n else x


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "falcon", "qwen2", "mixtral", "qwen2_moe"])
def test_captured_qkv_match_what_sdpa_receives(family: str, monkeypatch) -> None:
    model = tiny_model(family)
    assert model.config._attn_implementation == "sdpa"
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), QKVCapture(model, [0, 1]) as capture:
        model(input_ids=ids, use_cache=False)
        captured = capture.pop(1)
        assert capture.pop(1) is None  # handed over once
    s = attention_shape(model.config)
    assert [a.shape[-1] for a in captured] == [s.q_width, s.kv_width, s.kv_width]
    q, k, v = seen[1]
    assert torch.equal(heads(captured.v, s.num_kv_heads, s.head_dim, v), v)
    for mine, theirs, n in ((captured.q, q, s.num_heads), (captured.k, k, s.num_kv_heads)):
        norms = heads(mine, n, s.head_dim, theirs).norm(dim=-1)
        assert torch.allclose(norms, theirs.norm(dim=-1), rtol=1e-4, atol=1e-5)


def test_gqa_llama_capture_keeps_kv_width_and_the_graph() -> None:
    model = tiny_llama(layers=2, heads=4, kv=2).train()
    with QKVCapture(model, [1]) as capture:
        model(input_ids=torch.randint(0, 100, (1, 7)), use_cache=False)
        qkv = capture.pop(1)
    assert [a.shape for a in qkv] == [(1, 7, 64), (1, 7, 32), (1, 7, 32)]
    sum(a.sum() for a in qkv).backward()
    assert model.model.layers[1].self_attn.k_proj.weight.grad is not None


def test_hooks_are_removed_and_missing_layers_refused() -> None:
    model = tiny_llama(layers=2)
    with QKVCapture(model, [0]):
        pass
    assert not model.model.layers[0].self_attn.q_proj._forward_hooks
    with pytest.raises(ShrinkError, match="layer 5 does not exist"):
        QKVCapture(model, [5])


def test_fused_projection_of_unknown_layout_is_refused() -> None:
    model = tiny_model("gpt_neox")
    config = model.config
    config.model_type = "mystery"
    with pytest.raises(ShrinkError, match="unknown layout"):
        find_qkv(model.gpt_neox.layers[0], config)


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_the_head_on_the_captured_hidden_state_gives_every_familys_lm_loss(family: str) -> None:
    """Chunked head terms read the LM head's input from the base model and skip the model's own
    logits (logits_to_keep=1): the same LM loss as the full logits, in every family."""
    model = tiny_model(family)
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    assert head_reproduces_logits(model, torch.device("cpu"))
    head = model.get_output_embeddings()
    with torch.no_grad(), QKVCapture(model, [], final=True) as capture:
        full = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        one = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        hidden = capture.pop_final()
    assert one.shape[1] == 1 and hidden.shape[:2] == ids.shape
    chunked = chunked_head_losses(hidden, head.weight, head.bias, ids, chunk=5).total
    assert torch.allclose(chunked, full, rtol=1e-5)


def test_a_head_whose_logits_are_post_processed_is_told_apart() -> None:
    config = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                                       final_logit_softcapping=30.0)
    torch.manual_seed(0)
    gemma = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert not head_reproduces_logits(gemma, torch.device("cpu"))  # soft-capped: tanh(z / c) c, by its config

    class Scaled(transformers.LlamaForCausalLM):  # a post-processing no config attribute names
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 0.5
            return out

    plain = tiny_llama(layers=2)
    scaled = Scaled(plain.config)
    scaled.load_state_dict(plain.state_dict())
    assert head_reproduces_logits(plain.eval(), torch.device("cpu"))
    assert not head_reproduces_logits(scaled.eval(), torch.device("cpu"))  # by the forward on three tokens
