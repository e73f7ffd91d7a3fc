"""`width` student init: Minitron-style structured pruning of the teacher.

Importance comes from activations on calibration data (Minitron, Muralidharan et al. 2024):
- embedding channel: mean |x| of the normalized inputs of the attention and MLP input
  projections, summed over the kept layers;
- attention head: mean L2 norm of the head's output (the input of the attention output
  projection); with grouped-query attention a KV group scores the sum of its query heads,
  the best groups are kept and, inside each, the best query heads;
- MLP neuron: mean |activation| at the input of the MLP output projection.
The kept rows/columns are copied into a student of the smaller shape. Roles of the
Linears are read from their shapes, so any model with separate q/k/v projections and a
two-level MLP (Llama, Qwen2, Mistral, Phi, ...) works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.capture import AttentionShape, attention_shape, find_qkv
from distill.config import StudentConfig
from distill.architecture import student_config
from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, find_linears, weight_matrix


@dataclass
class LayerRoles:
    q: str
    k: str
    v: str
    attn_out: str
    mlp_in: list[str]
    mlp_out: str


def layer_roles(layer: nn.Module, config: Any) -> LayerRoles:
    """Name the Linears of one decoder layer by their shapes ([out, in])."""
    qkv = find_qkv(layer, config)
    if qkv.layout != "separate":
        raise ShrinkError(f"distill.student.init=width: {config.model_type} fuses Q/K/V; width pruning "
                          "needs separate q/k/v projections")
    hidden, inter, q_width = config.hidden_size, getattr(config, "intermediate_size", None), qkv.shape.q_width
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in find_linears(layer).items() if n not in qkv.names}
    attn_out = [n for n, s in shapes.items() if s == (hidden, q_width)]
    mlp_in = [n for n, s in shapes.items() if s == (inter, hidden)]
    mlp_out = [n for n, s in shapes.items() if s == (hidden, inter)]
    if inter is None or len(attn_out) != 1 or len(mlp_out) != 1 or not mlp_in or inter == q_width:
        raise ShrinkError(f"distill.student.init=width: cannot tell the attention output and MLP projections "
                          f"of a {config.model_type} layer apart by shape ({shapes})")
    return LayerRoles(*qkv.names, attn_out[0], mlp_in, mlp_out[0])


@torch.no_grad()
def importance(teacher: PreTrainedModel, layers: list[int], windows: torch.Tensor,
               batch_size: int = 4) -> dict[str, Any]:
    """Activation importance: hidden [H], heads {layer: [n_q]}, neurons {layer: [I]}."""
    _, blocks = find_decoder_layers(teacher)
    shape = attention_shape(teacher.config)
    device = next(teacher.parameters()).device
    hidden = torch.zeros(teacher.config.hidden_size, dtype=torch.float64)
    heads = {i: torch.zeros(shape.num_heads, dtype=torch.float64) for i in layers}
    neurons = {i: torch.zeros(teacher.config.intermediate_size, dtype=torch.float64) for i in layers}

    def hook(kind: str, layer: int):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            x = inputs[0].detach().double().flatten(0, -2)
            if kind == "hidden":
                hidden.add_(x.abs().sum(0).cpu())
            elif kind == "heads":
                heads[layer].add_(x.unflatten(-1, (shape.num_heads, shape.head_dim)).norm(dim=-1).sum(0).cpu())
            else:
                neurons[layer].add_(x.abs().sum(0).cpu())
        return record

    handles = []
    for i in layers:
        roles = layer_roles(blocks[i], teacher.config)
        modules = dict(blocks[i].named_modules())
        for name, kind in [(roles.q, "hidden"), (roles.mlp_in[0], "hidden"), (roles.attn_out, "heads"),
                           (roles.mlp_out, "neurons")]:
            handles.append(modules[name].register_forward_hook(hook(kind, i)))
    try:
        for start in range(0, windows.shape[0], batch_size):
            teacher(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {"hidden": hidden, "heads": heads, "neurons": neurons}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (keeps head/group order)."""
    return scores.topk(k).indices.sort().values


