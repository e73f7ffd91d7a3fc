"""The `quantize` pipeline stage: GPTQ or RTN on every Linear of the decoder layers.

Each Linear is quantized by the shared calibration engine, packed into the GPTQ
layout right away (so only packed tensors are kept), and at the end swapped for a
QuantLinear: the evaluation that follows runs the exact tensors that are exported.
Existing zeros (a pruned model) are kept zero: they are passed to GPTQ as a mask.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from quant.config import QuantConfig
from quant.gptq import QuantResult, gptq_quantize, rtn_quantize
from quant.pack import pack_gptq
from shrink.calibration import LinearJob, compress_model
from shrink.errors import ShrinkError
from shrink.modeling import set_weight_matrix, weight_matrix

if TYPE_CHECKING:
    from shrink.pipeline import RunState

log = logging.getLogger(__name__)

METHODS = ("gptq", "rtn")


def check_quant_config(q: QuantConfig) -> None:
    if q.method not in METHODS:
        raise ShrinkError(f"quant.method: unknown method {q.method!r} (gptq | rtn)")
    if q.bits not in (2, 3, 4, 8):
        raise ShrinkError(f"quant.bits: {q.bits} is not supported (2 | 3 | 4 | 8)")
    if q.group_size != -1 and q.group_size <= 0:
        raise ShrinkError(f"quant.group_size: {q.group_size} must be -1 (per channel) or positive")
    if q.static_groups and q.group_size == -1:
        raise ShrinkError("quant.static_groups: needs a group size (quant.group_size > 0)")
    if not 0 <= q.damp < 1:
        raise ShrinkError(f"quant.damp: {q.damp} must be in [0, 1)")


def quantization_config(q: QuantConfig) -> dict[str, Any]:
    from quant.export import gptq_quantization_config

    return gptq_quantization_config(bits=q.bits, group_size=q.group_size, sym=q.sym,
                                    desc_act=q.act_order and q.method == "gptq",
                                    static_groups=q.static_groups, true_sequential=q.true_sequential,
                                    damp_percent=q.damp)


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, q: QuantConfig) -> QuantResult:
    mask = W == 0  # zeros of a pruned model stay zero (every grid holds 0 exactly)
    mask = mask if bool(mask.any()) else None
    if q.method == "rtn":
        return rtn_quantize(W, q.bits, q.group_size, q.sym)
    return gptq_quantize(W, H, q.bits, q.group_size, q.sym, q.act_order, q.static_groups,
                         q.damp, q.block_size, mask=mask)


def install_quantized(state: "RunState", packed: dict[str, dict[str, torch.Tensor]], q: QuantConfig) -> None:
    """Swap the quantized Linears for QuantLinears and remember the export config."""
    from quant.export import replace_with_quant_linears

    replace_with_quant_linears(state.model, packed, q.bits, q.group_size)
    state.quantization_config = quantization_config(q)


def pack_result(result: QuantResult, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = pack_gptq(result.codes.cpu(), result.scale.cpu(), result.zero.cpu(), result.g_idx.cpu(), result.bits)
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = module.bias.data.detach().cpu().to(torch.float16)
    return tensors


def quantize_stage(state: "RunState") -> dict[str, Any]:
    q = state.cfg.quant
    check_quant_config(q)
    if state.quantization_config is not None:
        log.info("model already quantized (joint prune+quantize): skipping the quantize stage")
        return {"skipped": "already quantized"}
    packed: dict[str, dict[str, torch.Tensor]] = {}

    def compressor(job: LinearJob) -> dict[str, Any]:
        W = weight_matrix(job.module)
        H = job.hessian.H if job.hessian is not None else None
        result = quantize_linear(W.float(), H, q)
        set_weight_matrix(job.module, result.Q.to(W.dtype))
        packed[job.full_name] = pack_result(result, job.module)
        return {"gptq_error": result.error, "damp": result.damp_fraction}

    windows = state.calibration() if q.method == "gptq" else None
    report = compress_model(state.model, windows, compressor, state.device, q.true_sequential,
                            offload_activations=q.offload_activations, label=f"{q.method} {q.bits}-bit")
    install_quantized(state, packed, q)
    return {"method": q.method, "bits": q.bits, "group_size": q.group_size, "layers": report}
