"""The shared teachers in the layouts of two families the tests do not build (issue 31): Phi-3
(one fused qkv_proj, one fused gate_up_proj per layer) from llama-teacher, and Qwen2-MoE
(`mlp.gate` router, Qwen-style expert names, attention biases, a shared expert and its gate)
from moe-teacher. The weights are the trained ones, moved, not retrained: q/k/v and gate/up are
stacked as the target family reads them, the attention biases and the shared expert are zero
(so the shared expert adds 0), and the router renormalises its top-k as Mixtral's does. Each
converted model computes the same function as its source (its dense perplexity is the source's,
checked when built), so what differs is what quantization sees: other matrices (a fused
[q; k; v] of 640 rows quantized as one Linear), other module names, other expert plumbing.

    python -m benchmarks.families     # builds both under ~/.cache/shrink/families/ (seconds)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from benchmarks.common import SHARED
from engine.files import atomic_folder

CACHE = Path(os.environ.get("SHRINK_FAMILIES", Path.home() / ".cache" / "shrink" / "families"))
SOURCES = {"phi3-teacher": "llama-teacher", "qwen2moe-teacher": "moe-teacher"}
log = logging.getLogger(__name__)


def family_model(name: str) -> Path:
    """The converted model's folder (built on first use)."""
    folder = CACHE / name
    if not (folder / "config.json").is_file():
        build(name, folder)
    return folder


def build(name: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir = SHARED / "models" / SOURCES[name]
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    target = (phi3 if name == "phi3-teacher" else qwen2_moe)(source)
    check_same_function(source, target, name)
    with atomic_folder(folder, replace=True) as tmp:  # a killed build leaves no folder to take for built
        target.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source_dir).save_pretrained(tmp)
    log.info("built %s from %s in %s", name, SOURCES[name], folder)


def _common(c) -> dict:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "rope_parameters")
    return {k: getattr(c, k) for k in keys}


def phi3(source):
    from transformers import Phi3Config, Phi3ForCausalLM

    c = source.config
    config = Phi3Config(**_common(c), intermediate_size=c.intermediate_size, original_max_position_embeddings=
                        c.max_position_embeddings, partial_rotary_factor=1.0, sliding_window=None, resid_pdrop=0.0,
                        embd_pdrop=0.0, attention_dropout=0.0)
    target = Phi3ForCausalLM(config).eval()
    state = {}
    for key, value in source.state_dict().items():
        if ".self_attn.q_proj." in key:
            base = key.replace(".q_proj.", ".{}.")
            state[key.replace("q_proj", "qkv_proj")] = torch.cat(
                [source.state_dict()[base.format(p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif ".mlp.gate_proj." in key:
            state[key.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [value, source.state_dict()[key.replace("gate_proj", "up_proj")]])
        elif not any(p in key for p in (".k_proj.", ".v_proj.", ".up_proj.")):
            state[key] = value
    _load(target, state)
    return target


def qwen2_moe(source, renormalize: bool = True):
    """`renormalize=False`: Qwen2-MoE's own routing (top-k weights not renormalized, as llama.cpp's
    qwen2moe graph computes it): a close but not the same function as the Mixtral source."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = source.config
    config = Qwen2MoeConfig(**_common(c), intermediate_size=c.intermediate_size, moe_intermediate_size=
                            c.intermediate_size, num_experts=c.num_local_experts,
                            num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=renormalize,
                            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                            qkv_bias=True, use_sliding_window=False, attention_dropout=0.0)
    target = Qwen2MoeForCausalLM(config).eval()
    state = {}
    for key, value in source.state_dict().items():
        state[key.replace("block_sparse_moe.", "mlp.")] = value
    for key, value in target.state_dict().items():  # q/k/v biases, the shared expert and its gate: zero
        if key not in state:
            state[key] = torch.zeros_like(value)
    _load(target, state)
    return target


def _load(target, state: dict) -> None:
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and target.config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if target.config.tie_word_embeddings:
        target.tie_weights()


def check_same_function(source, target, name: str) -> None:
    ids = torch.randint(0, source.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = source(input_ids=ids).logits, target(input_ids=ids).logits
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"{name}: the converted model does not compute its source's function "
                         f"(max logit difference {float((a - b).abs().max()):.3g})")


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    for name in SOURCES:
        print(name, family_model(name))


if __name__ == "__main__":
    main()
