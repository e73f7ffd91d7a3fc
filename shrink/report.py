"""`shrink report DIR...`: one table and one plot for every run under some folders.

A run folder is any folder holding both metrics.json and recipe.yaml, so this reads a
Hydra multirun sweep (multirun/DATE/TIME/<job>/), a hand-made set of `out=` folders, or
both. Every folder that looks like a run or a sweep point (recipe.yaml, progress.json,
failed.json or Hydra's .hydra/) but cannot be reported (it failed, is unfinished, or its
metrics.json does not read or holds a value of the wrong type) is named, with the reason,
under "Left out" in report.md and on the console; only when no run is left is it an error.

The settings shown are the recipe keys whose values differ between the runs (a single run
shows its stage settings); a stage's keys are blanked for runs that did not run that
stage, since e.g. quant.bits of a prune-only run is a default nobody chose.

Outputs (written to temporary files, then renamed, so a failure leaves no partial report):
report.md, report.csv, report.png (perplexity against size on disk; the Pareto front,
runs that no other run beats on both, is marked and connected; bits per byte beside perplexity;
lm-eval task accuracy ± stderr as columns and as panels of accuracy against size).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from engine.config import without_volatile
from engine.errors import ShrinkError
from engine.files import atomic_path
from engine.fingerprint import first_divergence

log = logging.getLogger(__name__)

# Preferred column order; any other varying key follows alphabetically.
SETTING_ORDER = ("pipeline.name", "model.path", "quant.method", "quant.bits", "quant.group_size", "quant.sym",
                 "quant.act_order", "prune.method", "prune.sparsity", "prune.pattern", "prune.joint_quant",
                 "distill.loss", "distill.steps")
STAGE_OF_SECTION = {"quant": "quantize", "prune": "prune", "distill": "distill"}
MIB = 1024**2


@dataclass
class Run:
    folder: Path
    label: str
    settings: dict[str, Any]
    metrics: dict[str, Any]

    def ppl(self, name: str) -> Optional[float]:
        return (self.metrics.get("ppl") or {}).get(name)

    def task(self, name: str, prefix: str = "") -> tuple[Optional[float], Optional[float]]:
        """A task's headline accuracy and its stderr (prefix "baseline_" for the input model's)."""
        return task_score((self.metrics.get(prefix + "tasks") or {}).get(name))


def task_metric(figures: Optional[dict[str, Any]]) -> Optional[str]:
    """The headline metric of an lm-eval task: acc_norm where the task has it, else acc."""
    return next((k for k in ("acc_norm", "acc") if figures and k in figures), None)


def task_score(figures: Optional[dict[str, Any]]) -> tuple[Optional[float], Optional[float]]:
    key = task_metric(figures)
    return (figures[key], figures.get(f"{key}_stderr")) if key else (None, None)


# ---------------------------------------------------------------------------- gathering
POINT_MARKS = ("metrics.json", "recipe.yaml", "progress.json", "failed.json", ".hydra")


@dataclass
class LeftOut:
    """A run folder or sweep point that the report cannot show, and why."""
    label: str
    folder: Path
    reason: str


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every reportable run folder under dirs (recursively), each once, in natural order."""
    return gather(dirs)[0]


def gather(dirs: list[Path]) -> tuple[list[Run], list[LeftOut]]:
    """(the runs, the points left out with their reasons) under dirs; ShrinkError if no run."""
    runs: list[Run] = []
    left: list[LeftOut] = []
    seen: set[Path] = set()
    for root in dirs:
        if not root.is_dir():
            raise ShrinkError(f"report: {root} is not a folder")
        found = {p.parent for mark in POINT_MARKS for p in root.rglob(mark) if not _hidden(p.parent, root)}
        for folder in sorted(found, key=lambda f: _natural(f.relative_to(root).as_posix())):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            label = folder.relative_to(root).as_posix() if folder != root else folder.name
            try:
                runs.append(load_run(folder, label))
            except ShrinkError as exc:
                left.append(LeftOut(label, folder, str(exc).removeprefix("report: ")))
    if not runs:
        first = f" ({left[0].folder}: {left[0].reason})" if left else ""
        raise ShrinkError(f"report: no run folders (metrics.json + recipe.yaml) under {', '.join(map(str, dirs))}"
                          + first)
    return runs, left


def _hidden(folder: Path, root: Path) -> bool:
    """Temporary and checkpoint folders (.model.xxx, .hydra) are not runs."""
    return any(part.startswith(".") for part in folder.relative_to(root).parts)


