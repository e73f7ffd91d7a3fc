"""The `prune` pipeline stage: SparseGPT, Wanda or magnitude on every decoder Linear.

With `prune.joint_quant` the SparseGPT sweep also quantizes (quant.* settings) in the
same pass, and the model leaves this stage pruned AND quantized. With `prune.reconstruct`
the kept weights of every Linear are re-solved for its mask (prune/reconstruct.py) before
they are written back, whichever method chose the mask.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from prune.baselines import has_nm_pattern, magnitude_prune, wanda_prune
from prune.config import check_pattern_fits, parse_pattern
from prune.reconstruct import masked_least_squares
from prune.sparsegpt import sparsegpt_prune
from quant.export import export_float_dtype, install_quantized, quantization_config
from quant.streaming import streamed_export
from quant.gptq import rtn_quantize
from quant.pack import pack_result
from engine.calibration import (LinearJob, add_compressor_seconds, calibration_autocast, calibration_dtype,
                                calibration_facts, compress_model, record_coverage)
from engine.modeling import set_weight_matrix, weight_matrix
from engine.weights import MODEL_DTYPE_HINT, narrow

if TYPE_CHECKING:
    from engine.state import RunState

log = logging.getLogger(__name__)


def prune_stage(state: "RunState") -> dict[str, Any]:
    prune = state.cfg.prune
    n, m = parse_pattern(prune.pattern)
    quant = state.cfg.quant
    packed: dict[str, dict[str, torch.Tensor]] = {}
    if state.layer_checkpoint is not None:
        state.layer_checkpoint.track(packed)  # a resumed run gets the finished layers' packed tensors back

    def compressor(job: LinearJob) -> dict[str, Any]:
        start, pack_seconds = time.perf_counter(), 0.0
        W = weight_matrix(job.module)
        check_pattern_fits(job.full_name, W.shape[1], prune.pattern)  # (checked before loading where it can be)
        sparsity = float(prune.layer_sparsity.get(job.layer_index, prune.sparsity))
        stats: dict[str, Any] = {"sparsity_target": n / m if m else sparsity}
        if job.hessian is None:  # an expert with too few tokens: magnitude
            Wf = W.float()
            mask = magnitude_prune(Wf, sparsity, n, m)
            new = Wf.masked_fill(mask, 0.0)
            if prune.joint_quant:
                result = rtn_quantize(new, quant.bits, quant.group_size, quant.sym, mask=mask)
                new = result.Q
                packed[job.full_name] = pack_result(result, job.module)
        elif prune.method == "sparsegpt":
            joint = (dict(quant_bits=quant.bits, quant_group_size=quant.group_size, quant_sym=quant.sym)
                     if prune.joint_quant else {})
            result = sparsegpt_prune(W.float(), job.hessian.H, sparsity, n, m, prune.block_size, prune.damp, **joint)
            new, mask = (result.quant.Q if result.quant is not None else result.W), result.mask
            if result.quant is not None:
                pack_start = time.perf_counter()
                packed[job.full_name] = pack_result(result.quant, job.module)
                pack_seconds = time.perf_counter() - pack_start
            stats.update(obs_error=result.error, damp=result.damp_fraction)
        else:
            Wf = W.float()
            mask = (wanda_prune(Wf, job.hessian.input_norm(), sparsity, n, m) if prune.method == "wanda"
                    else magnitude_prune(Wf, sparsity, n, m))
            new = Wf.masked_fill(mask, 0.0)
        if prune.reconstruct and job.hessian is not None:
            rec = masked_least_squares(W.float(), job.hessian.H, mask, W=new, damp=prune.damp)
            new = rec.W
            stats.update(reconstruct_error_before=rec.error_before, reconstruct_error_after=rec.error_after,
                         reconstruct_iterations=rec.iterations, reconstruct_residual=rec.residual)
        set_weight_matrix(job.module, narrow(new, W.dtype, job.full_name, "model.dtype", MODEL_DTYPE_HINT))
        stats["sparsity"] = float((weight_matrix(job.module) == 0).float().mean())
        if m:
            stats["pattern_ok"] = has_nm_pattern(weight_matrix(job.module), n, m)
        stats.update(sweep_seconds=time.perf_counter() - start - pack_seconds, pack_seconds=pack_seconds)
        return stats

    windows = None if prune.method == "magnitude" and not prune.reconstruct else state.calibration()
    calib_dtype = calibration_dtype(state.cfg.data.calib.dtype, state.device)
    calib_autocast = calibration_autocast(state.cfg.data.calib.dtype, state.device)
    # Wanda reads only activation norms: no [cols, cols] Hessian for it unless reconstructing
    profile: list[dict[str, Any]] = []
    # lazy: each layer read from the shards before its turn, written to the output when done
    with streamed_export(state, packed, quantization_config(quant) if prune.joint_quant else None,
                         quant.bits, quant.group_size, export_float_dtype(quant)) as stream:
        report = compress_model(state.model, windows, compressor, state.device, prune.true_sequential,
                                offload_activations=quant.offload_activations, profile=profile,
                                label=f"{prune.method}{' + reconstruct' if prune.reconstruct else ''} {prune.pattern}",
                                full_hessian=prune.method != "wanda" or prune.reconstruct,
                                skip=prune.skip, moe=state.cfg.moe, min_coverage=state.cfg.min_coverage,
                                stream=stream, checkpoint=state.layer_checkpoint,
                                comm=state.comm.sharing(packed) if state.comm is not None else None,
                                dtype=calib_dtype, autocast=calib_autocast)
    # from the report, which a resumed run restores with the layers a killed run finished (and
    # which holds every rank's entries under torchrun)
    per_linear = {r["full_name"]: r["sparsity"] for r in report}
    if prune.joint_quant and stream is None:
        state.quantization_config = install_quantized(state.model, packed, quant)
    overall = sum(per_linear.values()) / max(len(per_linear), 1)
    result = {"method": prune.method, "pattern": prune.pattern, "reconstruct": prune.reconstruct,
              "sparsity_mean": overall, "per_linear": per_linear, "layers": report, **record_coverage(state, report),
              "profile": add_compressor_seconds(profile, report, ("sweep_seconds", "pack_seconds")),
              **({"calibration": calibration_facts(calib_dtype, state.device, calib_autocast)}
                 if windows is not None else {})}
    if m:
        result["pattern_ok"] = all(r.get("pattern_ok", False) for r in report)
    log.info("pruned: mean sparsity %.4f%s", overall, f", {n}:{m} pattern ok: {result['pattern_ok']}" if m else "")
    return result
