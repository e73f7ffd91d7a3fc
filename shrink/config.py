"""Typed schemas of the top-level config and of the model/data/eval/pipeline groups.

The stage groups (quant, prune, distill) keep their schemas next to their code.
`register_configs` puts the whole tree into Hydra's ConfigStore so every YAML preset
in conf/ is type-checked when composed; it is called by the CLI, never at import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from distill.config import DistillConfig
from prune.config import PruneConfig
from quant.config import QuantConfig


@dataclass
class ModelConfig:
    path: str = "???"
    # A GGUF file (path, or "pkg:<python package>/<file>") imported once into `path`
    # as safetensors when `path` does not exist yet.
    gguf: Optional[str] = None
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "cpu"  # cpu | cuda | auto
    trust_remote_code: bool = False


@dataclass
class CalibDataConfig:
    path: str = "???"
    num_samples: int = 128
    seq_len: int = 512


@dataclass
class EvalDataConfig:
    path: str = "???"
    name: Optional[str] = None  # key in metrics.json; default: the file's stem
    seq_len: int = 512
    max_windows: Optional[int] = None  # evaluate only the first N windows (None: all)


@dataclass
class DataConfig:
    calib: CalibDataConfig = field(default_factory=CalibDataConfig)
    eval: EvalDataConfig = field(default_factory=EvalDataConfig)
    text_field: str = "text"
    cache_dir: Optional[str] = None  # tokenization cache; default ~/.cache/shrink


@dataclass
class EvalConfig:
    baseline: bool = True  # also evaluate the input model (baseline_ppl)
    batch_size: int = 4
    # CUDA only: run 2:4-pruned Linears on semi-structured sparse kernels when evaluating.
    sparse_kernels: bool = False


@dataclass
class PipelineConfig:
    name: str = "eval"
    stages: list[str] = field(default_factory=lambda: ["eval"])


@dataclass
class ShrinkConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    seed: int = 0
    out: Optional[str] = None  # artifact folder; default: the Hydra run directory
    resume: bool = False
    log_level: str = "INFO"
    # Written into recipe.yaml (input sha256, package versions); checked when a recipe is re-run.
    fingerprints: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schema so `defaults: [shrink_schema, ...]` in conf/config.yaml types it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="shrink_schema", node=ShrinkConfig)
