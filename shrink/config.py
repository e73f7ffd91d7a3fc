"""The whole config tree (the engine's groups plus each stage's schema) and Hydra's glue.

Each group's schema lives next to the code it configures (engine/config.py, quant/config.py, ...).
`register_configs` puts the whole tree into Hydra's ConfigStore so every YAML preset
in conf/ is type-checked when composed; it is called by the CLI, never at import.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from distill.config import DistillConfig
from engine.errors import ShrinkError
from engine.config import DataConfig, EvalConfig, ExportConfig, ModelConfig, MoeConfig, PipelineConfig
from prune.config import PruneConfig
from quant.config import QuantConfig


@dataclass
class ShrinkConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    out: Optional[str] = None  # artifact folder; default: the Hydra run directory
    resume: bool = False
    # A compressing stage that would reach less than this share of the decoder-layer weights
    # fails before changing anything, naming what it cannot handle.
    min_coverage: float = 0.9
    log_level: str = "INFO"
    # Written into recipe.yaml (input sha256, package versions); checked when a recipe is re-run.
    fingerprints: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schema so `defaults: [shrink_schema, ...]` in conf/config.yaml types it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="shrink_schema", node=ShrinkConfig)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Import-time chatter of optional packages that says nothing about this run: torchao (pulled
# in by gptqmodel, imported by transformers) reports its CUDA-only extensions as "Failed to
# load" on CPU, and torch's pytree warns about torchao's Enum registrations.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Raise the known-noisy third-party loggers to ERROR (their real errors still show)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def asset_path(name: str) -> str:
    """OmegaConf resolver ${asset:NAME}: a data file shipped inside the package."""
    return str(Path(__file__).parent / "assets" / name)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    from engine.gguf_import import import_dir

    OmegaConf.register_new_resolver("asset", asset_path, replace=True)
    OmegaConf.register_new_resolver("gguf_dir", lambda spec: str(import_dir(spec)), replace=True)


def compose(overrides: Sequence[str], config_dir: Path | str = CONF_DIR, config_name: str = "config",
            jobs: Optional[Sequence[Sequence[str]]] = None) -> Any:
    """The config(s) the CLI composes: schema and resolvers registered, Hydra's own compose API.

    With `jobs`, one config per job (each job's overrides after the shared ones) is returned
    as a list; Hydra's errors become one ShrinkError line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfgs = [hydra_compose(config_name=config_name, overrides=list(overrides) + list(job))
                    for job in (jobs if jobs is not None else [[]])]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ShrinkError(hydra_error_message(exc)) from None
    for cfg in cfgs:
        check_known_keys(cfg)
    return cfgs if jobs is not None else cfgs[0]


def check_known_keys(cfg: Any) -> None:
    """Refuse keys the schema does not have: `+key=value` adds them past Hydra's struct
    check, so a typo (`+quant.bitz=4`) would otherwise run with the default silently."""
    from omegaconf import OmegaConf

    unknown = unknown_keys(cfg, OmegaConf.structured(ShrinkConfig))
    if unknown:
        key, known = unknown[0]
        close = difflib.get_close_matches(key.rpartition(".")[2], known, n=1)
        hint = f"; did you mean {key.rpartition('.')[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
        raise ShrinkError(f"{key}: unknown key (not in the config schema){hint}")


def unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the keys known there) of every key in node that schema lacks; free-form
    dict fields of the schema (e.g. fingerprints) take any key."""
    from omegaconf import DictConfig, OmegaConf

    found: list[tuple[str, list[str]]] = []
    known = [str(k) for k in schema.keys()]
    for key in node.keys():
        if str(key) not in known:
            found.append((f"{prefix}{key}", known))
            continue
        child, spec = node._get_node(key), schema._get_node(key)
        if isinstance(child, DictConfig) and isinstance(spec, DictConfig) and not spec._is_none() \
                and not child._is_none() and OmegaConf.get_type(spec) not in (dict, None):
            found += unknown_keys(child, spec, f"{prefix}{key}.")
    return found


def hydra_error_message(exc: BaseException) -> str:
    """Hydra's message and its cause (e.g. "could not be converted to Integer") on one line,
    without OmegaConf's full_key/reference_type/object_type trailer."""
    lines = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ else [])
    return "; ".join(line.strip() for text in lines for line in text.splitlines()
                     if line.strip() and not line.strip().startswith(("full_key", "reference_type", "object_type")))
