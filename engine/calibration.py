"""The ONE layer-by-layer calibration engine, shared by pruning and quantization.

1. Capture the inputs of decoder layer 0 with ALL their call kwargs (attention mask,
   position ids/embeddings, cache flags), and every later layer's own kwargs (sliding-
   window layers get other masks), by running the base model with layer 0 and
   recording stand-ins for the others (so no lm_head and no other layer runs).
2. Per layer: move it to the device; find which Linears read the same input tensor
   (q/k/v, gate/up) so they share ONE Hessian; hook them, run the calibration
   batches, hand each Linear and its Hessian to the compressor; with true-sequential
   the groups are done in execution order, each seeing the already-compressed ones;
   re-run the compressed layer so its outputs feed the next layer; move it back.
Only one layer and the activations are on the device at a time, so peak device
memory does not grow with depth. The engine knows no algorithm: a compressor edits
the weights in place and returns its own stats.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.errors import ShrinkError
from engine.hessian import HessianAccumulator, HessianError
from engine.modeling import find_decoder_layers, find_linears, weight_matrix

log = logging.getLogger(__name__)


@dataclass
class LinearJob:
    layer_index: int
    num_layers: int
    name: str  # qualified name inside the decoder layer, e.g. "self_attn.q_proj"
    full_name: str  # qualified name inside the model
    module: nn.Module
    hessian: Optional[HessianAccumulator]  # None when the compressor needs no data


Compressor = Callable[[LinearJob], dict[str, Any]]


@dataclass
class LayerBatch:
    """The recorded call of a decoder layer for one calibration batch."""
    args: tuple
    kwargs: dict[str, Any]

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, h: torch.Tensor) -> "LayerBatch":
        if self.args:
            return LayerBatch((h, *self.args[1:]), self.kwargs)
        return LayerBatch(self.args, {**self.kwargs, "hidden_states": h})

    def to(self, device: torch.device) -> "LayerBatch":
        return LayerBatch(tuple(_move(a, device) for a in self.args),
                          {k: _move(v, device) for k, v in self.kwargs.items()})


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _CallRecorder(nn.Module):
    """Stands in for decoder layer i >= 1 during capture: records the call's kwargs (masks and
    position embeddings may differ per layer, e.g. sliding-window layers) and passes the hidden
    states through untouched, in the structure layer 0 returned. Attributes the model's loop
    may read are looked up on the real layer (kept out of the module tree, so it stays put)."""

    def __init__(self, layer: nn.Module, record: Callable[[tuple, dict], None], template: list[Any]) -> None:
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_record"], self.__dict__["_template"] = layer, record, template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record(args, kwargs)
        h = args[0] if args else kwargs["hidden_states"]
        out = self._template[-1]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)


@torch.no_grad()
def capture_layer_calls(model: nn.Module, windows: torch.Tensor, batch_size: int,
                        device: torch.device, store: torch.device) -> list[list[LayerBatch]]:
    """calls[i][j]: the args and kwargs decoder layer i receives for calibration batch j.

    Only layer 0 runs (plus embeddings); layers >= 1 are stand-ins that record their own
    kwargs, so per-layer masks/positions are right. Their hidden states are left out (None):
    the engine feeds each layer the previous layer's compressed outputs. A tensor passed to
    several layers (the usual case) is stored once per batch."""
    parent_name, layers = find_decoder_layers(model)
    parent = model.get_submodule(parent_name.rsplit(".", 1)[0]) if "." in parent_name else model
    attr = parent_name.rsplit(".", 1)[-1]
    calls: list[list[LayerBatch]] = [[] for _ in layers]
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, stored copy), one batch
    template: list[Any] = []

    def keep(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in stored:
                stored[id(value)] = (value, value.to(store))
            return stored[id(value)][1]
        return tuple(keep(v) for v in value) if isinstance(value, tuple) else value

    def recorder(i: int) -> Callable[[tuple, dict], None]:
        def record(args: tuple, kwargs: dict) -> None:
            batch = LayerBatch(args, kwargs) if i == 0 else LayerBatch(args, kwargs).with_hidden(None)
            calls[i].append(LayerBatch(tuple(keep(a) for a in batch.args),
                                       {k: keep(v) for k, v in batch.kwargs.items()}))
        return record

    stand_ins = [_CallRecorder(layer, recorder(i), template) for i, layer in enumerate(layers) if i > 0]
    setattr(parent, attr, nn.ModuleList([layers[0], *stand_ins]))
    handles = [layers[0].register_forward_pre_hook(lambda _m, a, kw: recorder(0)(a, kw), with_kwargs=True),
               layers[0].register_forward_hook(lambda _m, _i, out: template.append(out))]
    base = model.base_model
    try:
        base.to(device)
        for start in range(0, windows.shape[0], batch_size):
            stored.clear()
            template.clear()
            base(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        base.to("cpu")
        setattr(parent, attr, layers)
        stored.clear()
    return calls


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch], device: torch.device,
              store: torch.device | None) -> list[torch.Tensor] | None:
    """Run every batch through the layer; keep outputs (on `store`) unless store is None."""
    outputs = []
    for batch in batches:
        moved = batch.to(device)
        out = _first(layer(*moved.args, **moved.kwargs))
        if store is not None:
            outputs.append(out.to(store))
    return outputs if store is not None else None


def input_groups(layer: nn.Module, batch: LayerBatch, device: torch.device) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in execution order."""
    linears = find_linears(layer)
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    handles = []

    keep: list[torch.Tensor] = []  # keeps inputs alive so their ids stay unique during the pass

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple, _out: Any) -> None:
            keep.append(inp[0])
            key = id(inp[0])
            if key not in seen:
                seen[key] = []
                order.append(key)
            if name not in seen[key]:
                seen[key].append(name)
        return fn

    for name, module in linears.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        run_layer(layer, [batch], device, None)
    finally:
        for h in handles:
            h.remove()
    groups = [seen[k] for k in order]
    missing = [n for n in linears if not any(n in g for g in groups)]
    return groups + ([missing] if missing else [])


