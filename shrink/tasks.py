"""Downstream tasks through lm-evaluation-harness (the optional `eval` extra): `eval.tasks` run
on the in-memory model of any stage (dense, pruned, GPTQ-packed, a distilled student) through
lm-eval's HFLM wrapper, which takes a model instance and its tokenizer.

The package's own offline tasks (shrink/assets/tasks, built by benchmarks/make_tasks.py) are
always on the search path; `eval.task_dir` adds local task YAMLs (lm-eval's include_path).
Everything that can be known without a model (lm-eval installed, YAMLs parse, names known,
datasets reachable) is checked by `check_tasks` before a model is loaded or a file written.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from engine.errors import ShrinkError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "assets" / "tasks"
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}  # datasets' file loaders
REPORTED = ("acc", "acc_norm", "perplexity", "exact_match", "f1", "mcc", "word_perplexity", "bits_per_byte")


def task_dirs(cfg: DictConfig) -> list[str]:
    dirs = [str(SHIPPED)]
    if cfg.eval.task_dir:
        folder = Path(cfg.eval.task_dir).expanduser()
        if not folder.is_dir():
            raise ShrinkError(f"eval.task_dir: {folder} is not a folder")
        dirs.append(str(folder))
    return dirs


def task_manager(cfg: DictConfig) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ShrinkError("eval.tasks: needs lm-evaluation-harness (pip install 'shrink[eval]')") from None
    return TaskManager(include_path=task_dirs(cfg))


def check_yamls(cfg: DictConfig) -> None:
    """lm-eval skips a YAML that does not parse without a word; here it is an error."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for folder in task_dirs(cfg)[1:]:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as exc:  # yaml's and lm-eval's own errors
                raise ShrinkError(f"eval.task_dir: {path} does not parse: {str(exc).splitlines()[0]}") from None


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def leaf_configs(manager: Any, name: str) -> list[dict[str, Any]]:
    """The task configs behind a task, group or tag name (includes resolved, functions not)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind == Kind.TAG:
        return [c for n, e in manager.task_index.items() if name in e.tags for c in leaf_configs(manager, n)]
    cfg = entry.cfg or load_yaml(entry.yaml_path, resolve_func=False)
    if entry.kind != Kind.GROUP:
        return [cfg]
    found = []
    for sub in cfg.get("task", []):
        found += leaf_configs(manager, sub) if isinstance(sub, str) else [sub]
    return found


def cached_on_disk(dataset: str) -> bool:
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    return ((datasets_cache / dataset.replace("/", "___")).exists()
            or (home / "hub" / f"datasets--{dataset.replace('/', '--')}").exists())


def check_tasks(cfg: DictConfig) -> None:
    """eval.tasks, eval.task_dir, eval.num_fewshot, eval.limit: one-line errors before any model."""
    if not cfg.eval.tasks:
        return
    if cfg.eval.num_fewshot is not None and cfg.eval.num_fewshot < 0:
        raise ShrinkError(f"eval.num_fewshot must be >= 0, got {cfg.eval.num_fewshot}")
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        raise ShrinkError(f"eval.limit must be positive (a count, or a fraction below 1), got {cfg.eval.limit}")
    manager = task_manager(cfg)
    check_yamls(cfg)
    for name in cfg.eval.tasks:
        if name not in manager.task_index:
            raise ShrinkError(f"eval.tasks: unknown task {name!r} (not an lm-eval task, group or tag, "
                              f"nor in {', '.join(task_dirs(cfg))})")
        if not offline():
            continue
        for task in leaf_configs(manager, name):
            dataset = task.get("dataset_path")
            if (task.get("custom_dataset") is None and dataset and dataset not in LOCAL_BUILDERS
                    and not Path(dataset).expanduser().exists() and not cached_on_disk(dataset)):
                raise ShrinkError(f"eval.tasks: {name!r} needs the dataset {dataset!r} from the Hugging Face Hub, "
                                  f"which is offline here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not cached")


def run_tasks(model: Any, tokenizer: Any, cfg: DictConfig, label: str) -> dict[str, dict[str, Any]]:
    """lm-eval results per task and group: acc, acc_norm (and the task's other metrics), their
    stderr, and the number of items; the model must already be on its device."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    log.info("%s: lm-eval tasks %s (num_fewshot=%s, limit=%s)", label, list(cfg.eval.tasks), cfg.eval.num_fewshot,
             cfg.eval.limit)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size)
    limit = cfg.eval.limit
    out = simple_evaluate(model=lm, tasks=list(cfg.eval.tasks), num_fewshot=cfg.eval.num_fewshot,
                          limit=int(limit) if limit is not None and limit >= 1 else limit,
                          task_manager=task_manager(cfg), log_samples=False, bootstrap_iters=1000,
                          random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                          fewshot_random_seed=cfg.seed)
    samples = out.get("n-samples", {})
    tasks = {}
    for name, row in {**out.get("results", {}), **out.get("groups", {})}.items():
        figures = {}
        for key, value in row.items():
            metric, _, filt = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base in REPORTED and isinstance(value, (int, float)):
                figures[metric if filt in ("none", "") else f"{metric},{filt}"] = float(value)
        if name in samples:
            figures["samples"] = int(samples[name].get("effective", 0))
        tasks[name] = figures
    for name, f in tasks.items():
        log.info("%s: %s %s", label, name, ", ".join(f"{k} {v:.4f}" for k, v in f.items() if k != "samples"))
    return tasks
