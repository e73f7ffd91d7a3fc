"""Task accuracy next to perplexity (lm-evaluation-harness through `eval.tasks`) for the dense
llama-teacher and its GPTQ 4-bit g128 quantization. Tasks: the package's Shakespeare pair
(shrink/assets/tasks) and the same pair built now from docs-en test (held out from training)
by benchmarks/make_tasks.py into a temporary folder. Writes benchmarks/results/task_accuracy.json.

    python -m benchmarks.task_accuracy                          # 300 items per task, every window
    python -m benchmarks.task_accuracy --limit 200 --windows 64  # what the README table ran
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Results, run
from benchmarks.make_tasks import make_tasks
from benchmarks.markdown import footer, md

DOCS_TEST = Path(os.environ.get("SHRINK_SHARED", "../shared")) / "data" / "docs-en" / "test.jsonl.gz"
TASKS = ["docs_en_next_line", "docs_en_last_word", "shakespeare_next_line", "shakespeare_last_word"]
CHANCE = {"next_line": 0.25, "last_word": 0.0}  # four choices; a free-form word
ARMS = [("dense fp32", ["pipeline=eval"]),
        ("GPTQ 4-bit g128", ["pipeline=quantize", "quant.method=gptq", "quant.bits=4", "quant.group_size=128",
                             "eval.baseline=false"])]


def task_row(label: str, m: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "ppl": m["ppl"]["docs-en-test"], "bits_per_byte": m["bits_per_byte"]["docs-en-test"],
            "windows": m["eval_windows"]["docs-en-test"], "tasks": m["tasks"], "size_bytes": m["size_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=300, help="items per task")
    parser.add_argument("--windows", type=int, default=None, help="perplexity on the first N windows only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as task_dir:
        make_tasks(DOCS_TEST, task_dir, "docs_en", items=args.limit)
        base = ["model=llama_teacher", "data=docs_en", "eval.batch_size=8", f"eval.task_dir={task_dir}",
                f"eval.tasks=[{','.join(TASKS)}]", f"eval.limit={args.limit}"]
        base += [f"data.eval.max_windows={args.windows}"] if args.windows else []
        results = Results("task_accuracy", {"overrides": [b for b in base if "task_dir" not in b],
                                            "tasks from": "benchmarks/make_tasks.py (docs-en test, seed 0) and "
                                                          "shrink/assets/tasks", "chance": CHANCE,
                                            "eval": "docs-en test, 512-token windows"}, key=("label",))
        for label, overrides in ARMS:
            if not results.has(label=label):
                results.add(task_row(label, run(base + overrides)))


def render(p: dict[str, Any]) -> str:
    """One row per model: perplexity, bits per byte, and each task's headline accuracy ± stderr."""
    def cell(figures: dict[str, Any]) -> str:
        key = "acc_norm" if "acc_norm" in figures else "acc"
        return f"{figures[key]:.3f} ± {figures[key + '_stderr']:.3f}"

    tasks = list(p["rows"][0]["tasks"]) if p["rows"] else []
    chance = {t: p["config"]["chance"]["_".join(t.split("_")[-2:])] for t in tasks}  # by kind: next_line, ...
    heads = [f"{t} ({'acc_norm' if 'acc_norm' in p['rows'][0]['tasks'][t] else 'acc'}; chance {chance[t]:.2f})"
             for t in tasks]
    rows = [[r["label"], r["ppl"], f"{r['bits_per_byte']:.4f}", f"{r['windows']['evaluated']} of {r['windows']['total']}",
             *[cell(r["tasks"][t]) for t in tasks]] for r in p["rows"]]
    return md(["model", "ppl docs-en test", "bits/byte", "windows", *heads], rows) + footer(p)
