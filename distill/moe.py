"""Distillation with mixture-of-experts models.

- Teachers: nothing special. The Q/K/V hooks sit on the attention projections, which an MoE
  layer has like a dense one; the experts only change the MLP half of the layer.
- skip students keep the chosen teacher layers whole, MoE blocks included. Families whose
  config decides per layer index whether a layer is dense or MoE (Qwen-MoE `mlp_only_layers`
  / `decoder_sparse_step`, DeepSeek `first_k_dense_replace`) get that pattern re-indexed for
  the kept layers, so student layer s has the very block teacher layer layers[s] had.
- MoE students can add their router's load-balancing loss (Switch Transformer / Mixtral:
  transformers' `output_router_logits`, the model's `aux_loss`) with weight
  `distill.router_aux_weight`: None takes the student config's `router_aux_loss_coef`, the
  weight it was trained with, so KD does not silently drop the term that keeps routing
  balanced; 0 turns it off.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn
from transformers import PretrainedConfig

from engine.errors import ShrinkError


def sparse_layers(config: PretrainedConfig) -> Optional[list[bool]]:
    """Per decoder layer, whether the config makes it an MoE layer; None when the family does
    not decide it by index (every layer alike, or a dense model)."""
    n = config.num_hidden_layers
    if hasattr(config, "mlp_only_layers") and hasattr(config, "decoder_sparse_step"):
        step, dense = config.decoder_sparse_step or 1, set(config.mlp_only_layers or [])
        return [i not in dense and (config.num_experts or 0) > 0 and (i + 1) % step == 0 for i in range(n)]
    if getattr(config, "first_k_dense_replace", None) is not None:
        return [i >= config.first_k_dense_replace for i in range(n)]
    return None


def keep_sparse_pattern(config: PretrainedConfig, teacher: PretrainedConfig, layers: list[int]) -> None:
    """Set `config` (the student's, already len(layers) deep) so that its layer s is MoE
    exactly when teacher layer layers[s] is."""
    pattern = sparse_layers(teacher)
    if pattern is None:
        return
    kept = [pattern[t] for t in layers]
    if hasattr(config, "mlp_only_layers"):
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [s for s, sparse in enumerate(kept) if not sparse]
        return
    first_k = kept.index(True) if True in kept else len(kept)
    if any(not sparse for sparse in kept[first_k:]):
        raise ShrinkError(f"distill.student.layers: {config.model_type} keeps its dense layers first "
                          f"(first_k_dense_replace); teacher layers {layers} would put a dense layer after an MoE one")
    config.first_k_dense_replace = first_k


def has_router_loss(model: nn.Module) -> bool:
    """Whether the model's forward can return a router load-balancing `aux_loss`."""
    return hasattr(model.config, "output_router_logits") and hasattr(model.config, "router_aux_loss_coef")


def router_weight(distill: Any, student: nn.Module) -> float:
    """The weight of the router load-balancing term for this student (0: none)."""
    weight = getattr(distill, "router_aux_weight", None)
    if weight is None:
        return float(student.config.router_aux_loss_coef or 0.0) if has_router_loss(student) else 0.0
    if weight > 0 and not has_router_loss(student):
        raise ShrinkError(f"distill.router_aux_weight={weight}: the student ({student.config.model_type}) has no "
                          "router load-balancing loss (a dense model, or an MoE family transformers gives none)")
    return float(weight)
