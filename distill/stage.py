"""The `distill` and `pretrain` pipeline stages.

`distill` receives the TEACHER in state.model, builds the student (distill.student.init),
trains it against the teacher (distill.loss, layer_map, schedule) and leaves the STUDENT
in state.model (CPU, eval mode) for the stages after it. `pretrain` trains the student
with the LM loss alone (no teacher forward: the teacher only lends its config and
tokenizer), which is how Yuan 1.0 built its students (pipeline=pretrain, init=scratch).

Under torchrun (`torchrun -m shrink`) rank 0 runs the pipeline and calls these stages; the other
ranks join only the training, through `run_training` with the same config.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from distill.data import WindowSampler
from distill.distributed import DistContext, local_device
from distill.layer_map import parse_layer_map
from distill.moe import router_weight
from distill.plan import TrainPlan, make_train_plan
from distill.shapes import check_shapes
from distill.student import Student, build_student, shape_report
from distill.teacher import TopKCache, prepare_teacher, teacher_vocab_check
from distill.trainer import RunFiles, Trainer, TrainResult
from engine import data as data_mod
from engine.errors import ShrinkError
from engine.evaluation import perplexity
from engine.modeling import find_decoder_layers, resolve_device, resolve_dtype
from engine.weights import MODEL_DTYPE_HINT, check_narrowing
from engine.recipe import config_digest

if TYPE_CHECKING:
    from engine.state import RunState

log = logging.getLogger(__name__)


def distill_stage(state: "RunState") -> dict[str, Any]:
    return train_stage(state, pretrain=False)


def pretrain_stage(state: "RunState") -> dict[str, Any]:
    return train_stage(state, pretrain=True)


def train_stage(state: "RunState", pretrain: bool) -> dict[str, Any]:
    """Build and train the student; replace the teacher by it in `state`."""
    announce_to_workers(state, "pretrain" if pretrain else "distill")
    student, report, _ = run_training(state, pretrain, evaluate_init=state.cfg.distill.eval_init)
    dtype = resolve_dtype(state.cfg.model.dtype)  # the trained student, in the run's dtype if it fits
    check_narrowing(student.model.state_dict().items(), dtype, "model.dtype", MODEL_DTYPE_HINT)
    state.model = student.model.to(dtype)
    state.tokenizer = student.tokenizer
    return report


def announce_to_workers(state: "RunState", stage: str) -> None:
    """Rank 0 tells the waiting workers of shrink.launch to join this stage's training."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if state.changed:
        raise ShrinkError("distill under torchrun must be the first stage that changes the model "
                          "(the other ranks load the teacher from model.path)")
    from distill.distributed import send

    send(stage)


def effective_config(cfg: Any, pretrain: bool) -> Any:
    """cfg.distill, with pretraining's fixed choices (LM loss only, one joint phase)."""
    distill = cfg.distill
    return OmegaConf.merge(distill, {"loss": "lm", "schedule": "joint"}) if pretrain else distill


def run_training(state: "RunState", pretrain: bool, evaluate_init: bool = False) -> tuple[Student, dict, TrainResult]:
    """Everything but the hand-over: checks, student init, teacher placement, training."""
    cfg = state.cfg
    distill = effective_config(cfg, pretrain)
    device = local_device(resolve_device(distill.device or cfg.model.device))
    ctx = DistContext.current(device)
    student = build_student(distill.student, state.model, state.tokenizer, state.calibration, cfg.seed,
                            cfg.model.trust_remote_code)
    n_student = len(find_decoder_layers(student.model)[1])
    n_teacher = len(find_decoder_layers(state.model)[1])
    pairs = [] if pretrain else parse_layer_map(distill.layer_map, n_student, n_teacher)
    plan = make_train_plan(distill, pairs, student.model)
    check_shapes(distill, {"teacher": state.model.config, "student": student.model.config})
    train_path = distill.train_path or cfg.data.calib.path
    stream = data_mod.token_stream(train_path, student.tokenizer, cfg.data.text_field, cfg.data.cache_dir,
                                   key="distill.train_path")
    sampler = WindowSampler(stream, distill.seq_len, cfg.seed)
    report: dict[str, Any] = {"student": student.report, "teacher": shape_report(state.model),
                              "loss": distill.loss, "schedule": distill.schedule, "layer_map": [list(p) for p in pairs],
                              "phases": [{"name": p.name, "steps": p.steps} for p in plan.phases],
                              "router_aux_weight": router_weight(distill, student.model),
                              "world_size": ctx.world}
    if evaluate_init and ctx.main:
        report["init_ppl"] = evaluate(state, student, device)
    teacher, teacher_device, topk = None, device, None
    if needs_teacher(plan, distill):
        teacher, teacher_device = prepare_teacher(state.model, distill.teacher, cfg.model, device)
        topk = (topk_cache(distill, cfg, teacher, teacher_device, sampler, plan, ctx)
                if distill.teacher.topk_logits > 0 else None)
    trainer = Trainer(student.model, teacher, teacher_device, sampler, plan, distill, device, ctx, topk,
                      vocab=None if teacher is None else teacher_vocab_check(teacher, student.model))
    files = RunFiles(checkpoint=state.out / "checkpoints" / ("pretrain-train" if pretrain else "distill-train"),
                     tensorboard=state.out / "tensorboard" if distill.tensorboard else None,
                     resume=bool(cfg.resume), settings_digest=config_digest(cfg))
    result = trainer.run(files)
    student.model = trainer.student
    report.update(train_report(result))
    return student, report, result


def needs_teacher(plan: TrainPlan, distill: Any) -> bool:
    return any(p.objective.akt or p.objective.logit for p in plan.phases)


def topk_cache(distill: Any, cfg: Any, teacher: Any, device: torch.device, sampler: WindowSampler, plan: TrainPlan,
               ctx: DistContext) -> TopKCache:
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else data_mod.default_cache_dir()
    folder = TopKCache.folder_for(root, cfg.model.path, str(distill.teacher.dtype or cfg.model.dtype),
                                  sampler.windows.flatten(), distill.seq_len, cfg.seed, distill.teacher.topk_logits)
    cache = TopKCache(folder, distill.teacher.topk_logits)
    num_samples = plan.total_steps * distill.grad_accum * ctx.world * distill.batch_size
    cache.build(teacher, device, sampler, num_samples, distill.batch_size, ctx,
                chunk=distill.logit_chunk if distill.kernels == "blockwise" else None)
    return cache


def evaluate(state: "RunState", student: Student, device: torch.device) -> float:
    windows, _ = state.eval_windows()
    student.model.to(device)
    try:
        return perplexity(student.model, windows, state.cfg.eval.batch_size, device, "student init")
    finally:
        student.model.to("cpu")


def train_report(result: TrainResult) -> dict[str, Any]:
    report = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
              "tokens_per_s": result.tokens_per_s, "history": result.history,
              "final": result.history[-1] if result.history else {}, "step_seconds": result.step_seconds}
    if result.resumed_from is not None:
        report["resumed_from"] = result.resumed_from
    if result.weights_digests:
        report["weights_digests"] = result.weights_digests
    return report
