"""From the distill config to a training plan: loss terms, weights and the phases.

- joint (AKT, Yuan 1.0): one phase of `steps` in which every mapped layer pair is guided
  at once: Loss = w_lm LM + w_logit KD + sum_l w_l AKT_l, all parameters trained.
- progressive (layer-by-layer knowledge transfer, MobileBERT-style): one phase of
  `progressive_steps` per mapped pair in order, each with that pair's AKT term only and
  only the parameters between the previous mapped layer's Q/K/V and this one's trainable
  (plus the embeddings in the first), then the joint phase. It costs (pairs x
  progressive_steps) more steps, which is the cost the comparison measures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from distill.capture import find_qkv
from distill.config import RANGES
from distill.layer_map import akt_layer_weights
from distill.losses import valid_parts
from distill.moe import router_weight
from engine.config import check_ranges
from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers

TERMS = ("akt", "logits", "lm")
SCHEDULES = ("joint", "progressive")
PRECISIONS = ("auto", "bf16", "fp32")
KERNELS = ("blockwise", "naive")


@dataclass
class Objective:
    lm: float = 0.0
    logit: float = 0.0
    akt: dict[int, float] = field(default_factory=dict)  # student layer -> w_l
    router: float = 0.0  # MoE student's router load-balancing loss (aux_loss)


@dataclass
class Phase:
    name: str
    steps: int
    objective: Objective
    trainable: Optional[frozenset[str]] = None  # parameter names trained (None: all)


@dataclass
class TrainPlan:
    pairs: dict[int, int]  # student layer -> teacher layer
    phases: list[Phase]

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> tuple[int, int]:
        """(phase index, step within the phase) of a global step."""
        for i, phase in enumerate(self.phases):
            if step < phase.steps:
                return i, step
            step -= phase.steps
        raise IndexError(step)


def parse_loss(loss: str) -> set[str]:
    """'akt' means Yuan's AKT + logit KD; otherwise '+'-joined terms from TERMS."""
    terms = {"akt", "logits"} if loss == "akt" else {t.strip() for t in str(loss).split("+")}
    unknown = terms - set(TERMS)
    if unknown or not terms:
        raise ShrinkError(f"distill.loss: {loss!r}: unknown term {sorted(unknown)[0] if unknown else ''!r} "
                          "(akt | logits | lm, joined with '+', e.g. akt+logits+lm)")
    return terms


def check_distill_config(distill: Any) -> None:
    """The checks that need no model: run before anything is loaded or written."""
    from distill.student import check_init
    from distill.teacher import teacher_device_map

    check_init(distill.student)
    parse_loss(distill.loss)
    if distill.schedule not in SCHEDULES:
        raise ShrinkError(f"distill.schedule: unknown schedule {distill.schedule!r} ({' | '.join(SCHEDULES)})")
    check_ranges(distill, "distill", RANGES)
    if distill.precision not in PRECISIONS:
        raise ShrinkError(f"distill.precision: unknown precision {distill.precision!r} ({' | '.join(PRECISIONS)})")
    if not valid_parts(str(distill.relations)):
        raise ShrinkError(f"distill.relations={distill.relations!r}: name each of q, k, v at most once "
                          "(e.g. qkv, v, kv)")
    if distill.kernels not in KERNELS:
        raise ShrinkError(f"distill.kernels: unknown kernels {distill.kernels!r} ({' | '.join(KERNELS)})")
    teacher_device_map(distill.teacher.device_map)  # a device_map.json file: present and well formed


def joint_objective(distill: Any, pairs: list[tuple[int, int]]) -> Objective:
    terms = parse_loss(distill.loss)
    weights = distill.weights
    akt = (dict(zip([s for s, _ in pairs], akt_layer_weights(pairs, weights.akt, weights.layers)))
           if "akt" in terms else {})
    objective = Objective(lm=weights.lm if "lm" in terms else 0.0, logit=weights.logit if "logits" in terms else 0.0,
                          akt={s: v for s, v in akt.items() if v > 0})
    if not (objective.lm or objective.logit or objective.akt):
        raise ShrinkError(f"distill.weights: every term of distill.loss={distill.loss!r} has weight 0")
    return objective


def make_train_plan(distill: Any, pairs: list[tuple[int, int]], student: nn.Module) -> TrainPlan:
    joint = joint_objective(distill, pairs)
    joint.router = router_weight(distill, student)
    phases = [Phase("joint", distill.steps, joint)]
    if distill.schedule == "progressive":
        if not joint.akt:
            raise ShrinkError("distill.schedule=progressive transfers layer by layer: distill.loss must include akt")
        per_layer = distill.progressive_steps if distill.progressive_steps is not None else distill.steps
        layers = sorted(joint.akt)
        order = execution_order(student)
        phases = [Phase(f"layer{s}", per_layer, Objective(akt={s: joint.akt[s]}),
                        trainable_between(student, order, layers[i - 1] if i else None, s))
                  for i, s in enumerate(layers)] + phases
    return TrainPlan(dict(pairs), [p for p in phases if p.steps > 0])


def trainable_between(student: nn.Module, order: list[str], previous: Optional[int], layer: int) -> frozenset[str]:
    """Exactly the parameters that move layer `layer`'s Q/K/V but not `previous`'s: those of
    the modules a forward pass runs (`order`, from execution_order) after `previous`'s Q/K/V
    projections (from the start when there is none) up to and including `layer`'s. So the
    final norm, the LM head and `layer`'s attention output and MLP stay frozen: they get no
    gradient from the phase's loss, and a frozen parameter cannot drift through optimizer
    momentum or weight decay."""
    prefix, blocks = find_decoder_layers(student)

    def last_qkv(i: int) -> int:
        names = {f"{prefix}.{i}.{n}" for n in find_qkv(blocks[i], student.config).names}
        return max(k for k, name in enumerate(order) if name in names)

    first = last_qkv(previous) + 1 if previous is not None else 0
    modules = set(order[first:last_qkv(layer) + 1])
    return frozenset(name for name, _ in student.named_parameters() if name.rpartition(".")[0] in modules)


def execution_order(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, in the order one forward pass first runs them."""
    order: dict[str, None] = {}
    owners = [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.setdefault(name)) for name, m in owners]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return list(order)
