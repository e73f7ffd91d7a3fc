"""What the distill settings ask of the teacher's and the student's shapes, checked from their
configs: before any weights load (the pipeline's check, from config.json files) and again on
the loaded models (the stage, for a teacher a stage before it produced).

- distill.relation_heads must divide every Q and K/V width of both models (AKT only);
- distill.seq_len must not exceed either model's positions (max_position_embeddings), since
  positions past those were never trained (and learnt position tables have no row for them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transformers import AutoConfig, PretrainedConfig

from distill.architecture import depth_config, student_config
from distill.capture import attention_shape
from distill.plan import parse_loss
from distill.student import kept_layers
from engine.errors import ShrinkError, first_line
from engine.modeling import read_config


def check_shapes(distill: Any, configs: dict[str, PretrainedConfig]) -> None:
    """distill.relation_heads and distill.seq_len against the models' configs ({"teacher": ..., "student": ...})."""
    heads = distill.relation_heads
    for who, config in configs.items():
        positions = getattr(config, "max_position_embeddings", None)
        if positions and distill.seq_len > positions:
            raise ShrinkError(f"distill.seq_len={distill.seq_len} is beyond the {who}'s {positions} positions "
                              "(max_position_embeddings)")
        if "akt" not in parse_loss(distill.loss):
            continue
        shape = attention_shape(config)
        for what, width in (("Q", shape.q_width), ("K/V", shape.kv_width)):
            if heads <= 0 or width % heads:
                raise ShrinkError(f"distill.relation_heads={heads} does not divide the {who}'s {what} width {width}")


def student_shape(distill: Any, teacher: PretrainedConfig, trust_remote_code: bool = False) -> Optional[PretrainedConfig]:
    """The student's config as build_student will make it, without weights (None: a pretrained
    student whose folder is not there yet)."""
    student = distill.student
    if student.init == "pretrained":
        folder = Path(student.path or "").expanduser()
        if not (folder / "config.json").is_file():
            return None
        return folder_config(folder, "distill.student.path", trust_remote_code)
    n_teacher = teacher.num_hidden_layers
    if student.init == "scratch":
        return student_config(teacher, student, list(range(student.num_layers or n_teacher)))
    layers = kept_layers(student, n_teacher)
    return depth_config(teacher, layers) if student.init == "skip" else student_config(teacher, student, layers)


def check_distill_models(distill: Any, model_path: str, trust_remote_code: bool = False) -> None:
    """check_shapes before anything loads, when the teacher's folder is there (a GGUF import or
    an earlier stage may make it later: the stage checks the loaded models again)."""
    folder = Path(model_path).expanduser()
    if not (folder / "config.json").is_file():
        return
    teacher = folder_config(folder, "model.path", trust_remote_code)
    student = student_shape(distill, teacher, trust_remote_code)
    check_shapes(distill, {"teacher": teacher, **({"student": student} if student is not None else {})})


def folder_config(folder: Path, key: str, trust_remote_code: bool) -> PretrainedConfig:
    """A model folder's config, or one line naming `key` where config.json is not one
    (read_config's checks first: transformers' own errors name no setting)."""
    read_config(folder, key)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ShrinkError(f"{key}: {folder}: {first_line(exc)}") from None
