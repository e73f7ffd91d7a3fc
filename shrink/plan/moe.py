"""`shrink plan` for mixture-of-experts models: which weights are routed experts, how many of
them one token uses, what one token costs, and how the experts spread over the GPUs.

- Weights are priced at the total parameter count (every expert is stored);
- active parameters = total - (E - k) / E of every routed-experts block, top-k from
  `num_experts_per_tok`; shared experts, routers, attention and dense layers (DeepSeek-V3's
  `first_k_dense_replace`) are always active because they are ordinary modules;
- FLOPs per token (one forward of a token at position `context`): 2 x the active weight
  matrices a token multiplies by (the input embedding is a lookup, not a product; a tied
  lm_head still counts) + 2 x layers x heads x context x (qk_head_dim + v_head_dim) for the
  attention scores and the weighted sum of values;
- KV cache per token and layer: K and V of every KV head, or for multi-head latent
  attention (DeepSeek-V2/V3: `kv_lora_rank`) the compressed latent plus the shared rotary key,
  kv_lora_rank + qk_rope_head_dim values, which is what MLA serving engines cache;
- expert-parallel layout (vLLM `--enable-expert-parallel` with tensor-parallel attention):
  each routed-experts block's E experts are split into N contiguous, near-equal ranges, one
  per GPU; the rest of the model (attention, shared experts, dense layers, embeddings) is
  sharded N ways; K/V heads are sharded too while there are at least N of them, and an MLA
  latent cache is replicated on every GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.errors import ShrinkError
from engine.experts import ExpertLayout, fused_parameters, read_layout


@dataclass(frozen=True)
class ExpertBlock:
    """One routed-experts module: E experts, each holding `params_per_expert` parameters."""
    name: str
    layout: ExpertLayout
    params: int

    @property
    def params_per_expert(self) -> int:
        return self.params // self.layout.num_experts


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_expert_blocks(model: nn.Module) -> dict[str, ExpertBlock]:
    """Every fused experts module (full name -> block), layouts read as transformers declares them."""
    blocks = {}
    for name, module in model.named_modules():
        if fused_parameters(module):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            blocks[name] = ExpertBlock(name, read_layout(module, name), params)
    return blocks


def top_k(config: Any) -> int:
    text = text_config(config)
    k = getattr(text, "num_experts_per_tok", None)
    if not k:
        raise ShrinkError("model.path: a mixture-of-experts config without num_experts_per_tok (experts per token)")
    return int(k)


def active_params(total: int, blocks: dict[str, ExpertBlock], k: int) -> int:
    inactive = sum(b.params_per_expert * max(b.layout.num_experts - k, 0) for b in blocks.values())
    return total - inactive


def kv_values_per_token_layer(config: Any, kv_heads: int, head_dim: int) -> tuple[int, str]:
    """(cached values per token per layer, what they are)."""
    text = text_config(config)
    rank = getattr(text, "kv_lora_rank", None)
    if rank:
        rope = getattr(text, "qk_rope_head_dim", 0) or 0
        return rank + rope, f"MLA latent: kv_lora_rank {rank} + qk_rope_head_dim {rope}"
    return 2 * kv_heads * head_dim, f"K and V: 2 x {kv_heads} KV heads x {head_dim}"


def flops_per_token(model: nn.Module, config: Any, blocks: dict[str, ExpertBlock], k: int, context: int) -> int:
    """Forward FLOPs of one token at position `context` (see the module docstring)."""
    text = text_config(config)
    seen, matrices = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.ndim >= 2:
            seen.add(id(p))
            matrices += p.numel()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:  # a tied head multiplies by the embedding
        matrices -= embedding.numel()
    matrices -= sum(b.params_per_expert * max(b.layout.num_experts - k, 0) for b in blocks.values())
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    qk = getattr(text, "qk_head_dim", None) or head_dim
    v = getattr(text, "v_head_dim", None) or head_dim
    return 2 * matrices + 2 * text.num_hidden_layers * heads * context * (qk + v)


def expert_ranges(num_experts: int, gpus: int) -> list[tuple[int, int]]:
    """[start, stop) expert indices per GPU: contiguous, sizes differing by at most one."""
    return [(d * num_experts // gpus, (d + 1) * num_experts // gpus) for d in range(gpus)]


def expert_parallel(blocks: dict[str, ExpertBlock], expert_bytes: dict[str, int], weights_bytes: int,
                    kv_bytes: int, kv_heads: int, mla: bool, gpus: int, usable: int) -> dict[str, Any]:
    """Per-GPU bytes of the expert-parallel layout, and which experts each GPU holds.

    expert_bytes: bytes of each block as the stage stores it; weights_bytes: the whole model's."""
    ranges = {name: expert_ranges(b.layout.num_experts, gpus) for name, b in blocks.items()}
    other = weights_bytes - sum(expert_bytes.values())
    kv_share = kv_bytes if mla or kv_heads < gpus else kv_bytes // gpus
    devices = []
    for d in range(gpus):
        mine = sum(expert_bytes[n] * (r[d][1] - r[d][0]) // blocks[n].layout.num_experts for n, r in ranges.items())
        counts = sorted({r[d][1] - r[d][0] for r in ranges.values()})
        devices.append({"device": d, "experts_per_block": counts[0] if len(counts) == 1 else counts,
                        "expert_bytes": mine, "sharded_bytes": -(-other // gpus), "kv_bytes": kv_share,
                        "total_bytes": mine + -(-other // gpus) + kv_share})
    return {"blocks": len(blocks), "devices": devices,
            "fits": max(d["total_bytes"] for d in devices) <= usable,
            "placement": {n: [list(x) for x in r] for n, r in ranges.items()}}
