"""The student's transformers config, derived from the teacher's: kept depth (per-layer lists
sliced), and for width/scratch students a smaller hidden size, head count and MLP."""
from __future__ import annotations

import copy
import math

from transformers import PretrainedConfig

from distill.capture import attention_shape
from distill.config import StudentConfig
from distill.moe import keep_sparse_pattern
from engine.errors import ShrinkError


def depth_config(config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The config with only `layers` (teacher indices) kept; per-layer lists are sliced too,
    and an MoE family's dense/MoE layer pattern follows the kept layers (distill/moe.py)."""
    teacher = config
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    keep_sparse_pattern(config, teacher, layers)
    return config


def scaled(value: int, hidden: int, teacher_hidden: int, multiple: int) -> int:
    return max(multiple, math.ceil(value * hidden / teacher_hidden / multiple) * multiple)


def student_config(teacher_config: PretrainedConfig, student: StudentConfig, layers: list[int]) -> PretrainedConfig:
    """The teacher's config with the student's depth, width, heads and MLP size.

    Unset sizes follow the hidden size: heads keep the teacher's head_dim, the MLP keeps
    the teacher's expansion ratio. Attributes a family lacks are left alone.
    """
    config = depth_config(teacher_config, layers)
    t_shape = attention_shape(teacher_config)
    hidden = student.hidden_size or teacher_config.hidden_size
    heads = student.num_heads or max(1, hidden // t_shape.head_dim)
    kv = student.num_kv_heads or (t_shape.num_kv_heads if heads % t_shape.num_kv_heads == 0 else heads)
    if heads % kv:
        raise ShrinkError(f"distill.student.num_heads={heads} is not a multiple of num_kv_heads={kv}")
    config.hidden_size = hidden
    config.num_attention_heads = heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv
    elif kv != heads:
        raise ShrinkError(f"distill.student.num_kv_heads: {config.model_type} has no grouped-query attention")
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = t_shape.head_dim  # explicit head_dim: heads * head_dim may differ from hidden
    elif hidden % heads:
        raise ShrinkError(f"distill.student.hidden_size={hidden} is not a multiple of num_heads={heads}")
    if getattr(config, "intermediate_size", None) is not None:
        config.intermediate_size = student.intermediate_size or scaled(
            teacher_config.intermediate_size, hidden, teacher_config.hidden_size, 32)
    elif student.intermediate_size is not None:
        raise ShrinkError(f"distill.student.intermediate_size: {config.model_type} has no intermediate_size")
    return config
