"""Shared plumbing of the benchmark scripts: compose configs exactly as the CLI does,
run pipelines in-process, and write results JSON with git sha and device."""
from __future__ import annotations

import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from shrink.cli import register_resolvers
from shrink.config import register_configs
from shrink.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def compose_config(overrides: list[str]) -> DictConfig:
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run(overrides: list[str]) -> dict[str, Any]:
    """Run one pipeline in a throwaway folder; returns its metrics.json content."""
    cfg = compose_config(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.pipeline.stages[-1] == "export":
            cfg.pipeline.stages = list(cfg.pipeline.stages)[:-1]  # benchmarks keep no model folders
        return run_pipeline(cfg, Path(tmp))


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, config: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "git_sha": git_sha(), "device": device_info(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config, "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    return path
