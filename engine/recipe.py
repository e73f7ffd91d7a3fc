"""recipe.yaml: the resolved configuration plus the fingerprints that matter, so a run can
be reproduced exactly with `shrink --config-dir RUN_DIR --config-name recipe out=NEW_DIR`.

The file starts with `defaults: [shrink_schema, _self_]`, so re-composing it is checked
against the same typed schema; `fingerprints` records sha256 of the input model's files
and of the data files, package versions and the seed, and a re-run refuses inputs whose
hashes changed.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import platform
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.config import eval_sets, without_volatile
from engine.data import file_sha256
from engine.errors import ShrinkError
from engine.files import atomic_write_text

log = logging.getLogger(__name__)

PACKAGES = ("shrink", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "datasets",
            "hydra-core", "gguf", "optimum", "gptqmodel")
MODEL_FILES = (".json", ".safetensors", ".model", ".txt", ".jinja")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def input_fingerprints(cfg: DictConfig) -> dict[str, Any]:
    """sha256 of every file that decides the result (model folder, data files)."""
    model_dir = Path(cfg.model.path).expanduser()
    model = {p.name: file_sha256(p) for p in sorted(model_dir.iterdir())
             if p.is_file() and p.name.endswith(MODEL_FILES) and p.name != "metrics.json"}
    files = {"data.calib.path": cfg.data.calib.path}
    sets = eval_sets(cfg.data.eval)
    files.update({"data.eval.path": sets[0].path} if len(sets) == 1 else {f"{s.key}.path": s.path for s in sets})
    data = {key: file_sha256(Path(str(path)).expanduser()) for key, path in files.items()
            if Path(str(path)).expanduser().is_file()}
    student = cfg.distill.student.path
    if "distill" in cfg.pipeline.stages and student and Path(student).is_dir():
        data["distill.student.path"] = {p.name: file_sha256(p) for p in sorted(Path(student).iterdir())
                                        if p.is_file() and p.name.endswith(MODEL_FILES)}
    return {"model": model, "data": data}


def config_digest(cfg: DictConfig) -> str:
    """Hash of the settings that change the result (not out/resume/logging)."""
    plain = without_volatile(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(plain)).encode()).hexdigest()


def check_fingerprints(cfg: DictConfig) -> None:
    """A recipe being re-run must see the very inputs it was made from."""
    recorded = cfg.get("fingerprints") or {}
    if not recorded.get("inputs"):
        return
    current = input_fingerprints(cfg)
    expected = OmegaConf.to_container(recorded.inputs, resolve=True)
    for section in ("model", "data"):
        for name, digest in expected.get(section, {}).items():
            if current[section].get(name) != digest:
                raise ShrinkError(f"fingerprints: {section} file {name!r} differs from the recipe's (sha256 changed)")


def write_recipe(cfg: DictConfig, out: Path, inputs: dict[str, Any] | None = None) -> None:
    """`inputs`: input_fingerprints(cfg) when the caller has them already (hashing is not free)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    inputs = inputs if inputs is not None else input_fingerprints(cfg)
    plain["fingerprints"] = {"inputs": inputs, "packages": package_versions(),
                             "seed": cfg.seed, "config_sha256": config_digest(cfg)}
    text = "defaults:\n  - shrink_schema\n  - _self_\n\n" + OmegaConf.to_yaml(OmegaConf.create(plain))
    atomic_write_text(out / "recipe.yaml", text)
