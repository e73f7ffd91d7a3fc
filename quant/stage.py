"""The `quantize` pipeline stage: GPTQ or RTN on every Linear of the decoder layers.

Each Linear is quantized by the shared calibration engine, packed into the GPTQ
layout right away (so only packed tensors are kept), and at the end swapped for a
QuantLinear: the evaluation that follows runs the exact tensors that are exported.
Existing zeros (a pruned model) are kept zero: they are passed to GPTQ as a mask.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from quant.config import QuantConfig, packs_ends, scale_search
from quant.ends import check_ends, ends_config, quantize_ends
from quant.export import export_float_dtype, install_quantized, quantization_config
from quant.streaming import streamed_export
from quant.gptq import QuantResult, gptq_quantize, gptq_quantize_batch, rtn_quantize
from quant.pack import pack_result
from engine.calibration import (LayerOutputs, LinearJob, add_compressor_seconds, calibration_autocast,
                                calibration_dtype, calibration_facts, compress_model, record_coverage)
from quant.refine import RefineSettings, refine_layer, reference_rows
from engine.modeling import set_weight_matrix, weight_matrix
from engine.weights import MODEL_DTYPE_HINT, narrow

if TYPE_CHECKING:
    from engine.state import RunState

log = logging.getLogger(__name__)

def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, quant: QuantConfig,
                    cross: torch.Tensor | None = None) -> QuantResult:
    """GPTQ with H, RTN without (quant.method=rtn, or an expert with too few tokens); GPTAQ with
    the cross term of the reference stream (quant.gptaq)."""
    mask = W == 0  # zeros of a pruned model stay zero (every grid holds 0 exactly)
    mask = mask if bool(mask.any()) else None
    if quant.method == "rtn" or H is None:  # (a weighted search has no Hessian to weight by here)
        search = scale_search(quant)
        search = replace(search, weighted=False) if search is not None else None
        return rtn_quantize(W, quant.bits, quant.group_size, quant.sym, search=search)
    return gptq_quantize(W, H, quant.bits, quant.group_size, quant.sym, quant.act_order, quant.static_groups,
                         quant.damp, quant.block_size, mask=mask, search=scale_search(quant),
                         dXXT=cross if quant.gptaq else None, alpha=quant.gptaq_alpha)


def quantize_stage(state: "RunState") -> dict[str, Any]:
    quant = state.cfg.quant
    if state.quantization_config is not None:
        log.info("model already quantized (joint prune+quantize): skipping the quantize stage")
        return {"skipped": "already quantized"}
    if packs_ends(quant):  # model.lazy and torchrun were refused before any work
        check_ends(state.model, quant)
    packed: dict[str, dict[str, torch.Tensor]] = {}

    solved: dict[str, QuantResult] = {}  # batch members solved ahead of their own job
    refine = RefineSettings(quant.refine_steps, quant.refine_lr, quant.refine_windows) if quant.refine_steps else None
    kept: dict[str, QuantResult] = {}  # with refinement: the layer's results until it is refined

    def compressor(job: LinearJob) -> dict[str, Any]:
        W = weight_matrix(job.module)
        start = time.perf_counter()
        if job.full_name not in solved and len(job.batch or []) > 1 and quant.method == "gptq" and not quant.act_order:
            # the experts of one block in one sweep; zeros of a pruned model stay zero
            Ws = [weight_matrix(j.module).float() for j in job.batch]
            crosses = [j.cross for j in job.batch]
            results = gptq_quantize_batch(Ws, [j.hessian.H for j in job.batch], quant.bits, quant.group_size,
                                          quant.sym, quant.static_groups, quant.damp, quant.block_size,
                                          [w == 0 if bool((w == 0).any()) else None for w in Ws],
                                          search=scale_search(quant), alpha=quant.gptaq_alpha,
                                          dXXTs=crosses if quant.gptaq and None not in crosses else None)
            solved.update({j.full_name: r for j, r in zip(job.batch, results)})
        result = solved.pop(job.full_name, None)
        if result is None:
            result = quantize_linear(W.float(), job.hessian.H if job.hessian is not None else None, quant, job.cross)
        swept = time.perf_counter()
        set_weight_matrix(job.module, narrow(result.Q, W.dtype, job.full_name, "model.dtype", MODEL_DTYPE_HINT))
        packed[job.full_name] = pack_result(result, job.module)
        if refine is not None:
            kept[job.full_name] = result
        return {"gptq_error": result.error, "damp": result.damp_fraction,
                "sweep_seconds": swept - start, "pack_seconds": time.perf_counter() - swept}

    def refine_after(out: LayerOutputs) -> dict[str, Any]:
        """The layer's GPTQ results refined on its outputs (quant/refine.py) and packed again."""
        stats = refine_layer(out, kept, refine)
        for name, full in out.full_names.items():
            if full in kept:
                packed[full] = pack_result(kept.pop(full), out.linears[name])
        return stats

    windows = state.calibration() if quant.method == "gptq" else None
    calib_dtype = calibration_dtype(state.cfg.data.calib.dtype, state.device)
    calib_autocast = calibration_autocast(state.cfg.data.calib.dtype, state.device)
    if state.layer_checkpoint is not None:
        state.layer_checkpoint.track(packed)  # a resumed run gets the finished layers' packed tensors back
    profile: list[dict[str, Any]] = []
    # lazy: each layer read from the shards before its turn, written to the output when done
    with streamed_export(state, packed, quantization_config(quant), quant.bits, quant.group_size,
                         export_float_dtype(quant)) as stream:
        report = compress_model(state.model, windows, compressor, state.device, quant.true_sequential,
                                offload_activations=quant.offload_activations,
                                label=f"{quant.method} {quant.bits}-bit", skip=quant.skip, moe=state.cfg.moe,
                                min_coverage=state.cfg.min_coverage, profile=profile, stream=stream,
                                checkpoint=state.layer_checkpoint, paired=bool(quant.gptaq),
                                after_layer=refine_after if refine is not None else None,
                                reference_rows=None if refine is None else functools.partial(reference_rows, refine),
                                comm=state.comm.sharing(packed) if state.comm is not None else None,
                                dtype=calib_dtype, autocast=calib_autocast)
    kept.clear()  # (the ends below are not refined)
    end_report = []
    if stream is None:
        state.quantization_config = install_quantized(state.model, packed, quant)
        end_report = quantize_ends(state.model, quant, windows, state.device, compressor, packed)
        state.quantization_config.update(ends_config(state.model, quant))
    return {"method": quant.method, "bits": quant.bits, "group_size": quant.group_size, "layers": report,
            **({"ends": end_report} if end_report else {}),
            **record_coverage(state, report),
            **({"calibration": calibration_facts(calib_dtype, state.device, calib_autocast)}
               if windows is not None else {}),
            "profile": add_compressor_seconds(profile, report, ("sweep_seconds", "pack_seconds"))}