def keep_heads(scores: torch.Tensor, t: AttentionShape, s: AttentionShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept query heads and KV heads: best KV groups, then the best query heads of each."""
    g_t, g_s = t.num_heads // t.num_kv_heads, s.num_heads // s.num_kv_heads
    if s.num_kv_heads > t.num_kv_heads or g_s > g_t:
        raise ShrinkError(f"distill.student: {s.num_heads}/{s.num_kv_heads} heads cannot be cut from the teacher's "
                          f"{t.num_heads}/{t.num_kv_heads} (kv heads and queries per kv head may only shrink)")
    groups = scores.view(t.num_kv_heads, g_t)
    kv = top(groups.sum(-1), s.num_kv_heads)
    q = torch.cat([g * g_t + top(groups[g], g_s) for g in kv.tolist()])
    return q, kv


def channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def width_student(teacher: PreTrainedModel, student_cfg: StudentConfig, layers: list[int],
                  windows: torch.Tensor) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Prune the teacher's kept `layers` to the student's width and copy the kept weights."""
    config = student_config(teacher.config, student_cfg, layers)
    t_shape, s_shape = attention_shape(teacher.config), attention_shape(config)
    if s_shape.head_dim != t_shape.head_dim:
        raise ShrinkError("distill.student: width pruning keeps the teacher's head_dim; choose num_heads accordingly")
    if config.hidden_size > teacher.config.hidden_size or config.intermediate_size > teacher.config.intermediate_size:
        raise ShrinkError("distill.student: width pruning can only shrink hidden_size and intermediate_size")
    scores = importance(teacher, layers, windows)
    hid = top(scores["hidden"], config.hidden_size)
    prefix, blocks = find_decoder_layers(teacher)
    t_hidden = teacher.config.hidden_size
    source = teacher.state_dict()
    state: dict[str, torch.Tensor] = {}
    kept_heads = {}
    for new, old in enumerate(layers):
        q, kv = keep_heads(scores["heads"][old], t_shape, s_shape)
        kept_heads[old] = q.tolist()
        neu = top(scores["neurons"][old], config.intermediate_size)
        q_ch, kv_ch = channels(q, t_shape.head_dim), channels(kv, t_shape.head_dim)
        roles = layer_roles(blocks[old], teacher.config)
        rows_cols = {roles.q: (q_ch, hid), roles.k: (kv_ch, hid), roles.v: (kv_ch, hid),
                     roles.attn_out: (hid, q_ch), roles.mlp_out: (hid, neu), **{n: (neu, hid) for n in roles.mlp_in}}
        for name in blocks[old].state_dict():
            module = name.rpartition(".")[0]
            tensor = source[f"{prefix}.{old}.{name}"]
            state[f"{prefix}.{new}.{name}"] = slice_param(tensor, rows_cols.get(module), hid, t_hidden, name, True)
    for name, tensor in source.items():
        if not name.startswith(prefix + "."):
            state[name] = slice_param(tensor, None, hid, t_hidden, name, False)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.load_state_dict(state, strict=True)
    report = {"hidden_kept": hid.numel(), "heads_kept": kept_heads, "calib_windows": windows.shape[0]}
    return student, report


def slice_param(tensor: torch.Tensor, rows_cols: Any, hid: torch.Tensor, teacher_hidden: int, name: str,
                in_layer: bool) -> torch.Tensor:
    """A Linear's weight [out, in] by (rows, cols) and its bias by rows; anything else along
    its hidden-size dimension (norms; embeddings and head by column)."""
    if rows_cols is not None:
        rows, cols = rows_cols
        return tensor[rows][:, cols] if tensor.dim() == 2 else tensor[rows]
    if tensor.dim() == 1 and tensor.shape[0] == teacher_hidden:
        return tensor[hid]
    if not in_layer and tensor.dim() == 2 and tensor.shape[1] == teacher_hidden:
        return tensor[:, hid]
    if not in_layer and tensor.dim() == 1:
        return tensor  # e.g. a head bias over the vocabulary
    raise ShrinkError(f"distill.student.init=width: cannot cut {name} {tuple(tensor.shape)} to the student's width")
