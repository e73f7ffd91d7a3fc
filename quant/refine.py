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
its gradient straight through. Each step takes a few calibration windows, the mean squared error
of the layer's outputs, and moves every V and c by lr_t * sign(gradient) (signed gradient
descent, lr_t decaying linearly from lr to 0 over the steps). The result is new codes and scales
on the same grid layout (zero points and g_idx unchanged), packed as any GPTQ result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Optional

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


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity's gradient backward."""
    return x + (torch.round(x) - x).detach()


def refined_codes(r: QuantResult, V: torch.Tensor, c: torch.Tensor, ste: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as fp32 [out, in], per-weight scale [out, in]) for offsets V [out, in] and scale
    factors c [n_groups, out]."""
    g = r.g_idx.long()
    s = (r.scale * c)[g].T
    z = r.zero[g].T
    x = r.W_pre / s + V
    codes = torch.clamp((round_ste(x) if ste else torch.round(x)) + z, 0, 2**r.bits - 1)
    return codes, s


def fake_quantized(r: QuantResult, V: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The dequantized weight Q, differentiable in V and c."""
    codes, s = refined_codes(r, V, c, ste=True)
    return s * (codes - r.zero[r.g_idx.long()].T)


def refined_result(r: QuantResult, V: torch.Tensor, c: torch.Tensor) -> QuantResult:
    """The QuantResult of the tuned V and c (exact invariant Q == (codes - z) * scale)."""
    with torch.no_grad():
        codes, _ = refined_codes(r, V, c)
        scale = (r.scale * c).float()
        g = r.g_idx.long()
        Q = (codes - r.zero[g].T) * scale[g].T
    return replace(r, Q=Q, codes=codes.to(torch.int32), scale=scale)


def refine_layer(out: LayerOutputs, results: dict[str, QuantResult], settings: RefineSettings) -> dict[str, Any]:
    """Tune the layer's quantized Linears (results by full name, replaced by the refined ones) for
    its output error against out.targets; the Linears get the refined weights. Returns the mean
    squared error of the first and last steps' windows."""
    names = [n for n in out.linears if out.full_names[n] in results]
    if not names or settings.steps == 0:
        return {}
    device = out.device
    res = {n: _on(results[out.full_names[n]], device) for n in names}
    V = {n: torch.zeros_like(r.W_pre, requires_grad=True) for n, r in res.items()}
    c = {n: torch.ones_like(r.scale, requires_grad=True) for n, r in res.items()}
    steps = list(_windows(out, settings))
    frozen = [p for p in out.layer.parameters() if p.requires_grad]
    first: Optional[float] = None
    loss_value = 0.0
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for step, (b, rows) in enumerate(steps):
                batch = out.inputs[b].select(rows).to(device)
                target = out.targets[b][rows].to(device)
                weights = {f"{n}.weight": fake_quantized(res[n], V[n], c[n]).to(weight_matrix(out.linears[n]).dtype)
                           for n in names}
                pred = functional_call(out.layer, weights, batch.args, batch.kwargs)
                pred = pred[0] if isinstance(pred, (tuple, list)) else pred
                loss = F.mse_loss(pred.float(), target.float())
                loss.backward()
                loss_value = float(loss.detach())
                first = loss_value if first is None else first
                lr = settings.lr * (1 - step / len(steps))
                with torch.no_grad():
                    for n in names:
                        V[n].sub_(lr * V[n].grad.sign()).clamp_(-0.5, 0.5)
                        c[n].sub_(lr * c[n].grad.sign()).clamp_(CLIP_LOW, CLIP_HIGH)
                        V[n].grad = c[n].grad = None
    finally:
        for p in frozen:
            p.requires_grad_(True)
    changed = 0
    for n in names:
        full = out.full_names[n]
        new = refined_result(res[n], V[n].detach(), c[n].detach())
        changed += int((new.codes != res[n].codes).sum())
        results[full] = new
        W = weight_matrix(out.linears[n])
        set_weight_matrix(out.linears[n], new.Q.to(W.device, W.dtype))
    total = sum(r.codes.numel() for r in res.values())
    log.info("layer %d refined: %d steps, output MSE %.4g -> %.4g, %.2f%% of codes changed", out.index,
             len(steps), first, loss_value, 100.0 * changed / max(total, 1))
    return {"refine_mse_first": first, "refine_mse_last": loss_value, "refine_codes_changed": changed / max(total, 1)}


def _on(r: QuantResult, device: torch.device) -> QuantResult:
    return replace(r, W_pre=r.W_pre.to(device), scale=r.scale.to(device), zero=r.zero.to(device),
                   g_idx=r.g_idx.to(device), codes=r.codes.to(device), Q=r.Q.to(device))


def _windows(out: LayerOutputs, settings: RefineSettings):
    """(batch, rows) of each step: `windows` consecutive windows at a time, walking every
    calibration batch in turn, so the steps see the calibration windows evenly."""
    sizes = [t.shape[0] for t in out.targets]
    per = max(1, min(settings.windows, min(sizes)))
    slots = [(b, slice(a, a + per)) for b, n in enumerate(sizes) for a in range(0, n - per + 1, per)]
    # interleave the batches: step k takes batch k mod B
    order = sorted(range(len(slots)), key=lambda i: (slots[i][1].start, slots[i][0]))
    for k in range(settings.steps):
        yield slots[order[k % len(order)]]
