"""Capture Q, K, V of chosen decoder layers with forward hooks on the attention projections.

SDPA and flash attention never materialize attention probabilities, and pre-RoPE Q/K are
what the projections produce, so the hooks sit on the projections themselves. The
projections are found from the model's structure (find_decoder_layers / find_linears)
and the config's head counts:
- separate q/k/v Linears (Llama, Qwen2, Mistral, OPT, Phi, ...), found by name;
- a fused projection (GPT-2 `c_attn`, GPT-NeoX / Bloom / Falcon `query_key_value`, Phi-3
  `qkv_proj`), split by its layout. The layout cannot be read off the shapes (a [q|k|v]
  concatenation and a per-head interleaving have the same size), so it is looked up by
  model type, and an unknown fused model is refused rather than split wrongly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from distill.losses import QKV
from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, find_linears

SEPARATE_NAMES = {"q": ("q_proj", "query", "wq", "q"), "k": ("k_proj", "key", "wk", "k"),
                  "v": ("v_proj", "value", "wv", "v")}
FUSED_NAMES = ("query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv")
# "contiguous": [q | k | v]; "grouped": per KV group [q_1 .. q_g, k, v] (GPT-NeoX and Bloom
# are the case g = 1, Falcon multi-query the case of one group).
FUSED_LAYOUTS = {"gpt2": "contiguous", "phi3": "contiguous", "gpt_bigcode": "contiguous",
                 "gpt_neox": "grouped", "bloom": "grouped", "falcon": "grouped"}


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


def attention_shape(config: Any) -> AttentionShape:
    """Head counts and head size from a transformers config (attribute_map covers n_head etc.)."""
    heads = int(config.num_attention_heads)
    kv = getattr(config, "num_key_value_heads", None)
    if getattr(config, "model_type", "") == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads, int(kv or heads), int(head_dim))


@dataclass(frozen=True)
class QKVProjections:
    """Where one layer's Q, K, V come from: three module names, or one fused module name."""

    names: tuple[str, ...]
    layout: str  # separate | contiguous | grouped
    shape: AttentionShape

    def split(self, outputs: list[torch.Tensor]) -> QKV:
        """The hooked outputs ([B, T, *]) as Q, K, V of widths q_width, kv_width, kv_width."""
        if self.layout == "separate":
            return QKV(*outputs)
        (fused,) = outputs
        s = self.shape
        if self.layout == "contiguous":
            return QKV(*fused.split([s.q_width, s.kv_width, s.kv_width], dim=-1))
        g = s.num_heads // s.num_kv_heads
        blocks = fused.unflatten(-1, (s.num_kv_heads, g + 2, s.head_dim))
        return QKV(blocks[..., :g, :].flatten(-3), blocks[..., g, :].flatten(-2), blocks[..., g + 1, :].flatten(-2))


def find_qkv(layer: nn.Module, config: Any) -> QKVProjections:
    """The Q/K/V projections of one decoder layer."""
    shape = attention_shape(config)
    linears = find_linears(layer)
    by_short = {name.rsplit(".", 1)[-1]: name for name in linears}
    separate = [next((by_short[n] for n in SEPARATE_NAMES[role] if n in by_short), None) for role in "qkv"]
    if all(separate):
        return QKVProjections(tuple(separate), "separate", shape)
    fused = next((by_short[n] for n in FUSED_NAMES if n in by_short), None)
    model_type = getattr(config, "model_type", "?")
    if fused is None:
        raise ShrinkError(f"distill: no Q/K/V projections found in a {model_type} decoder layer "
                          f"(Linears: {', '.join(linears)})")
    if model_type not in FUSED_LAYOUTS:
        raise ShrinkError(f"distill: {model_type} fuses Q/K/V in {fused!r} with an unknown layout "
                          f"(known: {', '.join(FUSED_LAYOUTS)})")
    return QKVProjections((fused,), FUSED_LAYOUTS[model_type], shape)


def head_input_module(model: nn.Module) -> Optional[nn.Module]:
    """The module whose output is the LM head's input: transformers' decoder (get_decoder; not
    base_model, since OPT's head reads its decoder's output, past its base model's forward)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def last_hidden(output: Any) -> Optional[torch.Tensor]:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    return hidden


class QKVCapture:
    """Context manager: while active, each forward of `model` records Q/K/V of `layers`, and
    with `final` the LM head's input (the base model's last hidden state, [B, T, D]).

    Outputs are kept as produced (in the autograd graph for a student, so the AKT loss
    reaches its weights); `pop(i)` hands over layer i's Q/K/V of the last forward,
    `pop_final()` the last hidden state.
    """

    def __init__(self, model: nn.Module, layers: list[int], final: bool = False) -> None:
        _, blocks = find_decoder_layers(model)
        missing = [i for i in layers if not 0 <= i < len(blocks)]
        if missing:
            raise ShrinkError(f"distill: layer {missing[0]} does not exist ({len(blocks)} decoder layers)")
        self.model = model
        self.projections = {i: find_qkv(blocks[i], model.config) for i in layers}
        self.blocks = blocks
        self.final = head_input_module(model) if final else None
        if final and self.final is None:
            raise ShrinkError(f"distill: {type(model).__name__} has no decoder to read the LM head's input from")
        self.outputs: dict[Any, Any] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "QKVCapture":
        for i, proj in self.projections.items():
            modules = dict(self.blocks[i].named_modules())
            for name in proj.names:
                self.handles.append(modules[name].register_forward_hook(self._hook(i, name)))
        if self.final is not None:
            def record_final(module: nn.Module, inputs: Any, output: Any) -> None:
                self.outputs["final"] = last_hidden(output)
            self.handles.append(self.final.register_forward_hook(record_final))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.outputs.clear()

    def _hook(self, layer: int, name: str):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.outputs.setdefault(layer, {})[name] = output
        return record

    def pop(self, layer: int) -> Optional[QKV]:
        recorded = self.outputs.pop(layer, None)
        if recorded is None:
            return None
        proj = self.projections[layer]
        return proj.split([recorded[name] for name in proj.names])

    def pop_final(self) -> Optional[torch.Tensor]:
        return self.outputs.pop("final", None)

    def clear(self) -> None:
        self.outputs.clear()


# config attributes of families whose logits are more than their head's output (Gemma 2/3
# soft-capping, Granite's logits_scaling, Cohere's logit_scale)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def head_reproduces_logits(model: nn.Module, device: torch.device) -> bool:
    """Whether the logits `model` returns are its LM head applied to the captured last hidden
    state, and it can skip computing them (logits_to_keep): then the loss terms may run the
    head on chunks of tokens themselves. Not so for a family that post-processes its logits,
    which then keeps the full logits: known by its config, or else by a forward on three
    tokens whose logits must equal the head's output bit for bit (a random model's tiny logits
    can pass through a soft-cap unchanged, hence the config as well)."""
    head = model.get_output_embeddings()
    configs = [model.config, getattr(model.config, "text_config", None)]
    if head is None or head_input_module(model) is None or \
            "logits_to_keep" not in inspect.signature(model.forward).parameters or \
            any(getattr(c, a, None) for c in configs if c is not None for a in LOGIT_TRANSFORMS):
        return False
    ids = torch.zeros(1, 3, dtype=torch.long, device=device)
    with torch.no_grad(), QKVCapture(model, [], final=True) as cap:
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = cap.pop_final()
        return hidden is not None and hidden.shape[:2] == ids.shape and torch.equal(head(hidden).float(),
                                                                                     logits.float())