def _natural(text: str) -> list[Any]:
    """'10' after '9': multirun job folders are numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def load_run(folder: Path, label: str) -> Run:
    if not (folder / "metrics.json").is_file():
        failed = folder / "failed.json"
        if failed.is_file():
            reason = _read(failed, json.loads)
            raise ShrinkError(f"failed: {reason.get('error') if isinstance(reason, dict) else reason}")
        state = "unfinished" if (folder / "progress.json").is_file() else "failed or not run"
        raise ShrinkError(f"{state} (no metrics.json)")
    if not (folder / "recipe.yaml").is_file():
        raise ShrinkError(f"{folder} has metrics.json but no recipe.yaml")
    metrics = _read(folder / "metrics.json", json.loads)
    recipe = _read(folder / "recipe.yaml", yaml.safe_load)
    if not isinstance(metrics, dict) or not isinstance(recipe, dict):
        raise ShrinkError(f"report: {folder} has a metrics.json or recipe.yaml that is not a mapping")
    check_metrics(metrics, folder / "metrics.json")
    return Run(folder, label, flatten_settings(recipe), metrics)


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ShrinkError(f"report: cannot read {path}: {str(exc).splitlines()[0]}") from None


# What the report reads from metrics.json, and of which type: a number (or null), or maps of them.
NUMBERS = ("size_bytes", "bits_per_weight", "sparsity")
NUMBER_MAPS = ("ppl", "baseline_ppl", "bits_per_byte", "seconds")
TASK_MAPS = ("tasks", "baseline_tasks")
TASK_FIGURES = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def check_metrics(metrics: dict[str, Any], file: Path) -> None:
    """Every value the report reads is a number or null, in maps where it expects maps."""
    def number(key: str, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ShrinkError(f"{file}: {key} is {type(value).__name__} {value!r}, not a number")

    def mapping(key: str, value: Any) -> dict[str, Any]:
        if value is not None and not isinstance(value, dict):
            raise ShrinkError(f"{file}: {key} is {type(value).__name__}, not a mapping")
        return value or {}

    for key in NUMBERS:
        number(key, metrics.get(key))
    for key in NUMBER_MAPS:
        for name, value in mapping(key, metrics.get(key)).items():
            number(f"{key}.{name}", value)
    for key in TASK_MAPS:
        for task, figures in mapping(key, metrics.get(key)).items():
            for figure in TASK_FIGURES:
                number(f"{key}.{task}.{figure}", mapping(f"{key}.{task}", figures).get(figure))


def flatten_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    stages = set(recipe.get("pipeline", {}).get("stages", []))
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = ",".join(map(str, value)) if isinstance(value, list) else value

    # recipe.yaml's own `defaults` list and a multirun's `hydra` node are not settings either
    settings = {k: v for k, v in without_volatile(recipe).items() if k not in ("defaults", "hydra")}
    for key, value in settings.items():
        if key in STAGE_OF_SECTION and STAGE_OF_SECTION[key] not in stages:
            continue
        walk(key, value)
    return flat


def setting_columns(runs: list[Run]) -> list[str]:
    keys = {k for r in runs for k in r.settings}
    varying = [k for k in keys if len({repr(r.settings.get(k)) for r in runs}) > 1]
    if "pipeline.name" in varying and "pipeline.stages" in varying:
        varying.remove("pipeline.stages")  # the name says it
    if not varying:  # one run, or identical recipes: show what was run
        varying = [k for k in SETTING_ORDER if k in keys and k != "model.path"]
    rank = {k: i for i, k in enumerate(SETTING_ORDER)}
    return sorted(varying, key=lambda k: (rank.get(k, len(rank)), k))


def eval_sets(runs: list[Run], key: str = "ppl") -> list[str]:
    """Names under metrics[key] across runs, in first-seen order (eval sets, or tasks)."""
    names: list[str] = []
    for r in runs:
        names += [n for n in (r.metrics.get(key) or {}) if n not in names]
    return names


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points that no other point matches or beats on both (size, ppl), smallest first."""
    front = [i for i, (s, p) in enumerate(points)
             if not any((s2 <= s and p2 <= p) and (s2 < s or p2 < p) for s2, p2 in points)]
    return sorted(front, key=lambda i: points[i])


