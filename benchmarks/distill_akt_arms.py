"""The arms of benchmarks.distill_akt and how each is run: the budgets, the students, the
transfer and evaluation splits, and the pipeline overrides of one arm (see distill_akt.py)."""
from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import ROOT, Results, run

SHARED = "${oc.env:SHRINK_SHARED,'../shared'}"
INITS = {
    "pretrained": ["distill.student.init=pretrained", f"distill.student.path={SHARED}/models/llama-student"],
    "skip": ["distill.student.init=skip", "distill.student.num_layers=4"],
}
ARMS = [  # (init, loss, schedule)
    ("pretrained", "lm", "joint"), ("pretrained", "logits", "joint"), ("pretrained", "akt", "joint"),
    ("skip", "lm", "joint"), ("skip", "logits", "joint"), ("skip", "akt", "joint"),
    ("pretrained", "akt", "progressive"), ("skip", "akt", "progressive"),
    # with the LM term too (Hinton's mix, the full loss): does AKT add to LM + logit KD?
    ("pretrained", "logits+lm", "joint"), ("pretrained", "akt+logits+lm", "joint"),
    ("skip", "logits+lm", "joint"), ("skip", "akt+logits+lm", "joint"),
]
BUDGETS = {  # steps, batch, seq_len, eval windows, progressive steps per layer
    "cpu": dict(steps=40, batch_size=8, seq_len=256, windows=64, progressive_steps=10),
    "cpu4x": dict(steps=160, batch_size=8, seq_len=256, windows=64, progressive_steps=40),
    "cpu8x": dict(steps=320, batch_size=8, seq_len=256, windows=64, progressive_steps=80),
    "cpu16x": dict(steps=640, batch_size=8, seq_len=256, windows=64, progressive_steps=160),
    "full": dict(steps=2000, batch_size=16, seq_len=512, windows=None, progressive_steps=500),
    "smoke": dict(steps=2, batch_size=2, seq_len=64, windows=2, progressive_steps=1),
}
# what the teacher's evaluation and every arm share; model.device=auto: the GPU where there is
# one (--full), else the CPU
MODEL_DATA = ["model=llama_teacher", "model.device=auto", "data=docs_en", "eval.batch_size=8"]
LR = {"pretrained": 1e-4, "skip": 3e-4}  # chosen on the LM-only arm of each init
# The transfer set. Both shared models were trained (to the edge of overfitting) on docs-en
# train, so the CPU budgets use docs-en valid: text neither model has seen, never the test
# split. Valid is small (204k tokens), so the GPU budget distills on train (5.3M tokens, about
# 3 epochs) rather than repeat valid 80 times.
SPLITS = ("valid", "train")
TRAIN_TOKENS = {"valid": 204_354, "train": 5_271_784}  # docs-en split sizes in tokens (EOS per document)


def default_split(budget: str) -> str:
    return "train" if budget == "full" else "valid"


DEFAULT_OPTS = {"split": "valid", "relation_heads": 8, "layer_map": "uniform", "seed": 0, "relations": "qkv",
                "dev": None}
DEV_EVERY = 5  # --dev: every fifth document of docs-en valid is held out (6 of 34, 67k tokens)


@contextlib.contextmanager
def dev_split() -> Iterator[dict[str, str]]:
    """docs-en valid cut in two by document, as files that live while the run does: the transfer
    set (4 of every 5 documents) and the held-out documents perplexity is measured on."""
    shared = Path(os.environ.get("SHRINK_SHARED", ROOT.parent / "shared"))
    with gzip.open(shared / "data" / "docs-en" / "valid.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"train": str(Path(tmp) / "dev-train.jsonl.gz"), "eval": str(Path(tmp) / "dev-eval.jsonl.gz")}
        for part, keep in (("train", lambda i: i % DEV_EVERY != DEV_EVERY - 1),
                           ("eval", lambda i: i % DEV_EVERY == DEV_EVERY - 1)):
            with gzip.open(files[part], "wt", encoding="utf-8") as f:
                f.writelines(line for i, line in enumerate(lines) if keep(i))
        yield files


def eval_overrides(opts: dict[str, Any]) -> list[str]:
    """The held-out documents of --dev instead of docs-en test."""
    return [] if opts["dev"] is None else [f"data.eval.path={opts['dev']['eval']}", "data.eval.name=docs-en-dev"]


def eval_name(opts: dict[str, Any]) -> str:
    return "docs-en-test" if opts["dev"] is None else "docs-en-dev"


def overrides(init: str, loss: str, schedule: str, budget: dict[str, Any], weights: dict[str, float],
              opts: dict[str, Any] = DEFAULT_OPTS) -> list[str]:
    windows = "null" if budget["windows"] is None else budget["windows"]
    train = opts["dev"]["train"] if opts["dev"] else f"{SHARED}/data/docs-en/{opts['split']}.jsonl.gz"
    return ["pipeline=distill", *MODEL_DATA, "eval.baseline=false", f"distill.train_path={train}",
            *eval_overrides(opts), f"data.eval.max_windows={windows}", "data.eval.seq_len=512", f"seed={opts['seed']}",
            *INITS[init],
            f"distill.loss={loss}", f"distill.schedule={schedule}", f"distill.steps={budget['steps']}",
            f"distill.progressive_steps={budget['progressive_steps']}", f"distill.batch_size={budget['batch_size']}",
            f"distill.seq_len={budget['seq_len']}", f"distill.lr={LR[init]}",
            f"distill.warmup={max(1, budget['steps'] // 10)}",
            "distill.checkpoint_every=0", "distill.log_every=5", f"distill.relation_heads={opts['relation_heads']}",
            f"distill.layer_map={opts['layer_map']}", f"distill.relations={opts['relations']}",
            f"distill.eval_init={loss == 'lm' and schedule == 'joint'}",  # once per init
            *[f"distill.weights.{k}={v}" for k, v in weights.items()]]


def run_arm(init: str, loss: str, schedule: str, budget: dict[str, Any], weights: dict[str, float],
            opts: dict[str, Any] = DEFAULT_OPTS) -> dict[str, Any]:
    start = time.time()
    metrics = run(overrides(init, loss, schedule, budget, weights, opts))
    report = metrics["stages"]["distill"]
    return {"init": init, "loss": loss, "schedule": schedule, "ppl": metrics["ppl"][eval_name(opts)],
            "init_ppl": report.get("init_ppl"), "steps": report["steps"], "tokens": report["tokens"],
            "seconds_train": report["seconds"], "tokens_per_s": report["tokens_per_s"],
            "seconds_total": time.time() - start, "params": report["student"]["params"],
            "phases": report["phases"], "final": report["final"], "history": report["history"]}


def run_arms(results: Results, arms: list[tuple[str, str, str]], budget: dict[str, Any], weights: dict[str, float],
             opts: dict[str, Any]) -> None:
    """The teacher's perplexity, then each arm not yet in the results."""
    windows = "null" if budget["windows"] is None else budget["windows"]
    if not results.has(init="teacher", loss="-", schedule="-"):
        teacher = run(["pipeline=eval", *MODEL_DATA, f"data.eval.max_windows={windows}", *eval_overrides(opts)])
        results.add({"init": "teacher", "loss": "-", "schedule": "-", "ppl": teacher["ppl"][eval_name(opts)],
                     "params": teacher["params"]})
    for init, loss, schedule in arms:
        if not results.has(init=init, loss=loss, schedule=schedule):
            results.add(run_arm(init, loss, schedule, budget, weights, opts))
