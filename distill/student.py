"""Student initialization: skip (keep teacher layers), width (Minitron pruning, distill/width.py),
pretrained (a separate smaller model) and scratch (random, of a chosen shape).

Every student leaves here in fp32 on the CPU, with a tokenizer identical to the teacher's
(checked by fingerprint), since logits and token-by-token relations only compare when
both models read the very same token ids.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distill.architecture import depth_config, student_config
from distill.capture import attention_shape
from distill.config import StudentConfig
from distill.layer_map import evenly_spaced
from distill.width import width_student
from engine.config import ModelConfig
from engine.data import tokenizer_fingerprint
from engine.errors import ShrinkError
from engine.modeling import count_parameters, find_decoder_layers, load_model

log = logging.getLogger(__name__)

INITS = ("skip", "width", "pretrained", "scratch")


@dataclass
class Student:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    report: dict[str, Any] = field(default_factory=dict)


def check_init(student: StudentConfig) -> None:
    if student.init not in INITS:
        raise ShrinkError(f"distill.student.init: unknown init {student.init!r} ({' | '.join(INITS)})")


def build_student(student: StudentConfig, teacher: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase,
                  calibration: Callable[[], torch.Tensor], seed: int = 0,
                  trust_remote_code: bool = False) -> Student:
    """The initialized student (fp32, CPU, train mode off) and the tokenizer it reads
    (s.init already checked by check_init, with the rest of the distill config)."""
    n_teacher = len(find_decoder_layers(teacher)[1])
    report: dict[str, Any] = {"init": student.init}
    tokenizer = teacher_tok
    if student.init == "pretrained":
        model, tokenizer, report["vocab"] = pretrained_student(student, teacher, teacher_tok, trust_remote_code)
        report["path"] = student.path
    elif student.init == "scratch":
        torch.manual_seed(seed)  # every rank of a distributed run builds the same student
        config = student_config(teacher.config, student, list(range(student.num_layers or n_teacher)))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        layers = kept_layers(student, n_teacher)
        report["teacher_layers"] = layers
        if student.init == "skip":
            model = skip_student(teacher, layers)
        else:
            model, report["width"] = width_student(teacher, student, layers, calibration()[: student.calib_samples])
    model = model.float().eval()
    report.update(shape_report(model))
    log.info("student (%s): %s", student.init, report)
    return Student(model, tokenizer, report)


def kept_layers(student: StudentConfig, n_teacher: int) -> list[int]:
    if student.layers is None:
        return evenly_spaced(student.num_layers or n_teacher, n_teacher)
    layers = [int(i) for i in student.layers]
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise ShrinkError(f"distill.student.layers: teacher layer {bad[0]} does not exist "
                          f"(the teacher has {n_teacher} layers, 0..{n_teacher - 1})")
    if student.num_layers is not None and student.num_layers != len(layers):
        raise ShrinkError(f"distill.student.layers lists {len(layers)} layers but num_layers={student.num_layers}")
    return layers


def shape_report(model: PreTrainedModel) -> dict[str, Any]:
    shape = attention_shape(model.config)
    return {"layers": len(find_decoder_layers(model)[1]), "hidden_size": model.config.hidden_size,
            "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "params": count_parameters(model)}


def skip_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Keep teacher layers `layers` (PKD / DistilBERT); embeddings, norms and head are copied."""
    prefix, _ = find_decoder_layers(teacher)
    student = AutoModelForCausalLM.from_config(depth_config(teacher.config, layers), dtype=torch.float32)
    source = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        teacher_name = name
        if name.startswith(prefix + "."):
            index, rest = name[len(prefix) + 1:].split(".", 1)
            teacher_name = f"{prefix}.{layers[int(index)]}.{rest}"
        if teacher_name not in source:  # a layer kind (dense / MoE) the student config did not reproduce
            raise ShrinkError(f"distill.student.layers: student weight {name} has no teacher counterpart "
                              f"{teacher_name} ({teacher.config.model_type} layers {layers})")
        state[name] = source[teacher_name]
    student.load_state_dict(state, strict=True)
    return student


def pretrained_student(student: StudentConfig, teacher: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase,
                       trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    if not student.path:
        raise ShrinkError("distill.student.path: init=pretrained needs the student's model folder")
    model, tokenizer = load_model(ModelConfig(path=str(Path(student.path).expanduser()), dtype="float32",
                                              trust_remote_code=trust_remote_code))
    if tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(teacher_tok):
        return model, teacher_tok, {"mapped": False}
    if not student.vocab_map:
        raise ShrinkError(
            f"distill.student.path: the student's tokenizer ({len(tokenizer)} tokens) differs from the "
            f"teacher's ({len(teacher_tok)} tokens); distillation compares the same token ids. Use a student "
            "with the teacher's tokenizer, or set distill.student.vocab_map=true to map its embeddings "
            "onto the teacher's vocabulary by token string")
    shared = map_vocabulary(model, tokenizer, teacher_tok, teacher.get_input_embeddings().weight.shape[0])
    log.info("student vocabulary mapped onto the teacher's: %d of %d tokens shared", shared, len(teacher_tok))
    return model, teacher_tok, {"mapped": True, "shared_tokens": shared, "teacher_tokens": len(teacher_tok)}


@torch.no_grad()
def map_vocabulary(model: PreTrainedModel, student_tok: PreTrainedTokenizerBase,
                   teacher_tok: PreTrainedTokenizerBase, rows: int) -> int:
    """Re-index the student's embedding (and untied head) to the teacher's token ids.

    A teacher token the student also knows (same string) gets the student's row; any
    other gets the mean row. Returns the number of shared tokens.
    """
    s_vocab = student_tok.get_vocab()
    pairs = [(tid, s_vocab[tok]) for tok, tid in teacher_tok.get_vocab().items() if tok in s_vocab and tid < rows]
    t_idx = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    s_idx = torch.tensor([s for _, s in pairs], dtype=torch.long)

    def remap(old: torch.Tensor) -> torch.Tensor:
        new = old.mean(0, keepdim=True).expand(rows, *old.shape[1:]).clone()
        new[t_idx] = old[s_idx]
        return new

    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    new_in = remap(model.get_input_embeddings().weight.data)
    new_out = None if head is None or tied else remap(head.weight.data)
    new_bias = None if head is None or getattr(head, "bias", None) is None else remap(head.bias.data)
    model.resize_token_embeddings(rows)
    model.get_input_embeddings().weight.data.copy_(new_in)
    head = model.get_output_embeddings()
    if new_out is not None:
        head.weight.data.copy_(new_out)
    if new_bias is not None:
        head.bias.data.copy_(new_bias)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(teacher_tok, key, None))
    return len(pairs)
