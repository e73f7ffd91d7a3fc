"""Typed schemas of the engine's own config groups: model, data, eval and pipeline.

The stage groups (quant, prune, distill) keep their schemas next to their code; the
application (shrink/config.py) aggregates them all into one tree for Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Top-level keys of a run's config that say where and how it runs, not what it computes: the
# config digest (resume, recipe re-runs) and the report's setting columns leave them out.
VOLATILE = ("out", "resume", "log_level", "fingerprints")


def without_volatile(plain: dict[str, Any]) -> dict[str, Any]:
    """A config as a plain dict, without its VOLATILE keys: the settings that change the result."""
    return {key: value for key, value in plain.items() if key not in VOLATILE}


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
