"""Kernel: GPTQ (Frantar et al. 2022) and round-to-nearest weight quantization.

GPTQ is the OBS column sweep of engine.obs with a grid quantizer plugged in: every
column is rounded onto its grid and the rounding error is pushed onto the columns not
yet quantized, using the damped inverse Hessian of the layer inputs.

Options, as in the reference implementation / AutoGPTQ:
* group_size -1: one grid per output row, fitted once on the whole (updated-free) W.
  group_size g > 0: one grid per row and per g input columns; when g does not divide
  in_features the last group is shorter (ceil(in / g) groups), as the GPTQ checkpoint
  format allows (gptqmodel's torch/triton kernels read it; Marlin/ExLlama need g | in).
* act_order (desc_act): sweep the columns by descending diag(H) so the most
  influential inputs are quantized first, while the most freedom is left to fix them.
* groups are fitted lazily when the sweep reaches them (on the weights as updated so
  far, in sweep order, so with act_order g_idx[perm[i]] = i // g), or, with
  static_groups, up front on the original column order (g_idx[j] = j // g).
* mask (True = pruned, e.g. from SparseGPT): those weights are forced to 0 (every grid
  holds 0 exactly, at code == zero point) and their error is propagated like any other.
Imports only torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.grid import Grid, ScaleSearch, check_bits, dequantize_codes, fit_grid, quantize_codes
from engine.hessian import inverse_hessian
from engine.obs import obs_sweep, prepare_layer


@dataclass
class QuantResult:
    """Q == (codes - zero[g_idx].T) * scale[g_idx].T exactly (fp32), original column order."""

    Q: torch.Tensor  # fp32 [out, in] dequantized weight
    codes: torch.Tensor  # int32 [out, in], in [0, 2**bits - 1]
    scale: torch.Tensor  # fp32 [n_groups, out]
    zero: torch.Tensor  # fp32 [n_groups, out], integer-valued, the real zero point z
    g_idx: torch.Tensor  # int32 [in]: group of each input column
    bits: int
    group_size: int
    sym: bool
    error: float  # GPTQ: OBS loss sum (w-q)^2/d^2 / 2; RTN: sum (w-q)^2 / 2
    damp_fraction: float  # damping actually used (0.0 for RTN)
    # [out, in] in the sweep's precision (float32, or float64 under float64 calibration), original
    # column order: the values each weight had when it was rounded
    # (GPTQ: W as updated by the sweep so far; RTN: W), so codes == round(W_pre / scale) + zero
    # clamped; the starting point of a refinement of the rounding (quant/refine.py)
    W_pre: torch.Tensor | None = None


def check_quant_args(bits: int, group_size: int, static_groups: bool = False) -> None:
    check_bits(bits)
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 (one grid per row) or positive, got {group_size}")
    if static_groups and group_size <= 0:
        raise ValueError("static_groups requires group_size > 0")


class GroupQuantizer:
    """The sweep's column quantizer: which grid each sweep column uses and its codes.

    Grids are fitted up front on W_fit (original column order) for one-grid-per-row and
    static groups, or lazily through fit() when the sweep reaches each group. With `search`
    each grid's range is searched (quant.grid.ScaleSearch), its error weighted per column by
    `weight` ([cols] or [rows, cols], original column order; None: unweighted).
    """

    def __init__(
        self, W_fit: torch.Tensor, bits: int, sym: bool, group_size: int,
        static: bool = False, perm: torch.Tensor | None = None,
        search: ScaleSearch | None = None, weight: torch.Tensor | None = None,
    ) -> None:
        rows, cols = W_fit.shape
        self.bits, self.sym, self.group_size = bits, sym, group_size
        self.perm, self.search = perm, search
        size = cols if group_size == -1 else group_size
        self.refit_every = 0 if (group_size == -1 or static) else group_size
        sweep_pos = torch.arange(cols, device=W_fit.device)
        self.g_idx = sweep_pos // size  # original order
        if self.refit_every and perm is not None:
            self.g_idx = torch.empty_like(sweep_pos)
            self.g_idx[perm] = sweep_pos // size  # groups follow the sweep order
        col_group = self.g_idx if perm is None else self.g_idx[perm]
        self.col_group: list[int] = col_group.tolist()  # host copy: no device sync per column
        n_groups = -(-cols // size)  # ceil: a shorter last group when size does not divide cols
        self.grids: list[Grid | None] = [None] * n_groups
        # lazily fitted groups see sweep-ordered columns: their weights in that order
        self.weight = weight if (weight is None or perm is None or not self.refit_every) else weight[..., perm]
        if not self.refit_every:
            for g in range(n_groups):
                cols_g = slice(g * size, (g + 1) * size)
                self.grids[g] = fit_grid(W_fit[:, cols_g], bits, sym, search, self._weight(cols_g))
        self.codes = torch.zeros(rows, cols, dtype=torch.int32, device=W_fit.device)  # sweep order
        self.pre = torch.zeros(rows, cols, dtype=W_fit.dtype, device=W_fit.device)  # sweep order, W's precision

    def _weight(self, cols: slice) -> torch.Tensor | None:
        return None if self.weight is None else self.weight[..., cols]

    def fit(self, start: int, current: torch.Tensor) -> None:
        cols = slice(start, start + current.shape[1])
        self.grids[start // self.refit_every] = fit_grid(current, self.bits, self.sym, self.search, self._weight(cols))

    def __call__(self, i: int, w: torch.Tensor) -> torch.Tensor:
        grid = self.grids[self.col_group[i]]
        c = quantize_codes(w.unsqueeze(1), grid)
        self.codes[:, i] = c[:, 0].to(torch.int32)
        self.pre[:, i] = w
        return dequantize_codes(c, grid)[:, 0].to(w.dtype)

    def result(self, error: float, damp_fraction: float) -> QuantResult:
        """Codes back in original order; Q rebuilt from codes so the invariant is exact."""
        codes, pre = self.codes, self.pre
        if self.perm is not None:
            back = torch.argsort(self.perm)
            codes, pre = codes[:, back], pre[:, back]
        scale = torch.stack([g.scale[:, 0] for g in self.grids]).to(torch.float32)
        zero = torch.stack([g.zero[:, 0] for g in self.grids]).to(torch.float32)
        Q = (codes.to(torch.float32) - zero[self.g_idx].T) * scale[self.g_idx].T
        return QuantResult(
            Q, codes, scale, zero, self.g_idx.to(torch.int32), self.bits, self.group_size,
            self.sym, error, damp_fraction, pre,
        )


def obs_weight(Hinv: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The cost the OBS sweep charges per unit of squared error in each column, 1/[Hinv]_jj^2
    (Hinv the upper Cholesky factor of the damped inverse Hessian, sweep order): the error's
    output cost once the later columns have compensated it. 0 on dead columns."""
    d = torch.diagonal(Hinv, dim1=-2, dim2=-1).to(torch.float32)
    return (1.0 / (d * d)).masked_fill(dead, 0)


