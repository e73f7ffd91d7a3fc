"""Shared plumbing of the benchmark scripts: compose configs exactly as the CLI does,
run pipelines in-process, and write results JSON with git sha and device."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from engine.files import atomic_write_text
from shrink.config import compose, quiet_import_noise
from shrink.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# the real models and corpus (../shared/README.md), beside the checkout unless SHRINK_SHARED says where
SHARED = Path(os.environ.get("SHRINK_SHARED", ROOT.parent / "shared"))
ROW = "ROW "  # prefix of the one stdout line an arm run in its own process reports on


def print_row(row: dict[str, Any]) -> None:
    """An arm's result, for the parent process (`row_of`)."""
    print(ROW + json.dumps(row), flush=True)


def row_of(done: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    """The last row an arm's process printed (`print_row`); RuntimeError naming `what`, the exit
    status and the end of stderr when it failed or printed none."""
    rows = [line[len(ROW):] for line in done.stdout.splitlines() if line.startswith(ROW)]
    if done.returncode or not rows:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(rows[-1])


def run(overrides: list[str], keep_export: bool = False,
        then: Optional[Callable[[Path], dict[str, Any]]] = None) -> dict[str, Any]:
    """Run one pipeline in a throwaway folder; returns its metrics.json content. The export
    stage is dropped unless keep_export (then size and bits per weight are those of the
    written folder, which goes with the throwaway folder); `then(out)` runs before the folder
    goes, its dict under "then"."""
    quiet_import_noise()  # as the CLI does: torchao's and pytree's import-time lines are not results
    cfg = compose(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.pipeline.stages[-1] == "export" and not keep_export:
            cfg.pipeline.stages = list(cfg.pipeline.stages)[:-1]  # benchmarks keep no model folders
        metrics = run_pipeline(cfg, Path(tmp))
        if then is not None:
            metrics["then"] = then(Path(tmp))
        return metrics


def git_sha() -> str:
    """HEAD of this checkout; where there is no git (a copy of the tree on a lent GPU machine),
    SHRINK_GIT_SHA, which the command that ships the copy sets."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SHRINK_GIT_SHA", "unknown")


def device_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


class Results:
    """benchmarks/results/NAME.json, rewritten after every row so a crash loses nothing;
    rows already present (same key fields) are skipped when the script is re-run. Several
    processes may fill one file (e.g. one arm per core): each save merges the rows another
    process wrote meanwhile, so none is lost."""

    def __init__(self, name: str, config: dict[str, Any], key: tuple[str, ...]) -> None:
        self.path = RESULTS / f"{name}.json"
        # as the file will hold it (tuples become lists), so a re-run compares equal to its own file
        self.name, self.config, self.key = name, json.loads(json.dumps(config)), key
        self.rows: list[dict[str, Any]] = []
        self.shas: list[str] = []
        old = self.read()
        if old.get("rows") and old.get("config") != self.config:
            # never overwrite measured rows of another configuration with a new run
            raise SystemExit(f"{self.path} holds results of another configuration: "
                             "give this run another name, or move that file away to redo it")
        self.merge(old)

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def has(self, **fields: Any) -> bool:
        return any(all(r.get(k) == fields[k] for k in self.key) for r in self.rows)

    def merge(self, old: dict[str, Any]) -> None:
        """Take in the rows of `old` (the file as saved, maybe by another process meanwhile)
        that we lack, when it holds the same configuration."""
        if old.get("config") != self.config:
            return
        for row in old.get("rows", []):
            if not self.has(**{k: row.get(k) for k in self.key}):
                self.rows.append(row)
        if self.rows:
            self.shas = sorted(set(self.shas) | set(old.get("git_shas", [])))

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "git_sha": row.get("git_sha", git_sha())}  # the code that measured this row
        self.rows.append(row)
        print(row, flush=True)
        self.save()

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.merge(self.read())
        shas = sorted(set(self.shas) | {git_sha()})
        payload = {"benchmark": self.name, "git_sha": git_sha(), "git_shas": shas, "device": device_info(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": self.config, "rows": self.rows}
        atomic_write_text(self.path, json.dumps(payload, indent=2))  # a unique temp per process
        return self.path