def accumulate(layer: nn.Module, groups: list[list[str]], batches: list[LayerBatch],
               device: torch.device, full: bool = True) -> dict[str, HessianAccumulator]:
    """One Hessian per input group, shared by the Linears of the group (only its
    diagonal unless `full`)."""
    linears = find_linears(layer)
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    for group in groups:
        first = linears[group[0]]
        columns = weight_matrix(first).shape[1]
        acc = HessianAccumulator(columns, device, full)
        for name in group:
            hessians[name] = acc
        handles.append(first.register_forward_hook(lambda _m, inp, _o, acc=acc: acc.add(inp[0])))
    try:
        run_layer(layer, batches, device, None)
    finally:
        for h in handles:
            h.remove()
    return hessians


def relative_error(W0: torch.Tensor, W1: torch.Tensor, acc: Optional[HessianAccumulator]) -> float:
    """||(W0-W1) X^T||^2 / ||W0 X^T||^2 = tr(D H D^T) / tr(W H W^T); with only diag(H)
    kept, the same with H replaced by its diagonal (Wanda's own error model); in weight
    space if there is no data at all."""
    D, W = (W0 - W1).float(), W0.float()
    if acc is None:
        return float((D * D).sum() / (W * W).sum().clamp_min(1e-30))
    if acc.H is None:
        h = acc.diagonal()
        return float((D * D * h).sum() / (W * W * h).sum().clamp_min(1e-30))
    num = (D @ acc.H * D).sum()
    den = (W @ acc.H * W).sum().clamp_min(1e-30)
    return float(num / den)


def activation_store(model: nn.Module, windows: torch.Tensor, device: torch.device,
                     offload: Optional[bool]) -> torch.device:
    """Where calibration activations live: on the device unless asked otherwise or they
    would take more than half of its free memory (inputs + outputs of one layer)."""
    if offload is not None or device.type != "cuda":
        return torch.device("cpu") if offload else device
    hidden = model.config.get_text_config().hidden_size
    dtype_bytes = next(model.parameters()).element_size()
    needed = 2 * windows.numel() * hidden * dtype_bytes
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free / 2:
        log.info("calibration activations (%.1f GiB) offloaded to the CPU", needed / 2**30)
        return torch.device("cpu")
    return device


def compress_model(model: nn.Module, windows: Optional[torch.Tensor], compressor: Compressor,
                   device: torch.device, true_sequential: bool = True, batch_size: int = 8,
                   offload_activations: Optional[bool] = None, label: str = "compress",
                   full_hessian: bool = True) -> list[dict[str, Any]]:
    """Compress every Linear of every decoder layer; returns a per-Linear report.
    `full_hessian=False` hands the compressor accumulators holding only diag(H)."""
    parent_name, layers = find_decoder_layers(model)
    store = activation_store(model, windows, device, offload_activations) if windows is not None else device
    calls = capture_layer_calls(model, windows, batch_size, device, store) if windows is not None else None
    hidden = [b.hidden() for b in calls[0]] if calls is not None else None
    report: list[dict[str, Any]] = []
    total = time.time()
    for i, layer in enumerate(layers):
        start = time.time()
        layer.to(device)
        linears = find_linears(layer)
        # layer i's own kwargs, fed the previous layer's (compressed) outputs
        batches = [c.with_hidden(h) for c, h in zip(calls[i], hidden)] if calls is not None else None
        if batches is None:
            groups, hessians = [list(linears)], {}
        else:
            groups = input_groups(layer, batches[0], device)
            hessians = {} if true_sequential else accumulate(layer, groups, batches, device, full_hessian)
        for group in groups:
            if batches is not None and true_sequential:
                hessians.update(accumulate(layer, [group], batches, device, full_hessian))
            for name in group:
                report.append(_compress_one(i, len(layers), parent_name, name, linears[name],
                                            hessians.get(name), compressor))
        if batches is not None:
            outputs = run_layer(layer, batches, device, store)
            if not all(torch.isfinite(o).all() for o in outputs):
                raise ShrinkError(f"layer {i}: NaN/inf activations after compression (check the input model and calibration data)")
            hidden = outputs
            calls[i] = []  # this layer's kwargs are no longer needed
        layer.to("cpu")
        errors = [r["rel_error"] for r in report[-len(linears):]]
        elapsed = time.time() - total
        log.info("%s layer %d/%d: %.1fs, mean rel. error %.4g, max %.4g, ETA %.0fs", label, i + 1, len(layers),
                 time.time() - start, sum(errors) / len(errors), max(errors), elapsed / (i + 1) * (len(layers) - i - 1))
    return report


def _compress_one(i: int, n: int, parent: str, name: str, module: nn.Module,
                  acc: Optional[HessianAccumulator], compressor: Compressor) -> dict[str, Any]:
    full = f"{parent}.{i}.{name}"
    if acc is not None and not acc.finite():
        raise ShrinkError(f"{full}: NaN/inf in calibration activations")
    W0 = weight_matrix(module).clone()
    start = time.time()
    try:
        stats = compressor(LinearJob(i, n, name, full, module, acc))
    except HessianError as exc:
        raise ShrinkError(f"{full}: {exc}") from exc
    except ValueError as exc:  # kernels validate shapes/options with ValueError
        raise ShrinkError(f"{full}: {exc}") from exc
    rel = relative_error(W0, weight_matrix(module), acc)
    return {"layer": i, "name": name, "full_name": full, "seconds": time.time() - start, "rel_error": rel, **stats}
