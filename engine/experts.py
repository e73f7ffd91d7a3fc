"""Mixture-of-experts weights as ordinary Linears: split fused 3-D experts, fuse them back.

transformers (5.x) stores the experts of one MoE block as 3-D parameters (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]; transposed, interleaved or with biases for some
families). Their layout is never guessed: `use_experts_implementation` records it on every
instance (is_transposed, has_bias, is_concatenated, has_gate, has_post_expert_norm) and
the shapes are checked against the block's own sizes. `split_experts` replaces such a
module by `SplitExperts`, a ModuleList of per-expert Linears named as the family's
checkpoints name them on disk (Mixtral `w1/w3/w2`, Qwen-MoE `gate_proj/up_proj/down_proj`,
read from transformers' conversion mapping), whose forward computes exactly what the fused
one does. Every stage then sees each expert as ordinary Linears: Hessians from the tokens
routed to it, GPTQ/SparseGPT, QuantLinear swap, GPTQ export under the on-disk names.
`fuse_experts` puts dense weights back into the fused layout before a plain save.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from engine.errors import ShrinkError

log = logging.getLogger(__name__)

LAYOUT_FLAGS = ("is_transposed", "has_bias", "is_concatenated", "has_gate")
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    transposed: bool  # stored [E, in, out] instead of [E, out, in]
    bias: bool
    concatenated: bool  # gate_up rows [gate; up] (True) or interleaved [g0, u0, g1, u1, ...]
    gate: bool  # gate_up_proj (gated) or up_proj only
    num_experts: int
    hidden: int
    intermediate: int


def fused_parameters(module: nn.Module) -> list[str]:
    """Names of the 3-D expert parameters directly on module (empty: not fused experts)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.ndim == 3]


def read_layout(module: nn.Module, name: str) -> ExpertLayout:
    """The fused experts' layout as transformers declares it, checked against the shapes."""
    cls = type(module).__name__
    missing = [f for f in LAYOUT_FLAGS if not hasattr(module, f)]
    if missing:
        raise ShrinkError(f"{name}: {cls} holds 3-D expert weights {fused_parameters(module)} but does not declare "
                          f"their layout (no {', '.join(missing)}: not a use_experts_implementation class)")
    if getattr(module, "has_post_expert_norm", False):
        raise ShrinkError(f"{name}: {cls} applies a norm after each expert; splitting it is not supported")
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    params = dict(module.named_parameters(recurse=False))
    if up_name not in params or "down_proj" not in params:
        raise ShrinkError(f"{name}: {cls} has 3-D weights {sorted(params)}, expected {up_name} and down_proj")
    up, down = params[up_name], params["down_proj"]
    if module.is_transposed:
        E, H, up_out = up.shape
        I = down.shape[1]
        expected_down = (E, I, H)
    else:
        E, up_out, H = up.shape
        I = down.shape[2]
        expected_down = (E, H, I)
    factor = 2 if module.has_gate else 1
    hidden = getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None) or H
    n_experts = getattr(module, "num_experts", E)
    if up_out != factor * I or tuple(down.shape) != expected_down or H != hidden or E != n_experts:
        raise ShrinkError(f"{name}: {cls} shapes {up_name} {tuple(up.shape)}, down_proj {tuple(down.shape)} do not "
                          f"match its declared layout (transposed={module.is_transposed}, {E} experts, hidden {hidden})")
    if module.has_bias and not {f"{up_name}_bias", "down_proj_bias"} <= set(params):
        raise ShrinkError(f"{name}: {cls} declares has_bias but has no {up_name}_bias/down_proj_bias")
    return ExpertLayout(bool(module.is_transposed), bool(module.has_bias), bool(module.is_concatenated),
                        bool(module.has_gate), E, H, I)


