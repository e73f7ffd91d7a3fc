"""Task accuracy next to perplexity (lm-evaluation-harness through `eval.tasks`) for the dense
llama-teacher, its GPTQ 4/3-bit g128 quantizations, SparseGPT 50% unstructured and 2:4, the
separately pretrained llama-student and that student distilled from the teacher with
`distill=akt_pretrained` (a short CPU budget, DISTILL). Tasks: the package's Shakespeare pair
(shrink/assets/tasks) and the same pair built now from docs-en test (held out from training)
by benchmarks/make_tasks.py into a temporary folder. Writes benchmarks/results/task_accuracy.json;
re-running skips the arms already there (--arms picks some).

    python -m benchmarks.task_accuracy                 # 300 items per task, every window
    python -m benchmarks.task_accuracy --limit 100 --windows 64  # what the README table ran
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
SHARED = "${oc.env:SHRINK_SHARED,'../shared'}"
# the distilled student: distill_akt's CPU budget (40 steps x 8 x 256 tokens of docs-en valid, seed 0)
DISTILL = ["distill.student.path=" + SHARED + "/models/llama-student",
           "distill.train_path=" + SHARED + "/data/docs-en/valid.jsonl.gz", "distill.steps=40", "distill.batch_size=8",
           "distill.seq_len=256", "distill.warmup=4", "distill.checkpoint_every=0"]
TEACHER = "model=llama_teacher"
# the calibration of the arms measured on a crowded machine (2 cores, ~25 runnable jobs): 32 of the
# preset's 128 x 512-token samples; the others calibrate on all 128
FEW_SAMPLES = 32
FEW = f"{FEW_SAMPLES} calibration samples"
ARMS = [("dense fp32", ["pipeline=eval", TEACHER]),
        (f"GPTQ 4-bit g128, {FEW}", [TEACHER, "pipeline=quantize", "quant=gptq", "quant.bits=4", "quant.group_size=128",
                                     f"data.calib.num_samples={FEW_SAMPLES}"]),
        (f"GPTQ 3-bit g128, {FEW}", [TEACHER, "pipeline=quantize", "quant=gptq", "quant.bits=3", "quant.group_size=128",
                                     f"data.calib.num_samples={FEW_SAMPLES}"]),
        ("SparseGPT 50%", [TEACHER, "pipeline=prune", "prune=sparsegpt"]),
        (f"SparseGPT 2:4, {FEW}", [TEACHER, "pipeline=prune", "prune=sparsegpt_2of4",
                                   f"data.calib.num_samples={FEW_SAMPLES}"]),
        ("llama-student (pretrained alone)", ["pipeline=eval", "model=llama_student"]),
        ("llama-student + AKT from the teacher", [TEACHER, "pipeline=distill", "distill=akt_pretrained", *DISTILL])]


def task_row(label: str, m: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "ppl": m["ppl"]["docs-en-test"], "bits_per_byte": m["bits_per_byte"]["docs-en-test"],
            "windows": m["eval_windows"]["docs-en-test"], "tasks": m["tasks"], "size_bytes": m["size_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=300, help="items per task")
    parser.add_argument("--windows", type=int, default=None, help="perplexity on the first N windows only")
    parser.add_argument("--arms", default=None, help="comma-separated arm indices (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as task_dir:
        make_tasks(DOCS_TEST, task_dir, "docs_en", items=args.limit)
        base = ["data=docs_en", "eval.batch_size=8", "eval.baseline=false",
                f"eval.task_dir={task_dir}",
                f"eval.tasks=[{','.join(TASKS)}]", f"eval.limit={args.limit}"]
        base += [f"data.eval.max_windows={args.windows}"] if args.windows else []
        results = Results("task_accuracy", {"overrides": [b for b in base if "task_dir" not in b],
                                            "tasks from": "benchmarks/make_tasks.py (docs-en test, seed 0) and "
                                                          "shrink/assets/tasks", "chance": CHANCE,
                                            "eval": "docs-en test, 512-token windows",
                                            "distilled student": " ".join(DISTILL[1:])}, key=("label",))
        picked = [ARMS[int(i)] for i in args.arms.split(",")] if args.arms else ARMS
        for label, overrides in picked:
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
    order = [label for label, _ in ARMS]  # rows in the arms' order, whichever process measured them first
    ranked = sorted(p["rows"], key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))
    rows = [[r["label"], r["ppl"], f"{r['bits_per_byte']:.4f}", f"{r['windows']['evaluated']} of {r['windows']['total']}",
             *[cell(r["tasks"][t]) for t in tasks]] for r in ranked]
    limit = next(o.split("=", 1)[1] for o in p["config"]["overrides"] if o.startswith("eval.limit="))
    d = dict(kv.split("=", 1) for kv in p["config"]["distilled student"].split())
    head = (f"{limit} items per task (`--limit {limit}`), accuracy ± its standard error over the items. The "
            f"distilled student: llama-student after `distill=akt_pretrained` from the teacher, {d['distill.steps']} "
            f"steps x {d['distill.batch_size']} x {d['distill.seq_len']} tokens of docs-en "
            f"{Path(d['distill.train_path']).name.split('.')[0]}.\n\n")
    return head + md(["model", "ppl docs-en test", "bits/byte", "windows", *heads], rows) + footer(p)

if __name__ == "__main__":
    main()
