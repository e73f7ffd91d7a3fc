"""Runs the ordered stages of `pipeline.stages` on one model, in memory, and writes the
artifacts of ../shared/CONTRACT.md into `out`: metrics.json, recipe.yaml, model/.

A stage is a function `(RunState) -> dict`; its dict lands in metrics.json under the
stage's name. After a stage of MODIFYING, `state.changed` is set; export then writes
model/ through a temporary folder so a failure never leaves a partial one.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from engine.config import EvalSet, check_calib_dtype, eval_sets
from engine.data import token_stream, window_count
from engine.errors import ShrinkError
from engine.evaluation import measure
from engine.records import check_data_file
from engine.distributed_calib import CalibComm
from engine.files import atomic_folder, atomic_write_json
from engine.gguf_import import import_dir, import_gguf
from engine.metrics import peak_memory_bytes, size_metrics, size_parts, sparsity_report
from engine.modeling import check_model_folder, folder_size_bytes, load_tokenizer, resolve_device
from engine.recipe import check_fingerprints, config_digest, input_fingerprints, write_recipe
from engine.state import RunState
from prune.semi_structured import to_semi_structured
from quant.export import export_float_dtype
from shrink.model_folder import load_model, save_model_folder
from engine.streaming import measure_lazy
from shrink.lazy import discard, export_lazy, lazy_sparsity, lazy_wanted, open_lazy
from shrink.preflight import Need, check_run, ready_distill, ready_prune, ready_quantize
from shrink.resume import (RunFolder, check_same_inputs, inputs_digest, layer_checkpoint, read_progress,
                           remove_checkpoints, save_checkpoint, write_progress)
from shrink.tasks import check_tasks, run_tasks

log = logging.getLogger(__name__)


def evaluate(state: RunState, label: str) -> dict[str, dict[str, Any]]:
    """Each eval set's figures for state.model (2:4 kernels with eval.sparse_kernels): ppl,
    bits per byte and per character on the same windows, and windows evaluated of the total;
    and under "tasks" the lm-eval results of eval.tasks."""
    model = state.model
    if state.cfg.eval.sparse_kernels and label != "baseline":
        model = copy.deepcopy(state.model).to(state.device)  # sparse weights cannot be exported
        to_semi_structured(model)
    if state.lazy is None:
        model.to(state.device)
    figures = {}
    try:
        for eval_set in state.eval_sets():
            windows, total = state.eval_windows(eval_set)
            n, seq_len = windows.shape
            capped = f" (capped by {eval_set.key}.max_windows)" if n < total else ""
            log.info("%s: %s, %d of %d windows of %d tokens%s", label, eval_set.name, n, total, seq_len, capped)
            if state.lazy is not None:  # one decoder layer in memory at a time, over all windows
                m = measure_lazy(state.lazy, windows, state.cfg.eval.batch_size, state.device,
                                 f"{label} {eval_set.name}", state.text_lengths())
            else:
                mine = state.comm.shard(windows, f"{eval_set.key}.max_windows") if state.comm is not None else windows
                m = measure(model, mine, state.cfg.eval.batch_size, state.device, f"{label} {eval_set.name}",
                            state.text_lengths())
                if state.comm is not None:  # torchrun: each rank measured its share of the windows
                    m = state.comm.sum_measured(m, f"{label} {eval_set.name}")
            figures[eval_set.name] = {"ppl": m.ppl, "bits_per_byte": m.bits_per_byte,
                                      "bits_per_char": m.bits_per_char,
                                      "windows": {"evaluated": n, "total": total, "seq_len": seq_len},
                                      "tokens": m.tokens, "bytes": m.bytes, "chars": m.chars}
        on_rank0 = state.comm is None or state.comm.rank == 0  # lm-eval tasks are not split over ranks
        tasks = run_tasks(model, state.tokenizer, state.cfg, label) if state.cfg.eval.tasks and on_rank0 else None
    finally:
        if state.lazy is None:
            state.model.to("cpu")
    return {"sets": figures, "tasks": tasks}


FIGURES = ("ppl", "bits_per_byte", "bits_per_char")


def record(metrics: dict[str, Any], result: dict[str, Any], prefix: str = "") -> None:
    """metrics.json keys per eval set: ppl, bits_per_byte, bits_per_char (baseline_ for the input
    model) and eval_windows (how many of the file's windows were evaluated); tasks per task."""
    figures = result["sets"]
    for key in FIGURES:
        metrics.setdefault(prefix + key, {}).update({name: f[key] for name, f in figures.items()})
    metrics.setdefault("eval_windows", {}).update({name: f["windows"] for name, f in figures.items()})
    if result["tasks"] is not None:
        metrics[prefix + "tasks"] = result["tasks"]


def eval_stage(state: RunState) -> dict[str, Any]:
    result = evaluate(state, "eval")
    record(state.metrics, result)
    figures = result["sets"]
    for name, f in figures.items():
        bpb = f"{f['bits_per_byte']:.4f}" if f["bits_per_byte"] is not None else "-"
        log.info("%s: perplexity %.3f, %s bits per byte (%d of %d windows)", name, f["ppl"], bpb,
                 f["windows"]["evaluated"], f["windows"]["total"])
    return figures


def export_stage(state: RunState) -> dict[str, Any]:
    """Write out/model atomically (temp sibling folder, then rename)."""
    from shrink.card import model_card

    target = state.out / "model"
    if target.exists():
        raise ShrinkError(f"out: {target} already exists; choose another out")
    if state.lazy is not None:  # the streamed stage already wrote the weights, layer by layer
        state.metrics.update(size_metrics(state.model, folder_size_bytes(state.lazy.written or state.cfg.model.path)))
        state.metrics["sparsity"] = lazy_sparsity(state)
        export_lazy(state, target, model_card(state))
        log.info("exported %s", target)
        return {"path": str(target)}
    card = model_card(state)
    with atomic_folder(target) as tmp:
        save_model_folder(state.model, state.tokenizer, tmp, state.quantization_config,
                          export_float_dtype(state.cfg.quant))
        (tmp / "README.md").write_text(card)
    log.info("exported %s", target)
    if state.cfg.export.gguf:
        from quant.gguf_export import write_gguf

        log.info("exported %s", write_gguf(target, state.out / "model.gguf"))
        return {"path": str(target), "gguf": str(state.out / "model.gguf")}
    return {"path": str(target)}


def check_export(cfg: DictConfig) -> None:
    """export.gguf: a quantized model whose grids GGUF blocks hold, and (when the input's
    config.json is there to say) whose architecture, rope, routing and tokenizer GGUF holds."""
    if not cfg.export.gguf:
        return
    from quant.gguf_export import check_gguf_model, check_gguf_quant

    stages = list(cfg.pipeline.stages)
    if "quantize" not in stages and not ("prune" in stages and cfg.prune.joint_quant):
        raise ShrinkError("export.gguf: needs a quantized model (a pipeline with the quantize stage)")
    check_gguf_quant(cfg.quant)
    folder = Path(str(cfg.model.path)).expanduser()
    if (folder / "config.json").is_file() and "distill" not in stages and "pretrain" not in stages:
        import json

        try:
            config = json.loads((folder / "config.json").read_text())
        except ValueError:
            return  # the model folder check names the broken file
        check_gguf_model(config, folder, "export.gguf")


@dataclass(frozen=True)
class Stage:
    run: Callable[[RunState], dict[str, Any]]
    # Checks the stage's config section without a model: runs before anything is written.
    check: Optional[Callable[[DictConfig], None]] = None
    # The config keys of the input files the stage will read, each with the tokens it needs
    # from the file (0: not a token stream), checked before any model loads.
    inputs: Callable[[DictConfig], dict[str, Need]] = lambda cfg: {}
    # Checks that need the loaded model (shrink/preflight.py), run before anything is written.
    ready: Optional[Callable[[RunState], None]] = None


def stage_table() -> dict[str, Stage]:
    from distill.plan import check_distill_config
    from distill.shapes import check_distill_models
    from distill.stage import distill_stage, effective_config, pretrain_stage
    from distill.teacher import reloads_teacher
    from prune.config import check_prune_config
    from prune.stage import prune_stage
    from quant.config import check_quant_config, packs_ends
    from quant.stage import quantize_stage

    def check_prune(cfg: DictConfig) -> None:
        check_prune_config(cfg.prune)
        if cfg.prune.joint_quant:
            check_quant_config(cfg.quant)
            if packs_ends(cfg.quant):
                raise ShrinkError("quant.lm_head / quant.embed_bits: not with prune.joint_quant yet "
                                  "(use pipeline=prune_quantize without it)")

    def check_distill(cfg: DictConfig) -> None:
        check_distill_config(cfg.distill)
        stages = list(cfg.pipeline.stages)
        for stage in {"distill", "pretrain"} & set(stages):  # seq_len, relation heads against the configs
            check_distill_models(effective_config(cfg, stage == "pretrain"), cfg.model.path, cfg.model.trust_remote_code)
        before = stages[:stages.index("distill")] if "distill" in stages else []
        if reloads_teacher(cfg.distill.teacher) and MODIFYING & set(before):
            raise ShrinkError("distill.teacher: a device_map or 8/4-bit teacher is loaded again from model.path, "
                              "so distill must come before any stage that changes the model")

    def distill_inputs(cfg: DictConfig) -> dict[str, Need]:
        student = {"distill.student.path": Need()} if cfg.distill.student.init == "pretrained" else {}
        # training reads windows of train_path (default: the calibration file); a width student also calibrates
        train = Need(cfg.distill.seq_len, f"one window of distill.seq_len={cfg.distill.seq_len}")
        needs = {"data.eval.path": Need(), "distill.train_path" if cfg.distill.train_path else "data.calib.path": train}
        if cfg.distill.student.init == "width":
            needs["data.calib.path"] = max(needs.get("data.calib.path", Need()), calib_need(cfg))
        return {**needs, **student}

    def prune_inputs(cfg: DictConfig) -> dict[str, Need]:
        calibrates = cfg.prune.method != "magnitude" or cfg.prune.reconstruct or cfg.prune.joint_quant
        return {"data.calib.path": calib_need(cfg)} if calibrates else {}

    return {"distill": Stage(distill_stage, check_distill, distill_inputs, ready_distill),
            "prune": Stage(prune_stage, check_prune, prune_inputs, ready_prune),
            "quantize": Stage(quantize_stage, lambda cfg: check_quant_config(cfg.quant),
                              lambda cfg: {"data.calib.path": calib_need(cfg)} if cfg.quant.method == "gptq" else {},
                              ready_quantize),
            "pretrain": Stage(pretrain_stage, check_distill, distill_inputs, ready_distill),
            "eval": Stage(eval_stage, check_eval, lambda cfg: {"data.eval.path": Need()}),
            "export": Stage(export_stage, check_export)}


def calib_need(cfg: DictConfig) -> Need:
    """GPTQ's sampler draws windows of data.calib.seq_len from a longer stream."""
    return Need(cfg.data.calib.seq_len + 1, f"more than data.calib.seq_len={cfg.data.calib.seq_len}")


def check_eval(cfg: DictConfig) -> None:
    """The eval sets (typed, names unique, each with a complete window) and eval.sparse_kernels'
    needs, known before any stage runs or anything is written."""
    check_eval_windows(cfg, eval_sets(cfg.data.eval))
    check_tasks(cfg)
    if not cfg.eval.sparse_kernels:
        return
    if cfg.model.dtype not in ("float16", "bfloat16"):
        raise ShrinkError(f"eval.sparse_kernels: the 2:4 kernels run in float16/bfloat16, not "
                          f"model.dtype={cfg.model.dtype}")
    if resolve_device(cfg.model.device).type != "cuda":
        raise ShrinkError("eval.sparse_kernels: semi-structured 2:4 kernels need a CUDA GPU (model.device)")


def check_eval_windows(cfg: DictConfig, sets: list[EvalSet]) -> None:
    """Every eval file holds at least one complete window under the input model's tokenizer
    (tokenized once; the stream is cached for the run). Skipped while the model folder does
    not exist yet (a GGUF import), where the run checks it after importing."""
    folder = Path(cfg.model.path).expanduser()
    if cfg.model.gguf and not folder.exists():  # imported when the run starts
        return
    check_model_folder(folder)  # its own one-line errors before the tokenizer's
    for eval_set in sets:
        check_data_file(eval_set.path, f"{eval_set.key}.path")
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    for eval_set in sets:
        window_count(stream_of(cfg, tokenizer, eval_set.path, f"{eval_set.key}.path"), eval_set.seq_len, eval_set.key)


def stream_of(cfg: DictConfig, tokenizer: Any, path: str, key: str) -> torch.Tensor:
    """A data file read whole (every record checked, engine.records) and tokenized, from the cache when it can."""
    return token_stream(path, tokenizer, cfg.data.text_field, cfg.data.cache_dir, key=key)


def check_config(cfg: DictConfig) -> list[str]:
    """The pipeline's stages, after checking every stage's settings (ShrinkError if bad)."""
    table = stage_table()
    stages = list(cfg.pipeline.stages)
    unknown = [s for s in stages if s not in table]
    if unknown:
        raise ShrinkError(f"pipeline.stages: unknown stage {unknown[0]!r} (known: {', '.join(table)})")
    check_run(cfg, stages)
    check_calib_dtype(cfg.data.calib.dtype)
    for name in dict.fromkeys(stages):
        if table[name].check is not None:
            table[name].check(cfg)
    return stages


def check_inputs(cfg: DictConfig, stages: list[str]) -> None:
    """Every input file the stages will read exists and is of its format, and every data file
    they read as tokens is read whole (each record checked) and long enough: found now, before
    a model loads or `out` is made, not after the baseline or an hour of calibration."""
    table = stage_table()
    needs: dict[str, Need] = {}
    for name in stages:
        for key, need in table[name].inputs(cfg).items():
            needs[key] = max(needs.get(key, need), need)
    tokenizer = None
    for key, need in needs.items():
        if key == "data.eval.path":  # one eval set, a list or a named map of them
            for eval_set in eval_sets(cfg.data.eval):
                check_data_file(eval_set.path, f"{eval_set.key}.path")
            continue
        try:
            path = OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ShrinkError(f"{key}: not set (the {', '.join(stages)} pipeline reads it)") from None
        if key == "distill.student.path":
            check_model_folder(path, key)
            continue
        check_data_file(path, key)
        if need.tokens:
            tokenizer = tokenizer or load_tokenizer(Path(cfg.model.path).expanduser(), cfg.model.trust_remote_code)
            n = stream_of(cfg, tokenizer, path, key).numel()
            if n < need.tokens:
                raise ShrinkError(f"{key}: {n} tokens is too short ({need.tokens} needed: {need.why})")


MODIFYING = {"distill", "pretrain", "prune", "quantize"}


def run_pipeline(cfg: DictConfig, out: Path, comm: Optional[CalibComm] = None) -> dict[str, Any]:
    """Run cfg.pipeline.stages on cfg.model, writing metrics.json (and model/) into out.

    Everything that can be checked without a model (settings, input files, out) is checked
    first, and out is made only once the model has loaded: a bad input leaves nothing.
    With `comm` (rank 0 of a torchrun compression job) the other ranks run follow_pipeline.
    """
    stages = check_config(cfg)
    with RunFolder(out):  # locked; put back as it was if this fails before anything resumable exists
        return run_locked(cfg, out, stages, comm)


def run_locked(cfg: DictConfig, out: Path, stages: list[str], comm: Optional[CalibComm]) -> dict[str, Any]:
    digest = config_digest(cfg)
    progress = read_progress(out, digest, cfg.resume) or {"config_sha256": digest, "done": [], "seconds": {}}
    start = time.time()
    ensure_model(cfg, progress)
    check_inputs(cfg, stages)
    check_fingerprints(cfg)
    inputs = input_fingerprints(cfg)
    check_same_inputs(out, progress, inputs_digest(inputs))
    if comm is not None:
        comm.agree(progress, "the run's start")  # the other ranks load the same model
    state = load_state(cfg, out, progress, stages)
    state.comm = comm
    if comm is not None and state.lazy is not None:
        raise ShrinkError("model.lazy: streaming layers is not supported under torchrun yet; set model.lazy=false")
    check_ready(state, stages, progress)
    write_progress(out, progress)  # from here on out is a resumable run of this recipe
    write_recipe(cfg, out, inputs)
    seconds = progress["seconds"]
    if baseline_due(cfg, stages, progress):
        t = time.time()
        record(state.metrics, evaluate(state, "baseline"), "baseline_")
        seconds["baseline_eval"] = time.time() - t
        finish_step(state, progress, "baseline")
    try:
        run_stages(state, stages, progress, seconds)
        finalize_metrics(state, seconds, time.time() - start)
    finally:
        discard(state)  # a streamed stage's folder that no export took
    progress["finished"] = True
    write_progress(out, progress)
    remove_checkpoints(out)
    return state.metrics


def check_ready(state: RunState, stages: list[str], progress: dict[str, Any]) -> None:
    """The model-dependent checks of the stages still to run on the model as loaded: those up
    to and including the first that changes it (later ones see another model)."""
    table = stage_table()
    for i, name in enumerate(stages, 1):
        if f"{i}-{name}" in progress["done"]:
            continue
        if table[name].ready is not None:
            table[name].ready(state)
        if name in MODIFYING:
            return


def run_stages(state: RunState, stages: list[str], progress: dict[str, Any], seconds: dict[str, float]) -> None:
    table = stage_table()
    for i, name in enumerate(stages, 1):
        if f"{i}-{name}" in progress["done"]:
            log.info("stage %d/%d: %s (done in an earlier run, skipped)", i, len(stages), name)
            continue
        log.info("stage %d/%d: %s", i, len(stages), name)
        t = time.time()
        # per-layer checkpoints in one process (under torchrun every rank would have to restore its
        # share) of an in-memory model (a streamed run starts over: its layers live in the output shards)
        wanted = name in MODIFYING and state.comm is None and state.lazy is None
        state.layer_checkpoint = layer_checkpoint(state.out, f"{i}-{name}", progress) if wanted else None
        report = table[name].run(state)
        seconds[name] = time.time() - t
        state.metrics.setdefault("stages", {})[name] = report
        if name in MODIFYING:
            state.changed = True
            if i < len(stages) and state.lazy is None:  # a streamed stage's folder is its own output
                progress["checkpoint"] = save_checkpoint(state, i, name)
        finish_step(state, progress, f"{i}-{name}")
        if state.layer_checkpoint is not None:  # the stage's result is saved: its layers are not needed
            state.layer_checkpoint.remove()
            state.layer_checkpoint = None


def baseline_due(cfg: DictConfig, stages: list[str], progress: dict[str, Any]) -> bool:
    """The input model is evaluated first (eval.baseline, a model-changing pipeline with eval)."""
    return bool(cfg.eval.baseline and "eval" in stages and MODIFYING & set(stages)
                and "baseline" not in progress["done"])


def follow_pipeline(cfg: DictConfig, out: Path, comm: CalibComm) -> None:
    """Ranks > 0 of a torchrun compression job: the stages of rank 0's run_pipeline on the
    same model, joining its calibration and evaluation collectives; they write nothing."""
    stages = check_config(cfg)
    table = stage_table()
    progress = comm.agree(None, "the run's start")  # rank 0's, once its checks passed
    state = load_state(cfg, out, progress, stages)
    state.comm = comm
    if baseline_due(cfg, stages, progress):
        evaluate(state, "baseline")
    for i, name in enumerate(stages, 1):
        if f"{i}-{name}" not in progress["done"] and name != "export":
            table[name].run(state)
            state.changed = state.changed or name in MODIFYING


def load_state(cfg: DictConfig, out: Path, progress: dict[str, Any], stages: list[str]) -> RunState:
    """The model as the last finished stage left it (the input model for a fresh run); with
    model.lazy a skeleton whose layers stream from the shards (shrink/lazy.py)."""
    state = RunState(cfg=cfg, out=out, metrics=progress.get("metrics", {}))
    torch.manual_seed(cfg.seed)
    t = time.time()
    checkpoint = progress.get("checkpoint")
    model_cfg = OmegaConf.merge(cfg.model, {"path": str(out / checkpoint)}) if checkpoint else cfg.model
    folder = Path(str(model_cfg.path)).expanduser()
    if lazy_wanted(cfg, folder, stages):
        state.model, state.tokenizer, state.lazy = open_lazy(cfg, folder)
        if progress["done"]:  # no stage checkpoint holds what the earlier run computed
            log.info("model.lazy: a streamed run keeps no stage checkpoints; starting it over")
            progress.update(done=[], metrics={})
            state.metrics = {}
    else:
        state.model, state.tokenizer = load_model(model_cfg)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
        state.changed = True
        state.quantization_config = getattr(state.model.config, "quantization_config", None)
    progress["seconds"]["load"] = time.time() - t
    return state


def ensure_model(cfg: DictConfig, progress: dict[str, Any]) -> None:
    """Import the GGUF source if needed, then check the input model folder."""
    t = time.time()
    # Only the GGUF's own cache folder is filled by importing; any other model.path must exist.
    if cfg.model.gguf and Path(cfg.model.path).expanduser() == import_dir(cfg.model.gguf):
        import_gguf(cfg.model.gguf, cfg.model.path, torch.float16)
        progress["seconds"]["gguf_import"] = time.time() - t
    check_model_folder(cfg.model.path)


def finish_step(state: RunState, progress: dict[str, Any], step: str) -> None:
    progress["done"].append(step)
    progress["metrics"] = state.metrics
    write_progress(state.out, progress)


def finalize_metrics(state: RunState, seconds: dict[str, float], elapsed: float) -> None:
    metrics = state.metrics
    if "baseline_ppl" not in metrics and "ppl" in metrics and not state.changed:
        for key in FIGURES + ("tasks",):
            if key in metrics:
                metrics["baseline_" + key] = copy.deepcopy(metrics[key])
    exported = state.out / "model"
    size = folder_size_bytes(exported) if exported.is_dir() else folder_size_bytes(state.cfg.model.path)
    metrics.update(size_metrics(state.model, size))
    if exported.is_dir():
        metrics["size_parts"] = size_parts(state.model, exported)
    if state.lazy is None:
        metrics["sparsity"] = sparsity_report(state.model)["overall"]
    elif "sparsity" not in metrics or not exported.is_dir():  # the export measured it
        metrics["sparsity"] = lazy_sparsity(state)
    metrics["seconds"] = {**seconds, "total": elapsed}
    metrics["peak_memory_bytes"] = peak_memory_bytes()
    atomic_write_json(state.out / "metrics.json", metrics)


