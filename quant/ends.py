"""The model's two ends: the output head (quant.lm_head) and the input embedding
(quant.embed_bits), quantized after the decoder layers, in the layouts gptqmodel 7.6 reads.

- The head is a Linear like the decoder's, quantized with quant.bits / group_size / method.
  Its GPTQ Hessian comes from the inputs it gets in the quantized model (one forward over the
  calibration windows), as each decoder layer's comes from its quantized predecessors. The
  export says `"lm_head": true`, the field transformers, optimum and gptqmodel know.
- The embedding's "input" is a one-hot id, so there is nothing to calibrate on: round to
  nearest, as gptqmodel does for embeddings, at quant.embed_bits with groups of
  quant.embed_group_size consecutive tokens (8-bit, 32 by default, gptqmodel's defaults). The
  export names it in quantization_config's `dynamic` with those settings; gptqmodel's loader
  and ours read it, transformers + optimum do not (they would leave the table uninitialised).
- A tied embedding and head are untied first: each end gets its own tensor, and the export
  says tie_word_embeddings false (a packed head cannot be re-tied to a float table, nor a
  float head to a packed table). Both tensors are then counted in params.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.calibration import LinearJob, compress_one, relative_error
from engine.errors import ShrinkError
from engine.hessian import HessianAccumulator
from engine.modeling import linear_dims
from quant.config import QuantConfig, packs_ends
from quant.gptq import rtn_quantize
from quant.pack import pack_gptq
from quant.qlinear import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

Quantizer = Callable[[LinearJob], dict[str, Any]]
LOGITS_BYTES = 1 << 30


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _configs(model: nn.Module) -> list[Any]:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def untie(model: nn.Module) -> bool:
    """Give a head that shares the embedding's tensor its own copy; True if it did."""
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight is not getattr(table, "weight", None):
        return False
    head.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
    for config in _configs(model):
        config.tie_word_embeddings = False
    return True


def check_ends(model: nn.Module, quant: QuantConfig) -> None:
    """One line, before any work, for a model whose ends cannot take the asked packing."""
    ends = []
    if quant.embed_bits is not None:
        table = model.get_input_embeddings()
        if not isinstance(table, nn.Embedding):
            raise ShrinkError(f"quant.embed_bits: the input embedding is a {type(table).__name__}, not an nn.Embedding")
        ends.append(("quant.embed_bits", "input embedding", table.num_embeddings, table.embedding_dim))
    if quant.lm_head:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ShrinkError(f"quant.lm_head: the output head is a {type(head).__name__}, not an nn.Linear")
        ends.append(("quant.lm_head", "output head", head.in_features, head.out_features))
    for key, what, rows, cols in ends:
        if rows % 32 or cols % 32:
            raise ShrinkError(f"{key}: the {what} is {rows} x {cols}; GPTQ packing needs both divisible by 32")


def quantize_ends(model: nn.Module, quant: QuantConfig, windows: Optional[torch.Tensor], device: torch.device,
                  quantizer: Quantizer, packed: dict[str, dict[str, torch.Tensor]],
                  batch_size: int = 8) -> list[dict[str, Any]]:
    """Quantize the asked ends (check_ends passed) of a model whose decoder layers are already QuantLinears: the
    embedding first (so the head is calibrated on what the quantized model feeds it), then
    the head through `quantizer` (the stage's compressor: GPTQ with a Hessian, RTN without).
    Swaps both for packed modules; returns their report entries."""
    if not packs_ends(quant):
        return []
    if untie(model):
        log.info("tied input embedding and output head untied: each end is quantized and stored on its own")
        if quant.embed_bits is None or not quant.lm_head:
            log.warning("only one end of a tied pair is packed: the other is now stored too, in floating point, "
                        "so the export grows; set both quant.lm_head=true and quant.embed_bits to shrink it")
    report = []
    if quant.embed_bits is not None:
        report.append(_quantize_embedding(model, quant, packed))
    if quant.lm_head:
        report.append(_quantize_head(model, quant, windows, device, quantizer, packed, batch_size))
    log.warning("packed ends: transformers + optimum will not read them (from_pretrained would leave them "
                "uninitialised); load the export with shrink's loader, or gptqmodel's (GPTQModel.load)")
    return report