# ---------------------------------------------------------------------------- table
@dataclass
class Table:
    runs: list[Run]
    settings: list[str]
    evals: list[str]
    baselines: dict[str, Optional[float]]  # eval set -> the common baseline, None if it differs
    pareto: set[int]
    tasks: list[str]  # lm-eval tasks (metrics.json "tasks")
    # task -> the common baseline (accuracy, stderr), None if the runs' baselines differ
    task_baselines: dict[str, Optional[tuple[float, Optional[float]]]]


def build_table(runs: list[Run]) -> Table:
    evals, tasks = eval_sets(runs), eval_sets(runs, "tasks")
    baselines: dict[str, Optional[float]] = {}
    for name in evals:
        values = {(r.metrics.get("baseline_ppl") or {}).get(name) for r in runs} - {None}
        baselines[name] = values.pop() if len(values) == 1 else None
    task_baselines: dict[str, Optional[tuple[float, Optional[float]]]] = {}
    for name in tasks:
        values = {r.task(name, "baseline_") for r in runs} - {(None, None)}
        task_baselines[name] = values.pop() if len(values) == 1 else None
    pareto: set[int] = set()
    if evals:
        idx = [i for i, r in enumerate(runs) if r.ppl(evals[0]) is not None and r.metrics.get("size_bytes") is not None]
        points = [(float(runs[i].metrics["size_bytes"]), float(runs[i].ppl(evals[0]))) for i in idx]
        pareto = {idx[j] for j in pareto_front(points)}
    return Table(runs, setting_columns(runs), evals, baselines, pareto, tasks, task_baselines)


def total_seconds(metrics: dict[str, Any]) -> Optional[float]:
    seconds = metrics.get("seconds") or {}
    return seconds.get("total", sum(seconds.values()) if seconds else None)


def csv_rows(table: Table) -> list[dict[str, Any]]:
    rows = []
    for i, run in enumerate(table.runs):
        metrics = run.metrics
        row: dict[str, Any] = {"run": run.label, "path": str(run.folder)}
        row.update({k: run.settings.get(k, "") for k in table.settings})
        for name in table.evals:
            row[f"ppl:{name}"] = run.ppl(name)
            row[f"baseline_ppl:{name}"] = (metrics.get("baseline_ppl") or {}).get(name)
            row[f"bits_per_byte:{name}"] = (metrics.get("bits_per_byte") or {}).get(name)
        for name in table.tasks:
            figures = (metrics.get("tasks") or {}).get(name) or {}
            for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                row[f"task:{name}:{key}"] = figures.get(key)
            row[f"baseline_task:{name}"], row[f"baseline_task:{name}:stderr"] = run.task(name, "baseline_")
        row.update({"size_bytes": metrics.get("size_bytes"), "bits_per_weight": metrics.get("bits_per_weight"),
                    "sparsity": metrics.get("sparsity"), "seconds": total_seconds(metrics),
                    "pareto": i in table.pareto})
        rows.append(row)
    return rows