def asymmetric_update(dXXT: torch.Tensor, Hinv: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's P = alpha * triu(dXXT Hinv^T, 1) Hinv (sweep order; batched over leading dims):
    dXXT = (X~ - X) X^T over the calibration tokens (X~ the layer's inputs in the full-precision
    model, X in the compressed one), Hinv the upper Cholesky factor of the damped inverse of
    H = X X^T, both scaled alike (2/n)."""
    return alpha * torch.triu(dXXT @ Hinv.transpose(-1, -2), diagonal=1) @ Hinv


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    mask: torch.Tensor | None = None,
    *,
    search: ScaleSearch | None = None,
    dXXT: torch.Tensor | None = None,
    alpha: float = 0.25,
) -> QuantResult:
    """GPTQ-quantize W [out, in] given the layer Hessian H [in, in] (2/n sum x x^T).

    damp is the fraction of mean(diag H) added to the diagonal (raised automatically
    if H is still not positive definite; the value used is returned). Computes in fp32
    on W's device (fp64 if W is fp64). search: each grid's range searched (weighted by the
    sweep's OBS cost of each column when search.weighted). dXXT [in, in]: GPTAQ's asymmetric
    calibration (asymmetric_update) with strength alpha.
    """
    if not act_order:
        return gptq_quantize_batch([W], [H], bits, group_size, sym, static_groups, damp, block_size, [mask],
                                   search=search, dXXTs=None if dXXT is None else [dXXT], alpha=alpha)[0]
    W, H, dead = prepare_layer(W, H, mask)
    check_quant_args(bits, group_size, static_groups)
    if search is not None:
        search.check()
    mask = mask.to(W.device) if mask is not None else None
    W_fit = W.masked_fill(mask, 0) if mask is not None else W
    # Reference GPTQ orders by diag(H) after setting dead columns to 1.
    diag = torch.diagonal(H).masked_fill(dead, 1)
    perm = torch.argsort(diag, descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    mask = mask[:, perm] if mask is not None else None
    inv = inverse_hessian(H, damp)
    weight = None
    if search is not None and search.weighted:
        weight = torch.empty(W.shape[1], dtype=torch.float32, device=W.device)
        weight[perm] = obs_weight(inv.Hinv, dead[perm])  # the quantizer takes original order
    quantizer = GroupQuantizer(W_fit, bits, sym, group_size, static_groups, perm, search, weight)
    P = None
    if dXXT is not None:
        P = asymmetric_update(dXXT.to(W.device, W.dtype)[perm][:, perm], inv.Hinv, alpha)
    sweep = obs_sweep(W, inv.Hinv, block_size=block_size, mask=mask, quantizer=quantizer, P=P)
    return quantizer.result(sweep.error, inv.damp_fraction)


def gptq_quantize_batch(
    Ws: list[torch.Tensor],
    Hs: list[torch.Tensor],
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    masks: list[torch.Tensor | None] | None = None,
    *,
    search: ScaleSearch | None = None,
    dXXTs: list[torch.Tensor] | None = None,
    alpha: float = 0.25,
) -> list[QuantResult]:
    """GPTQ (columns in original order) of B same-shape matrices, each with its own Hessian,
    in ONE column sweep (the experts of an MoE block): the same results as B separate
    calls, at the per-column cost of one. Each matrix gets its own damping (and, with
    dXXTs, its own asymmetric update)."""
    masks = masks if masks is not None else [None] * len(Ws)
    check_quant_args(bits, group_size, static_groups)
    if search is not None:
        search.check()
    prepared = [prepare_layer(W, H, m) for W, H, m in zip(Ws, Hs, masks)]
    W = torch.stack([p[0] for p in prepared])
    B, rows, cols = W.shape
    mask = None
    if any(m is not None for m in masks):
        mask = torch.stack([m.to(W.device) if m is not None else torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
                            for m in masks])
    W_fit = W.masked_fill(mask, 0) if mask is not None else W
    invs = [inverse_hessian(p[1], damp) for p in prepared]
    Hinv = torch.stack([inv.Hinv for inv in invs])
    weight = None
    if search is not None and search.weighted:  # each matrix's rows weighted by its own Hessian
        weight = torch.stack([obs_weight(inv.Hinv, p[2]) for inv, p in zip(invs, prepared)])
        weight = weight.unsqueeze(1).expand(B, rows, cols).reshape(B * rows, cols)
    quantizer = GroupQuantizer(W_fit.reshape(B * rows, cols), bits, sym, group_size, static_groups,
                               search=search, weight=weight)
    P = None
    if dXXTs is not None:
        P = asymmetric_update(torch.stack([d.to(W.device, W.dtype) for d in dXXTs]), Hinv, alpha)
    sweep = obs_sweep(W, Hinv, block_size=block_size, mask=mask, quantizer=quantizer, P=P)
    full = quantizer.result(sweep.error, 0.0)
    part = [slice(k * rows, (k + 1) * rows) for k in range(B)]
    return [QuantResult(full.Q[r], full.codes[r], full.scale[:, r], full.zero[:, r], full.g_idx, bits, group_size,
                        sym, sweep.errors[k], invs[k].damp_fraction, full.W_pre[r]) for k, r in enumerate(part)]


def rtn_quantize(
    W: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = False,
    mask: torch.Tensor | None = None,
    search: ScaleSearch | None = None,
) -> QuantResult:
    """Round-to-nearest on the same grids (the no-calibration baseline); with `search`, each
    grid's range searched for the least unweighted error (there is no Hessian here).

    Masked weights (True = pruned) are set to 0 before fitting and stay 0.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    check_quant_args(bits, group_size)
    if mask is not None and (mask.dtype != torch.bool or mask.shape != W.shape):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape)}")
    W = W.to(torch.float32)
    if mask is not None:
        W = W.masked_fill(mask.to(W.device), 0)
    if search is not None:
        search.check()
    quantizer = GroupQuantizer(W, bits, sym, group_size, static=True, search=search)
    size = W.shape[1] if group_size == -1 else group_size
    for g, grid in enumerate(quantizer.grids):
        cols = slice(g * size, (g + 1) * size)
        quantizer.codes[:, cols] = quantize_codes(W[:, cols], grid).to(torch.int32)
    quantizer.pre = W
    res = quantizer.result(0.0, 0.0)
    res.error = float(((W - res.Q) ** 2).sum()) / 2
    return res