def disk_names(model: nn.Module) -> tuple[tuple[str, str, str], list[tuple[str, str]]]:
    """(gate, up, down) child names of one expert as the family's checkpoints store them,
    and the key renamings (on-disk pattern, in-memory pattern), from transformers'
    conversion mapping; Qwen-MoE style names when the family has none."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(getattr(model.config, "model_type", None)) or []
    names = list(DEFAULT_NAMES)
    renames: list[tuple[str, str]] = []
    for t in mapping:
        sources = [t.source_patterns] if isinstance(t.source_patterns, str) else list(t.source_patterns)
        targets = [t.target_patterns] if isinstance(t.target_patterns, str) else list(t.target_patterns)
        kind = type(t).__name__
        if kind == "WeightRenaming" and len(sources) == 1 and len(targets) == 1 and re.escape(sources[0]) == sources[0].replace(".", r"\."):
            renames.append((sources[0], targets[0]))
            continue
        children = [m.group(1) for s in sources if (m := re.search(r"experts\.\*\.(\w+)\.weight$", s))]
        if kind == "WeightConverter" and len(children) == len(sources):
            if targets[0].endswith("gate_up_proj") and len(children) == 2:
                names[0], names[1] = children
            elif targets[0].endswith("down_proj") and len(children) == 1:
                names[2] = children[0]
    return (names[0], names[1], names[2]), renames


# the (gate, up, down) role of the per-expert child names checkpoints use: Qwen-MoE / DeepSeek
# style and Mixtral's; other tools write either whatever the family's own is (AutoRound and
# gptqmodel unfuse transformers 5's fused experts under the Qwen-style names, even for Mixtral)
EXPERT_ROLES = {"gate_proj": 0, "up_proj": 1, "down_proj": 2, "w1": 0, "w3": 1, "w2": 2}


def stored_names(keys: Iterable[str], suffix: str, default: tuple[str, str, str]) -> tuple[str, str, str]:
    """(gate, up, down) child names of the experts as a checkpoint's keys hold them (`suffix`: the
    tensor after the child's name, e.g. "qweight"); `default` where the keys name none of its own."""
    found = {m.group(1) for k in keys if (m := re.search(rf"\.experts\.\d+\.(\w+)\.{re.escape(suffix)}$", k))}
    if not found or found <= set(default):
        return default
    roles: dict[int, str] = {}
    for name in sorted(found):
        role = EXPERT_ROLES.get(name)
        if role is None or role in roles:
            raise ShrinkError(f"experts stored as {sorted(found)}: no single gate/up/down role for {name!r} "
                              f"(known: {', '.join(EXPERT_ROLES)})")
        roles[role] = name
    names = list(default)
    for role, name in roles.items():
        names[role] = name
    return names[0], names[1], names[2]


def to_disk_key(key: str, renames: list[tuple[str, str]]) -> str:
    for disk, memory in renames:
        key = key.replace(memory, disk)
    return key


def to_memory_key(key: str, renames: list[tuple[str, str]]) -> str:
    for disk, memory in renames:
        key = key.replace(disk, memory)
    return key


