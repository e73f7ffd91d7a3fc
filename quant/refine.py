"""Block-output refinement of a GPTQ solution (AutoRound's idea: Cheng et al. 2023, "Optimize
Weight Rounding via Signed Gradient Descent for the Quantization of LLMs"; our own code).

GPTQ solves each Linear for its own output error. Once every Linear of a decoder layer is
solved, this tunes, for the whole layer at once, what GPTQ fixed per Linear: each weight's
rounding and each group's scale, to reproduce the full-precision layer's outputs (on the
full-precision model's inputs) from the compressed model's inputs (engine.calibration's
reference stream and after-layer hook). Each weight keeps the value W_pre GPTQ rounded it from,
and becomes

    Q = s c (clamp(round(W_pre / (s c) + V) + z, 0, maxq) - z)

with V in [-1/2, 1/2] (its rounding offset, 0 to start) and c in [CLIP_LOW, CLIP_HIGH] per group
and output row (its scale's factor, 1 to start): at the start Q is GPTQ's exactly. round passes
its gradient straight through (the gradients are written out in `Tunable`). Each step takes a few calibration windows, the mean squared error
of the layer's outputs, and moves every V and c by lr_t * sign(gradient) (signed gradient
descent, lr_t decaying linearly from lr to 0 over the steps). The result is new codes and scales
on the same grid layout (zero points and g_idx unchanged), packed as any GPTQ result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine.calibration import LayerOutputs
from engine.modeling import set_weight_matrix, weight_matrix
from quant.gptq import QuantResult

log = logging.getLogger(__name__)

CLIP_LOW, CLIP_HIGH = 0.5, 1.25  # how far a group's scale may shrink or grow from GPTQ's


@dataclass(frozen=True)
class RefineSettings:
    steps: int  # signed-gradient steps per decoder layer
    lr: float  # the first step's size (rounding offsets in code units; scale factors relative)
    windows: int  # calibration windows per step


class Tunable:
    """One quantized Linear under refinement: its GPTQ result, the offsets V [out, in] and scale
    factors c [out, n_groups] being tuned, and what every step reuses: each weight's group scale s0
    and its grid's ends relative to the zero point [out, in], X0 = W_pre / s0 (what GPTQ rounded,
    in code units), and the one-hot group matrix E [n_groups, in] (c E spreads a per-group factor
    over the group's columns).

    Forward: x = X0 / (c E) + V, q = clamp(round(x), -z, maxq - z), Q = s0 (c E) q. The step
    needs the gradients' signs only, from G = dLoss/dQ: round passes its gradient straight through
    and clamp only inside the grid (mask m), so dL/dV = G s0 (c E) m, whose sign is sign(G) m
    (scales are positive), and dL/dc = [G s0 (q - m X0 / (c E))] E^T, summed over each group."""

    def __init__(self, r: QuantResult, device: torch.device) -> None:
        self.r = r = replace(r, W_pre=r.W_pre.to(device), scale=r.scale.to(device), zero=r.zero.to(device),
                             g_idx=r.g_idx.to(device), codes=r.codes.to(device), Q=r.Q.to(device))
        g, dtype = r.g_idx.long(), r.W_pre.dtype  # the sweep's precision (float64 under float64 calibration)
        self.s0, z = r.scale[g].T.to(dtype).contiguous(), r.zero[g].T.to(dtype).contiguous()
        self.X0 = r.W_pre / self.s0
        self.low, self.high = -z, (2**r.bits - 1) - z
        self.E = F.one_hot(g, num_classes=r.scale.shape[0]).T.to(dtype)
        self.V = torch.zeros_like(r.W_pre)
        self.c = torch.ones(r.scale.shape[1], r.scale.shape[0], dtype=dtype, device=device)

    def weight(self) -> torch.Tensor:
        """Q for the current V and c (GPTQ's Q exactly at the start); keeps what step() needs."""
        self.ce = self.c @ self.E
        rounded = torch.round(self.X0 / self.ce + self.V)
        self.inside = (rounded >= self.low) & (rounded <= self.high)
        self.q = torch.clamp(rounded, self.low, self.high)
        return self.s0 * self.ce * self.q

    def step(self, G: torch.Tensor, lr: float) -> None:
        """One signed-gradient step from G = dLoss/dQ; V kept in [-1/2, 1/2], c in [CLIP_LOW, CLIP_HIGH]."""
        m = self.inside.to(G.dtype)
        grad_c = (G * self.s0 * (self.q - m * self.X0 / self.ce)) @ self.E.T
        self.V.sub_(lr * torch.sign(G) * m).clamp_(-0.5, 0.5)
        self.c.sub_(lr * torch.sign(grad_c)).clamp_(CLIP_LOW, CLIP_HIGH)

    def result(self) -> QuantResult:
        """The QuantResult of the tuned V and c (exact invariant Q == (codes - z[g]) * scale[g])."""
        g = self.r.g_idx.long()
        self.weight()
        codes = (self.q + self.r.zero[g].T.to(self.q.dtype)).to(torch.int32)
        scale = (self.r.scale * self.c.T).to(self.r.scale.dtype)  # stored as GPTQ's scales are
        Q = (codes.to(scale.dtype) - self.r.zero[g].T) * scale[g].T
        return replace(self.r, Q=Q, codes=codes, scale=scale)


def refine_layer(out: LayerOutputs, results: dict[str, QuantResult], settings: RefineSettings) -> dict[str, Any]:
    """Tune the layer's quantized Linears (results by full name, replaced by the refined ones) for
    its output error against out.targets; the Linears get the refined weights. Returns the mean
    squared error on the first step's windows before and after, and the share of codes changed."""
    names = [n for n in out.linears if out.full_names[n] in results]
    if not names or settings.steps == 0:
        return {}
    tune = {n: Tunable(results[out.full_names[n]], out.device) for n in names}
    steps = list(_windows(out, settings))
    frozen = [p for p in out.layer.parameters() if p.requires_grad]
    first = last = 0.0
    try:
        for p in frozen:
            p.requires_grad_(False)
        for step, (b, rows) in enumerate(steps):
            with torch.no_grad():
                weights = {n: t.weight().requires_grad_() for n, t in tune.items()}
            with torch.enable_grad():
                loss = _loss(out, weights, b, rows)
                loss.backward()
            first = float(loss.detach()) if step == 0 else first
            with torch.no_grad():
                for n, t in tune.items():
                    t.step(weights[n].grad, settings.lr * (1 - step / len(steps)))
        with torch.no_grad():  # the first step's windows again: the error it started from, and now
            last = float(_loss(out, {n: t.weight() for n, t in tune.items()}, *steps[0]))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    changed = total = 0
    for n, t in tune.items():
        with torch.no_grad():
            new = t.result()
        changed += int((new.codes != t.r.codes).sum())
        total += new.codes.numel()
        results[out.full_names[n]] = new
        W = weight_matrix(out.linears[n])
        set_weight_matrix(out.linears[n], new.Q.to(W.device, W.dtype))
    log.info("layer %d refined: %d steps, output MSE on the first step's windows %.4g -> %.4g, %.2f%% of codes "
             "changed", out.index, len(steps), first, last, 100.0 * changed / max(total, 1))
    return {"refine_mse_first": first, "refine_mse_after": last, "refine_codes_changed": changed / max(total, 1)}


def _loss(out: LayerOutputs, weights: dict[str, torch.Tensor], b: int, rows: slice) -> torch.Tensor:
    """Mean squared error of the layer's outputs on windows `rows` of batch b, with these weights."""
    batch = out.inputs[b].select(rows).to(out.device)
    target = out.targets[b][rows].to(out.device)
    params = {f"{n}.weight": w.to(weight_matrix(out.linears[n]).dtype) for n, w in weights.items()}
    pred = functional_call(out.layer, params, batch.args, batch.kwargs)
    pred = pred[0] if isinstance(pred, (tuple, list)) else pred
    return F.mse_loss(pred.float(), target.float())


def reference_rows(settings: RefineSettings, sizes: list[int]) -> int:
    """How many windows at the head of each calibration batch (of these sizes) the steps read
    (`_windows` walks the heads first): the reference stream need keep no more."""
    return max(rows.stop for _b, rows in _slots(sizes, settings)[: settings.steps])


def _windows(out: LayerOutputs, settings: RefineSettings):
    """(batch, rows) of each step (see `_slots`), over the batches of out.targets."""
    slots = _slots([t.shape[0] for t in out.targets], settings)
    for k in range(settings.steps):
        yield slots[k % len(slots)]


def _slots(sizes: list[int], settings: RefineSettings) -> list[tuple[int, slice]]:
    """`windows` consecutive windows at a time, in the order the steps take them: every
    calibration batch's first slot, then every batch's second, ..., so the steps see the
    calibration windows evenly (and read only the heads of the batches when few)."""
    per = max(1, min(settings.windows, min(sizes)))
    slots = [(b, slice(a, a + per)) for b, n in enumerate(sizes) for a in range(0, n - per + 1, per)]
    return sorted(slots, key=lambda slot: (slot[1].start, slot[0]))
