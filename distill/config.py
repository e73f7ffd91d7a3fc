"""Schema of the `distill` config group (AKT distillation and student pretraining)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.config import FRACTION, NON_NEGATIVE, POSITIVE, Range


@dataclass
class StudentConfig:
    init: str = "pretrained"  # skip | width | pretrained | scratch
    path: Optional[str] = None  # for init=pretrained
    num_layers: Optional[int] = None  # for skip / width / scratch (None: the teacher's)
    hidden_size: Optional[int] = None  # for width / scratch (None: the teacher's)
    layers: Optional[list[int]] = None  # explicit teacher layers to keep (skip, width)
    num_heads: Optional[int] = None  # width / scratch (None: teacher's, scaled by hidden size)
    num_kv_heads: Optional[int] = None  # width / scratch (None: teacher's)
    intermediate_size: Optional[int] = None  # width / scratch (None: teacher's, scaled by hidden size)
    calib_samples: int = 32  # width: calibration windows (of data.calib) for the importance scores
    # A pretrained student with another tokenizer is refused unless this maps its embedding
    # rows onto the teacher's vocabulary by token string (it then uses the teacher's tokenizer).
    vocab_map: bool = False


@dataclass
class LossWeights:
    lm: float = 1.0  # w_lm, next-token cross-entropy on the data
    logit: float = 1.0  # w_logit, KL(teacher || student) of the temperature-scaled logits
    akt: float = 1.0  # sum of the per-layer AKT weights w_l
    layers: Optional[list[float]] = None  # relative w_l per mapped layer (None: equal shares)


@dataclass
class TeacherConfig:
    dtype: Optional[str] = None  # None: model.dtype
    device: Optional[str] = None  # None: the student's device
    # "auto" | "balanced" | ...: shard the teacher across GPUs (accelerate), or a JSON file of
    # module -> device such as the device_map.json of `shrink plan`
    device_map: Optional[str] = None
    load_in_8bit: bool = False  # bitsandbytes teacher (CUDA only)
    load_in_4bit: bool = False
    topk_logits: int = 0  # > 0: offline cache of the teacher's top-k logits for the logit term


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    # Loss terms joined by "+": akt (= akt+logits, Yuan's recipe) | logits | lm | e.g. akt+logits+lm
    loss: str = "akt"
    layer_map: str = "uniform"  # uniform | last | last:K | explicit "0:1,1:3,..."
    steps: int = 200  # optimizer steps (joint schedule; the final stage of progressive)
    weights: LossWeights = field(default_factory=LossWeights)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    temperature: float = 1.0
    relation_heads: int = 8  # R: Q/K/V widths of both models must be divisible by it
    causal_relations: bool = True  # mask relations to later tokens
    # Which relations AKT transfers, any of q, k, v (Yuan: all three). A separately pretrained
    # student pays for Q/K relations it must unlearn; V alone costs it nothing (docs/results.md, Distillation).
    relations: str = "qkv"
    # Loss kernels: blockwise (memory linear in seq_len: the relations relation_block rows at a
    # time, the LM and logit KD terms through the LM head logit_chunk tokens at a time) | naive
    # (the whole [T, T] relations and [T, V] logits; the reference, memory quadratic in seq_len)
    kernels: str = "blockwise"
    relation_block: int = 64  # rows of the [T, T] relations per block (memory: R T block floats)
    logit_chunk: int = 256  # tokens per chunk through the LM head (memory: a few chunk x vocab floats)
    # Recompute each student decoder layer's activations in backward instead of keeping them
    # (transformers' gradient checkpointing, non-reentrant): less memory, about one more student forward
    activation_checkpointing: bool = False
    schedule: str = "joint"  # joint | progressive (one AKT stage per mapped layer, then joint)
    progressive_steps: Optional[int] = None  # steps per layer stage (None: steps)
    train_path: Optional[str] = None  # training corpus (None: data.calib.path)
    seq_len: int = 512
    batch_size: int = 8  # windows per micro-batch and process
    grad_accum: int = 1
    lr: float = 3.0e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 20  # linear warmup steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: off
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: Optional[str] = None  # the student's device (None: model.device)
    checkpoint_every: int = 100  # steps between training checkpoints (0: none); resume=true goes on
    log_every: int = 10  # steps between loss records (metrics + TensorBoard)
    tensorboard: bool = False  # write out/tensorboard (needs the tensorboard package)
    eval_init: bool = False  # also report the initialized student's perplexity
    # MoE students: weight of the router load-balancing loss (None: the student config's
    # router_aux_loss_coef, 0 for dense students; 0: off). distill/moe.py
    router_aux_weight: Optional[float] = None


# Every numeric key's range (engine.config.check_ranges, from check_distill_config): steps=0 would
# export the untrained student as a distilled one.
RANGES: dict[str, Range] = {
    "steps": POSITIVE, "progressive_steps": POSITIVE, "seq_len": Range(2), "batch_size": POSITIVE,
    "grad_accum": POSITIVE, "lr": POSITIVE, "min_lr_ratio": FRACTION, "warmup": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "temperature": POSITIVE, "relation_heads": POSITIVE,
    "relation_block": POSITIVE, "logit_chunk": POSITIVE,
    "checkpoint_every": NON_NEGATIVE, "log_every": POSITIVE, "router_aux_weight": NON_NEGATIVE,
    "weights.lm": NON_NEGATIVE, "weights.logit": NON_NEGATIVE, "weights.akt": NON_NEGATIVE,
    "teacher.topk_logits": NON_NEGATIVE, "student.calib_samples": POSITIVE,
    **{f"student.{key}": POSITIVE for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                              "intermediate_size")},
}