class Expert(nn.Module):
    """One expert's Linears (gate and up read the same input, down reads their product)."""

    def __init__(self, names: tuple[str, str, str], layout: ExpertLayout, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.names = names
        H, I, b = layout.hidden, layout.intermediate, layout.bias
        if layout.gate:
            setattr(self, names[0], nn.Linear(H, I, bias=b, device=device, dtype=dtype))
        setattr(self, names[1], nn.Linear(H, I, bias=b, device=device, dtype=dtype))
        setattr(self, names[2], nn.Linear(I, H, bias=b, device=device, dtype=dtype))

    def linear(self, role: int) -> nn.Module:
        return getattr(self, self.names[role])


class SplitExperts(nn.ModuleList):
    """Drop-in for a fused experts module: same call (hidden [T, H], top-k index, top-k weights),
    same result, one `Expert` of Linears per expert.

    While `count` is set, the tokens routed to each expert are added to `routed`. With
    `all_tokens` set, every expert runs on every token (so hooks on its Linears see all of
    them, for statistics) while the output still sums only the routed experts' results.
    """

    def __init__(self, fused: nn.Module, layout: ExpertLayout, names: tuple[str, str, str]) -> None:
        up = fused.gate_up_proj if layout.gate else fused.up_proj
        super().__init__([Expert(names, layout, up.device, up.dtype) for _ in range(layout.num_experts)])
        self.layout = layout
        self.count = False
        self.all_tokens = False
        self.register_buffer("routed", torch.zeros(layout.num_experts, dtype=torch.long), persistent=False)
        prefix = "gate_up_proj" if layout.gate else "up_proj"
        with torch.no_grad():
            for e, expert in enumerate(self):
                self._load(expert, fused, prefix, e)
        for n in fused_parameters(fused) + [f"{prefix}_bias", "down_proj_bias"]:
            fused._parameters.pop(n, None)
        self.__dict__["shell"] = fused  # keeps _apply_gate / act_fn; out of the module tree

    def _load(self, expert: Expert, fused: nn.Module, prefix: str, e: int) -> None:
        L = self.layout
        W = getattr(fused, prefix)[e]
        W = W.t() if L.transposed else W
        D = fused.down_proj[e].t() if L.transposed else fused.down_proj[e]
        bias = getattr(fused, f"{prefix}_bias")[e] if L.bias else None
        if L.gate:
            rows = (slice(0, L.intermediate), slice(L.intermediate, None)) if L.concatenated else (slice(0, None, 2), slice(1, None, 2))
            for role, sel in enumerate(rows):
                _assign(expert.linear(role), W[sel], bias[sel] if bias is not None else None)
        else:
            _assign(expert.linear(1), W, bias)
        _assign(expert.linear(2), D, fused.down_proj_bias[e] if L.bias else None)

    def expert_forward(self, expert: Expert, x: torch.Tensor) -> torch.Tensor:
        L, shell = self.layout, self.__dict__["shell"]
        up = expert.linear(1)(x)
        if L.gate:
            gate = expert.linear(0)(x)
            both = torch.cat([gate, up], -1) if L.concatenated else torch.stack([gate, up], -1).flatten(-2)
            h = shell._apply_gate(both)
        else:
            h = shell.act_fn(up)
        return expert.linear(2)(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        E = len(self)
        with torch.no_grad():
            # indices == E (expert-parallel sentinels) are dropped, as in transformers
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
            if self.count:
                self.routed += mask[:E].sum(dim=(1, 2)).to(self.routed.device)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            if self.all_tokens:
                y = self.expert_forward(expert, hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = self.expert_forward(expert, hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    def fuse(self) -> nn.Module:
        """The original fused module with these (dense) weights written back."""
        L, shell = self.layout, self.__dict__["shell"]
        prefix = "gate_up_proj" if L.gate else "up_proj"

        def stacked(role: int, bias: bool = False) -> torch.Tensor:
            mods = [expert.linear(role) for expert in self]
            return torch.stack([(m.bias if bias else m.weight).detach() for m in mods])

        if L.gate:
            g, u = stacked(0), stacked(1)
            W = torch.cat([g, u], 1) if L.concatenated else torch.stack([g, u], 2).flatten(1, 2)
        else:
            W = stacked(1)
        shell.register_parameter(prefix, nn.Parameter(W.transpose(1, 2).contiguous() if L.transposed else W, requires_grad=False))
        D = stacked(2)
        shell.register_parameter("down_proj", nn.Parameter(D.transpose(1, 2).contiguous() if L.transposed else D, requires_grad=False))
        if L.bias:
            if L.gate:
                gb, ub = stacked(0, True), stacked(1, True)
                B = torch.cat([gb, ub], 1) if L.concatenated else torch.stack([gb, ub], 2).flatten(1, 2)
            else:
                B = stacked(1, True)
            shell.register_parameter(f"{prefix}_bias", nn.Parameter(B, requires_grad=False))
            shell.register_parameter("down_proj_bias", nn.Parameter(stacked(2, True), requires_grad=False))
        return shell


def _assign(linear: nn.Linear, W: torch.Tensor, b: Optional[torch.Tensor]) -> None:
    if W.is_meta:
        return
    linear.weight.copy_(W)
    if b is not None:
        linear.bias.copy_(b)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def split_experts(model: nn.Module, names: Optional[tuple[str, str, str]] = None) -> int:
    """Replace every fused experts module by SplitExperts (in place) whose experts' Linears are
    called `names` (gate, up, down; default: the family's on-disk names); returns how many."""
    names = names or disk_names(model)[0]
    targets = [(n, m) for n, m in model.named_modules() if fused_parameters(m) and not isinstance(m, SplitExperts)]
    for name, module in targets:
        _set(model, name, SplitExperts(module, read_layout(module, name), names))
    if targets:
        log.info("split %d fused expert modules into per-expert Linears (%s/%s/%s)", len(targets), *names)
    return len(targets)


def fuse_experts(model: nn.Module) -> int:
    """Put every SplitExperts back into its fused module (dense Linears only); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, SplitExperts)]
    for name, module in targets:
        if any(not isinstance(lin, nn.Linear) for expert in module for lin in expert.children()):
            raise ShrinkError(f"{name}: quantized experts cannot be written back into a fused float layout")
        _set(model, name, module.fuse())
    return len(targets)


def split_modules(module: nn.Module) -> list[SplitExperts]:
    return [m for m in module.modules() if isinstance(m, SplitExperts)]
