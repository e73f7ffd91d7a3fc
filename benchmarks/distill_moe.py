"""Distillation from the MoE teacher (../shared/models/moe-teacher: Mixtral family, 8 layers,
4 experts, top-2) at a CPU budget, through the pipeline as a user runs it:

- arm `pretrained`: the separately pretrained dense ../shared/models/llama-student (same
  tokenizer), distill=akt_pretrained (AKT on V relations + logit KD + LM);
- arm `skip`: a skip student keeping the teacher's layers 0, 2, 5, 7 with their MoE blocks,
  distill=akt (AKT + logit KD) plus the router load-balancing loss (router_aux_weight from
  the teacher's config, 0.01).

Perplexity (docs-en test, 512-token windows, the first `eval_windows`) of the student before
training (distill.eval_init), after it, and of the teacher. Writes
benchmarks/results/distill_moe.json; one process per arm may fill it at the same time.

    python -m benchmarks.distill_moe --arm pretrained --threads 1   # ~25 min on 2 busy cores
    python -m benchmarks.distill_moe --table
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, Results, run
from benchmarks.markdown import footer

BUDGET = {"steps": 40, "batch_size": 4, "seq_len": 256, "eval_windows": 32}
SHARED = os.environ.get("SHRINK_SHARED", "../shared")  # as conf/ resolves it (runs from the repo root)
ARMS = {
    "pretrained": ["distill=akt_pretrained", f"distill.student.path={SHARED}/models/llama-student"],
    "skip": ["distill=akt", "distill.student.init=skip", "distill.student.num_layers=4"],
}


def overrides(arm: str) -> list[str]:
    b = BUDGET
    return ["pipeline=distill", f"model.path={SHARED}/models/moe-teacher", "data=docs_en",
            *ARMS[arm], f"distill.steps={b['steps']}", f"distill.batch_size={b['batch_size']}",
            f"distill.seq_len={b['seq_len']}", "distill.eval_init=true", "distill.checkpoint_every=0",
            "distill.log_every=10", f"data.eval.max_windows={b['eval_windows']}"]


def measure(arm: str) -> dict[str, Any]:
    start = time.time()
    metrics = run(overrides(arm))
    report = metrics["stages"]["distill"]
    name = next(iter(metrics["ppl"]))
    return {"arm": arm, "recipe": ARMS[arm][0], "overrides": overrides(arm), "student": report["student"],
            "teacher_params": report["teacher"]["params"], "init_ppl": report["init_ppl"], "ppl": metrics["ppl"][name],
        "teacher_ppl": metrics["baseline_ppl"][name], "eval_set": name, "steps": report["steps"],
        "tokens": report["tokens"], "seconds_train": report["seconds"], "seconds_total": time.time() - start,
        "router_aux_weight": report["router_aux_weight"], "layer_map": report["layer_map"], "final": report["final"]}


def render_table(p: dict[str, Any]) -> str:
    b = p["config"]
    lines = [f"Teacher `moe-teacher` (Mixtral, 4 experts top-2); {b['steps']} steps x {b['batch_size']} x "
             f"{b['seq_len']} tokens; perplexity on the first {b['eval_windows']} windows of docs-en test.", "",
             "| student | params | recipe | router aux weight | ppl before | ppl after | teacher ppl | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(p["rows"], key=lambda r: r["arm"]):
        s = r["student"]
        kind = f"{r['arm']} ({s['layers']} layers, hidden {s['hidden_size']})"
        lines.append(f"| {kind} | {s['params'] / 1e6:.1f} M | `{r['recipe']}` | {r['router_aux_weight']:g} | "
                     f"{r['init_ppl']:.3f} | {r['ppl']:.3f} | {r['teacher_ppl']:.3f} | {r['seconds_train']:.0f} |")
    return "\n".join(lines) + footer(p)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", choices=sorted(ARMS), action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(render_table(json.loads((RESULTS / "distill_moe.json").read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = Results("distill_moe", {**BUDGET, "threads": torch.get_num_threads()}, key=("arm",))
    for arm in args.arm or sorted(ARMS):
        if not results.has(arm=arm):
            results.add(measure(arm))
    print(results.save())


if __name__ == "__main__":
    main()