def _quantize_embedding(model: nn.Module, quant: QuantConfig, packed: dict[str, dict[str, torch.Tensor]]) -> dict:
    table = model.get_input_embeddings()
    name = module_name(model, table)
    E = table.weight.detach()
    W = E.t().float()  # [dim, vocab]: the table as a Linear from one-hot ids, gptqmodel's layout
    result = rtn_quantize(W, quant.embed_bits, quant.embed_group_size, quant.sym)
    tensors = pack_gptq(result.codes, result.scale, result.zero, result.g_idx, result.bits)
    new = QuantEmbedding.from_packed(tensors, quant.embed_bits, quant.embed_group_size)
    new.output_dtype = E.dtype
    model.set_submodule(name, new.to(E.device))
    packed[name] = tensors
    rel = relative_error(W, result.Q, None)  # in weight space: no data to weigh it with
    log.info("input embedding %s: RTN %d-bit, groups of %d tokens, rel. error %.4g", name, quant.embed_bits,
             quant.embed_group_size, rel)
    return {"layer": None, "name": name, "full_name": name, "rel_error": rel, "method": "rtn",
            "bits": quant.embed_bits, "group_size": quant.embed_group_size}


def _quantize_head(model: nn.Module, quant: QuantConfig, windows: Optional[torch.Tensor], device: torch.device,
                   quantizer: Quantizer, packed: dict[str, dict[str, torch.Tensor]], batch_size: int) -> dict:
    head = model.get_output_embeddings()
    name = module_name(model, head)
    acc = head_hessian(model, head, windows, device, batch_size) if windows is not None else None
    if acc is not None and not acc.finite():
        raise ShrinkError(f"{name}: NaN/inf in calibration activations")
    job = LinearJob(layer_index=-1, num_layers=0, name=name, full_name=name, module=head, hessian=acc)
    entry = {**compress_one(job, quantizer), "layer": None}  # outside the decoder layers
    new = QuantLinear.from_packed(packed[name], quant.bits, quant.group_size,
                                  bias=head.bias.detach() if head.bias is not None else None)
    model.set_submodule(name, new.to(head.weight.device))
    log.info("output head %s: %s %d-bit, rel. error %.4g", name, quant.method if acc is not None else "rtn",
             quant.bits, entry["rel_error"])
    return entry


def head_hessian(model: nn.Module, head: nn.Module, windows: torch.Tensor, device: torch.device,
                 batch_size: int) -> HessianAccumulator:
    """H of the head's inputs over the calibration windows, in the (quantized) model as it is."""
    acc = HessianAccumulator(linear_dims(head)[0], device)
    # the forward also makes fp32 logits [batch, seq, vocab]: at most LOGITS_BYTES of them at once
    batch_size = max(1, min(batch_size, LOGITS_BYTES // (windows.shape[1] * linear_dims(head)[1] * 4)))
    log.info("output head: its inputs from one forward of the quantized model over %d calibration windows, "
             "%d at a time", len(windows), batch_size)
    handle = head.register_forward_pre_hook(lambda _m, args: acc.add(args[0].detach()))
    model.to(device)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        model.to("cpu")
    return acc


def ends_config(model: nn.Module, quant: QuantConfig) -> dict[str, Any]:
    """The quantization_config fields that describe the quantized ends."""
    fields: dict[str, Any] = {"lm_head": bool(quant.lm_head)}
    if quant.embed_bits is not None:
        name = module_name(model, model.get_input_embeddings())
        fields["dynamic"] = {name: {"bits": quant.embed_bits, "group_size": quant.embed_group_size,
                                    "sym": quant.sym, "desc_act": False}}
    return fields
