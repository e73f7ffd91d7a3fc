"""The training engine: teacher-guided steps over a TrainPlan, with gradient accumulation,
bf16 autocast on GPUs, FSDP2 under torchrun, checkpoints that resume bit-exactly on CPU,
TensorBoard scalars and progress lines with tokens/s.

One micro-step: the student's forward (hooks record its Q/K/V), the teacher's forward
under no_grad when the phase needs it (hooks record its Q/K/V), then
    loss = w_lm LM + w_logit KD(T) + sum_l w_l AKT_l (+ w_router aux, MoE students)
computed in fp32 outside autocast, divided by grad_accum and backpropagated.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.capture import QKVCapture, head_reproduces_logits
from distill.chunked import HeadLosses, TopK, chunked_head_losses
from distill.train_state import check_resumable, latest_checkpoint, load_train_state, save_train_state
from distill.data import WindowSampler, sample_start
from distill.distributed import DistContext, full_state, shard, state_digest
from distill.losses import QKV, lm_loss, logit_kd_loss, qkv_relation_loss, topk_kd_loss
from distill.plan import Objective, TrainPlan
from distill.teacher import TopKCache
from engine.errors import ShrinkError
from engine.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class RunFiles:
    """Where a run keeps its training checkpoint and TensorBoard logs (None: nowhere)."""

    checkpoint: Optional[Path] = None
    tensorboard: Optional[Path] = None
    resume: bool = False
    settings_digest: str = ""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None
    stopped_at: Optional[int] = None
    weights_digests: list[str] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step this process ran

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_at(step: int, steps: int, distill: Any) -> float:
    """Linear warmup to distill.lr, then cosine decay to distill.lr * distill.min_lr_ratio, within one phase."""
    warmup = min(distill.warmup, max(steps - 1, 0))
    if step < warmup:
        return distill.lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(steps - warmup, 1)
    return distill.lr * (distill.min_lr_ratio + (1 - distill.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def make_optimizer(model: nn.Module, distill: Any) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": distill.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=distill.lr, betas=(0.9, 0.95))


def tensorboard_writer(folder: Optional[Path], step: int) -> Any:
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ShrinkError("distill.tensorboard=true needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter(str(folder), purge_step=step)


class Trainer:
    def __init__(self, student: PreTrainedModel, teacher: Optional[PreTrainedModel], teacher_device: torch.device,
                 sampler: WindowSampler, plan: TrainPlan, distill: Any, device: torch.device,
                 ctx: Optional[DistContext] = None, topk: Optional[TopKCache] = None,
                 vocab: Optional[int] = None) -> None:
        self.student, self.teacher, self.teacher_device = student, teacher, teacher_device
        self.sampler, self.plan, self.distill, self.device = sampler, plan, distill, device
        self.ctx = ctx or DistContext()
        self.topk, self.vocab = topk, vocab
        self.bf16 = use_bf16(distill.precision, device)
        self.chunked_head = False  # decided when training starts (captures)
        needs_teacher = any(p.objective.akt or (p.objective.logit and topk is None) for p in plan.phases)
        if needs_teacher and teacher is None:
            raise ShrinkError("distill: the loss needs the teacher, but none was given")

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def micro_loss(self, ids: torch.Tensor, start: int, objective: Objective, s_cap: QKVCapture,
                   t_cap: Optional[QKVCapture]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        router = {"output_router_logits": True} if objective.router else {}
        # chunked head terms: the models return one position's logits, the terms run the head themselves
        keep = {"logits_to_keep": 1} if self.chunked_head else {}
        with self.autocast():
            out = self.student(input_ids=ids, use_cache=False, **router, **keep)
        logits = out.logits
        terms: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []
        if objective.router:
            terms["router"] = out.aux_loss.float()
            weighted.append(objective.router * terms["router"])
        teacher_logits = None
        if objective.akt or (objective.logit and self.topk is None):
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids.to(self.teacher_device), use_cache=False, **keep).logits
        if self.chunked_head and (objective.lm or objective.logit):
            head = self.head_terms(ids, start, objective, s_cap, t_cap)
            weighted.append(head.total)
            terms.update({name: value for name, value in (("lm", head.lm), ("logit", head.logit)) if value is not None})
        else:
            terms.update(self.full_logit_terms(logits, teacher_logits, ids, start, objective))
            weighted += [w * terms[name] for name, w in (("lm", objective.lm), ("logit", objective.logit)) if w]
        block = self.distill.relation_block if self.distill.kernels == "blockwise" else None
        # one capture per teacher layer, however many student layers it guides (a deeper student)
        teacher_qkv = {t: t_cap.pop(t) for t in {self.plan.pairs[s] for s in objective.akt}}
        for s, w in objective.akt.items():
            t_qkv = QKV(*(a.to(self.device) for a in teacher_qkv[self.plan.pairs[s]]))
            terms[f"akt.{s}"] = qkv_relation_loss(t_qkv, s_cap.pop(s), self.distill.relation_heads,
                                                  self.distill.causal_relations, self.distill.relations, block)
            weighted.append(w * terms[f"akt.{s}"])
        s_cap.clear()
        if t_cap is not None:
            t_cap.clear()
        total = sum(weighted)
        if self.ctx.sharded and not (objective.lm or objective.logit):
            # FSDP2 re-gathers a layer's freed parameters for backward, and reduces its gradients,
            # from hooks on module outputs. With a loss on Q/K/V alone (progressive phases) the
            # outputs never reach the loss, so tie them to it with weight 0: same gradients,
            # every hook fires.
            total = total + 0.0 * logits.sum(dtype=torch.float32)
        return total, terms

    def full_logit_terms(self, logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], ids: torch.Tensor,
                         start: int, objective: Objective) -> dict[str, torch.Tensor]:
        """The LM and logit KD terms on the whole [B, T, V] logits (distill.kernels=naive, sharded runs,
        and heads that post-process their logits)."""
        terms: dict[str, torch.Tensor] = {}
        if objective.lm:
            terms["lm"] = lm_loss(logits, ids)
        if objective.logit:
            v = self.vocab or logits.shape[-1]
            if self.topk is not None:
                values, indices = self.topk.get(start, ids.shape[0])
                terms["logit"] = topk_kd_loss(logits[..., :v], values.to(self.device), indices.to(self.device),
                                              self.distill.temperature)
            else:
                terms["logit"] = logit_kd_loss(logits[..., :v], teacher_logits[..., :v].to(self.device),
                                               self.distill.temperature)
        return terms

    def head_terms(self, ids: torch.Tensor, start: int, objective: Objective, s_cap: QKVCapture,
                   t_cap: Optional[QKVCapture]) -> HeadLosses:
        """The LM and logit KD terms through the heads, distill.logit_chunk tokens at a time
        (distill/chunked.py): no [B, T, V] logits, of either model."""
        head = self.student.get_output_embeddings()
        teacher: Optional[Callable[[int, int], torch.Tensor]] = None  # the live teacher's logits of rows r0:r1
        top = None
        if objective.logit and self.topk is not None:
            top = TopK(*(t.to(self.device) for t in self.topk.get(start, ids.shape[0])))
        elif objective.logit:
            t_head = self.teacher.get_output_embeddings()
            t_hidden = t_cap.pop_final()
            t_flat = t_hidden.reshape(-1, t_hidden.shape[-1])

            def teacher_rows(r0: int, r1: int) -> torch.Tensor:
                with torch.no_grad():
                    return t_head(t_flat[r0:r1]).to(self.device)
            teacher = teacher_rows

        return chunked_head_losses(s_cap.pop_final(), head.weight, head.bias, ids, objective.lm, objective.logit,
                                   teacher, top, self.distill.temperature, self.vocab, self.distill.logit_chunk)

    def set_trainable(self, names: Optional[frozenset[str]]) -> None:
        for name, p in self.student.named_parameters():
            p.requires_grad_(names is None or name in names)

    @contextlib.contextmanager
    def captures(self) -> Iterator[tuple[QKVCapture, Optional[QKVCapture]]]:
        """Q/K/V of the mapped layers of both models, and the LM heads' inputs for chunked head terms."""
        s_layers = sorted({s for p in self.plan.phases for s in p.objective.akt})
        self.chunked_head = self.head_chunks_apply()
        t_final = self.chunked_head and self.topk is None and any(p.objective.logit for p in self.plan.phases)
        with QKVCapture(self.student, s_layers, final=self.chunked_head) as s_cap:
            if self.teacher is None:
                yield s_cap, None
                return
            with QKVCapture(self.teacher, [self.plan.pairs[s] for s in s_layers], final=t_final) as t_cap:
                yield s_cap, t_cap

    def head_chunks_apply(self) -> bool:
        """Whether the LM and logit KD terms run through the heads in token chunks (distill.kernels=
        blockwise): not for models whose logits are more than their head's output, nor for sharded
        students (tried: a joint FSDP2 run matches a single process, but after progressive phases the
        final norm's gradients do not, so FSDP2's hooks need more care than the head's input gives)."""
        terms = [p.objective for p in self.plan.phases if p.objective.lm or p.objective.logit]
        if self.distill.kernels != "blockwise" or self.ctx.sharded or not terms:
            return False
        models = [(self.student, self.device)]
        if self.topk is None and any(o.logit for o in terms):
            models.append((self.teacher, self.teacher_device))
        fits = isinstance(self.student.get_output_embeddings(), nn.Linear) and all(
            head_reproduces_logits(m, d) for m, d in models)
        if fits:
            log.info("distill: the LM and logit KD terms run through the heads, %d tokens at a time",
                     self.distill.logit_chunk)
        else:
            log.warning("distill: the LM head's output is not the model's logits; the LM and logit KD terms "
                        "use the whole [batch, seq_len, vocab] logits")
        return fits

    def step(self, step: int, objective: Objective, optimizer: torch.optim.Optimizer, lr: float,
             s_cap: QKVCapture, t_cap: Optional[QKVCapture]) -> dict[str, float]:
        distill = self.distill
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        for micro in range(distill.grad_accum):
            start = sample_start(step, micro, self.ctx.rank, distill.grad_accum, self.ctx.world, distill.batch_size)
            ids = self.sampler.samples(start, distill.batch_size).to(self.device)
            total, terms = self.micro_loss(ids, start, objective, s_cap, t_cap)
            (total / distill.grad_accum).backward()
            s_cap.clear()  # what the hooks saw again while a checkpointed backward recomputed the layers
            for name, value in {"loss": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / distill.grad_accum
        if distill.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.grad is not None],
                                                  distill.grad_clip)
            sums["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        averaged = self.ctx.mean(torch.tensor([sums[n] for n in names], dtype=torch.float64))
        return dict(zip(names, averaged.tolist()))

    def run(self, files: RunFiles, stop_at: Optional[int] = None) -> TrainResult:
        """Train to the plan's end (or through step `stop_at`, leaving a checkpoint)."""
        distill, plan = self.distill, self.plan
        self.student.train()
        self.set_trainable(None)
        # sharded: shard() copies the student on the CPU first and fully_shard moves each rank's
        # shards to the mesh's device, so no rank ever holds two full copies on its GPU
        self.checkpointing(distill.activation_checkpointing)
        shell = shard(self.student, self.ctx)
        if shell is None:
            self.student.to(self.device)
        optimizer = make_optimizer(self.student, distill)
        start, history, resumed, spent = self.restore(files, optimizer)
        writer = tensorboard_writer(files.tensorboard, start) if self.ctx.main else None
        end = plan.total_steps if stop_at is None else min(stop_at, plan.total_steps)
        tokens_per_step = distill.batch_size * distill.grad_accum * self.ctx.world * self.sampler.seq_len
        progress = Progress("distill" if not resumed else f"distill (resumed at step {start})", end - start, "tok")
        t0 = time.time()
        step_seconds: list[float] = []
        phase_index = -1
        with self.captures() as (s_cap, t_cap):
            for step in range(start, end):
                index, in_phase = plan.phase_at(step)
                phase = plan.phases[index]
                if index != phase_index:
                    first = step - in_phase
                    log.info("distill phase %s: steps %d..%d", phase.name, first, first + phase.steps)
                    self.set_trainable(phase.trainable)
                    phase_index = index
                lr = lr_at(in_phase, phase.steps, distill)
                began = time.perf_counter()
                record = self.step(step, phase.objective, optimizer, lr, s_cap, t_cap)
                step_seconds.append(time.perf_counter() - began)
                progress.update(1, tokens_per_step, extra=f"{phase.name} loss {record['loss']:.4f} lr {lr:.2e}")
                done = step + 1
                if done % distill.log_every == 0 or done == plan.total_steps:
                    history.append({"step": done, "lr": lr, **record})
                    if writer is not None:
                        for name, value in record.items():
                            writer.add_scalar(f"distill/{name}", value, done)
                        writer.add_scalar("distill/lr", lr, done)
                every = distill.checkpoint_every
                if files.checkpoint and ((every and done % every == 0) or done == stop_at):
                    meta = {"step": done, "history": history, "seconds": spent + time.time() - t0,
                            "settings": files.settings_digest}
                    save_train_state(files.checkpoint, self.student, optimizer, meta, self.ctx)
        if writer is not None:
            writer.close()
        self.set_trainable(None)
        seconds = spent + time.time() - t0
        result = TrainResult(steps=end, tokens=end * tokens_per_step, seconds=seconds, history=history,
                             resumed_from=start if resumed else None,
                             stopped_at=end if end < plan.total_steps else None, step_seconds=step_seconds)
        self.finish(shell, result)
        return result

    def checkpointing(self, on: bool) -> None:
        """distill.activation_checkpointing: non-reentrant, so the Q/K/V the hooks capture during
        the forward stay in the autograd graph (a reentrant checkpoint runs it without grad)."""
        if not on:
            return
        if not getattr(self.student, "supports_gradient_checkpointing", False):
            raise ShrinkError(f"distill.activation_checkpointing: {type(self.student).__name__} does not support "
                              "gradient checkpointing")
        self.student.activation_checkpointing_enable({"use_reentrant": False})

    def restore(self, files: RunFiles, optimizer: torch.optim.Optimizer) -> tuple[int, list, bool, float]:
        """(first step, history, resumed?, seconds already spent) from a checkpoint if resuming."""
        folder = latest_checkpoint(files.checkpoint) if files.resume and files.checkpoint else None
        if folder is None:
            return 0, [], False, 0.0
        check_resumable(folder, files.settings_digest)
        meta = load_train_state(folder, self.student, optimizer)
        log.info("distill: resuming from step %d (%s)", meta["step"], folder)
        return meta["step"], meta["history"], True, meta["seconds"]

    def finish(self, shell: Optional[nn.Module], result: TrainResult) -> None:
        """Leave the plain (unsharded) student in self.student, in eval mode, on the CPU.

        Sharded runs gather the full weights on every rank and record each rank's digest,
        so a report shows that the replicas agree bit for bit.
        """
        if getattr(self.student, "is_activation_checkpointing", False):
            self.student.activation_checkpointing_disable()
        if shell is not None:
            state = full_state(self.student, self.ctx, everywhere=True)
            result.weights_digests = self.ctx.gather_strings(state_digest(state))
            shell.load_state_dict(state)
            self.student = shell
        self.student.to("cpu").eval()