def render_csv(table: Table) -> str:
    rows = csv_rows(table)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render_markdown(table: Table, plot_name: str = "report.png", left: Optional[list[LeftOut]] = None) -> str:
    metric = {t: next((task_metric((run.metrics.get("tasks") or {}).get(t)) for run in table.runs
                       if task_metric((run.metrics.get("tasks") or {}).get(t))), "acc") for t in table.tasks}
    head = ["run", *table.settings, *[f"ppl {n}" for n in table.evals], *[f"bits/byte {n}" for n in table.evals],
            *[f"{t} {metric[t]}" for t in table.tasks], "size (MiB)", "bits/weight", "sparsity", "time (s)", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, run in enumerate(table.runs):
        metrics = run.metrics
        size = metrics.get("size_bytes")
        cells = [run.label, *[str(run.settings.get(k, "")) for k in table.settings],
                 *[_fmt(run.ppl(n), ".3f") for n in table.evals],
                 *[_fmt((metrics.get("bits_per_byte") or {}).get(n), ".4f") for n in table.evals],
                 *[_accuracy(*run.task(t)) for t in table.tasks], _fmt(size / MIB if size else None, ".2f"),
                 _fmt(metrics.get("bits_per_weight"), ".2f"), _fmt(metrics.get("sparsity"), ".3f"),
                 _fmt(total_seconds(metrics), ".1f"), "yes" if i in table.pareto else ""]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Baseline perplexity on {n}: {b:.3f}." for n, b in table.baselines.items() if b is not None]
    notes += [f"Baseline {metric[t]} on {t}: {_accuracy(*b)}." for t, b in table.task_baselines.items() if b is not None]
    if table.tasks:
        notes.append("Task accuracy from lm-evaluation-harness, ± its standard error.")
    if table.evals:
        notes.append(f"Pareto: no other run has both lower perplexity on {table.evals[0]} and a smaller size.")
    notes += replay_notes(table.runs)
    missing = ["", f"Left out ({len(left)}):", ""] + [f"- {p.label}: {p.reason}" for p in left] if left else []
    return "\n".join([f"# Sweep report ({len(table.runs)} runs)", "", *lines, "", *notes, *missing, "",
                      f"![perplexity vs size]({plot_name})", ""])


def replay_notes(runs: list[Run]) -> list[str]:
    """Runs of one recipe (the same settings, e.g. on two machines): whether each compressed the
    same as the first such run, bitwise, or the first Linear where their weights part."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.settings, sort_keys=True, default=str), []).append(run)
    notes = []
    for first, *others in groups.values():
        for other in others:
            mine, theirs = compressed_linears(first), compressed_linears(other)
            if not mine or not theirs:
                continue
            part = first_divergence(mine, theirs)
            if part is None:
                notes.append(f"{other.label} has the settings of {first.label} and the same weights in every "
                             f"compressed Linear.")
                continue
            why = ("the data reaching it differed" if part["hessian_differs"]
                   else "its Hessian agrees, the solve differed")
            notes.append(f"{other.label} has the settings of {first.label}; their weights part at "
                         f"{part['full_name']} ({why}).")
    return notes


def compressed_linears(run: Run) -> list[dict[str, Any]]:
    """Every stage's per-Linear report entries (metrics.json stages.*.layers), in run order."""
    stages = run.metrics.get("stages") or {}
    return [e for stage in stages.values() if isinstance(stage, dict)
            for e in stage.get("layers") or [] if isinstance(e, dict)]


def _accuracy(value: Optional[float], stderr: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


# ---------------------------------------------------------------------------- plot
def short_label(run: Run, settings: list[str]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={run.settings[k]}" for k in settings
             if k in run.settings and k not in ("model.path", "pipeline.stages")]
    return " ".join(parts) or run.label


def render_plot(table: Table, path: Path) -> None:
    """Perplexity against size, one panel per eval set; written without pyplot (no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(name, False) for name in table.evals or ["(no perplexity)"]] + [(t, True) for t in table.tasks]
    fig = Figure(figsize=(6.5 * len(panels), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    for k, (name, is_task) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        value = (lambda r: r.task(name)[0]) if is_task else (lambda r: r.ppl(name))
        idx = [i for i, r in enumerate(table.runs) if value(r) is not None and r.metrics.get("size_bytes")]
        points = [(table.runs[i].metrics["size_bytes"] / MIB, value(table.runs[i])) for i in idx]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:gray", zorder=2, label="run")
        for i, (x, y) in zip(idx, points):
            ax.annotate(short_label(table.runs[i], table.settings), (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        front = [] if is_task else [points[j] for j in pareto_front(points)]
        if is_task:
            errors = [table.runs[i].task(name)[1] or 0.0 for i in idx]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, fmt="none", ecolor="tab:gray")
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", zorder=3,
                    label="Pareto front")
        base = (table.task_baselines.get(name) or (None,))[0] if is_task else table.baselines.get(name)
        if base is not None:
            ax.axhline(base, color="tab:blue", linestyle="--", linewidth=1, label=f"baseline {base:.2f}")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(f"accuracy ({name}, ± stderr)" if is_task else f"perplexity ({name})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------- entry point
def write_report(dirs: list[Path], out: Optional[Path] = None) -> Path:
    """Gather, render everything to temporary files, then rename them into out."""
    runs, left = gather(dirs)
    for point in left:
        log.warning("report: left out %s: %s", point.folder, point.reason)
    table = build_table(runs)
    out = out or dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    # all three rendered before any is renamed: a failure leaves the previous report whole
    with atomic_path(out / "report.md") as md, atomic_path(out / "report.csv") as csv_file, \
            atomic_path(out / "report.png") as png:
        md.write_text(render_markdown(table, left=left))
        csv_file.write_text(render_csv(table))
        render_plot(table, png)
    log.info("report of %d runs: %s", len(runs), out / "report.md")
    return out
