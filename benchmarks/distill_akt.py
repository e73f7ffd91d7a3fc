"""AKT against LM-only training and logit KD, for a pretrained and a layer-skip student,
plus the progressive (layer-by-layer) schedule, and the same with the LM term kept beside
logit KD (arms 8-11: LM + logit KD, AKT + logit KD + LM). Teacher: ../shared/models/llama-teacher
(8 layers, hidden 384, 6/2 heads); students: ../shared/models/llama-student (4 layers,
256, 4/2 heads) and a skip student (teacher layers 0, 2, 5, 7). Transfer set: docs-en
valid for the CPU budgets, docs-en train for --full (valid holds 204k tokens: the full budget
of 16.4M tokens would be 80 epochs of it); --train picks either. Every arm sees the same
token budget (steps x batch x seq_len) and the same windows in the same order (seed 0);
the progressive arms add their layer stages on top, which is their cost. Perplexity by the
protocol (docs-en test, 512-token windows; the CPU budget caps their number).
Writes benchmarks/results/distill_akt.json, or distill_akt_<settings>.json for any setting
other than the default (budget, AKT weight, layer map, ...); re-running skips the arms
already there. `--dev` chooses settings without the test split: it distills on docs-en valid
less every fifth document and measures perplexity on those held-out documents (docs-en-dev).

    python -m benchmarks.distill_akt --threads 1  # CPU-sized (~25 min on 2 busy cores)
    python -m benchmarks.distill_akt --full       # the GPU-sized comparison
    python -m benchmarks.distill_akt --table      # Markdown table of the JSON
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from benchmarks.common import RESULTS, ROOT, Results, run
from benchmarks.markdown import footer, md

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


def overrides(init: str, loss: str, schedule: str, b: dict[str, Any], weights: dict[str, float],
              opts: dict[str, Any] = DEFAULT_OPTS) -> list[str]:
    windows = "null" if b["windows"] is None else b["windows"]
    train = opts["dev"]["train"] if opts["dev"] else f"{SHARED}/data/docs-en/{opts['split']}.jsonl.gz"
    return ["pipeline=distill", *MODEL_DATA, "eval.baseline=false", f"distill.train_path={train}",
            *eval_overrides(opts), f"data.eval.max_windows={windows}", "data.eval.seq_len=512", f"seed={opts['seed']}",
            *INITS[init],
            f"distill.loss={loss}", f"distill.schedule={schedule}", f"distill.steps={b['steps']}",
            f"distill.progressive_steps={b['progressive_steps']}", f"distill.batch_size={b['batch_size']}",
            f"distill.seq_len={b['seq_len']}", f"distill.lr={LR[init]}", f"distill.warmup={max(1, b['steps'] // 10)}",
            "distill.checkpoint_every=0", "distill.log_every=5", f"distill.relation_heads={opts['relation_heads']}",
            f"distill.layer_map={opts['layer_map']}", f"distill.relations={opts['relations']}",
            f"distill.eval_init={loss == 'lm' and schedule == 'joint'}",  # once per init
            *[f"distill.weights.{k}={v}" for k, v in weights.items()]]


def run_arm(init: str, loss: str, schedule: str, b: dict[str, Any], weights: dict[str, float],
            opts: dict[str, Any] = DEFAULT_OPTS) -> dict[str, Any]:
    t = time.time()
    m = run(overrides(init, loss, schedule, b, weights, opts))
    report = m["stages"]["distill"]
    return {"init": init, "loss": loss, "schedule": schedule, "ppl": m["ppl"][eval_name(opts)],
            "init_ppl": report.get("init_ppl"), "steps": report["steps"], "tokens": report["tokens"],
            "seconds_train": report["seconds"], "tokens_per_s": report["tokens_per_s"],
            "seconds_total": time.time() - t, "params": report["student"]["params"],
            "phases": report["phases"], "final": report["final"], "history": report["history"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--full", action="store_true", help="same as --budget full")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the results JSON")
    parser.add_argument("--akt-weight", type=float, default=1.0)
    parser.add_argument("--relation-heads", type=int, default=8)
    parser.add_argument("--layer-map", default="uniform", help="distill.layer_map of the AKT arms")
    parser.add_argument("--relations", default="qkv", help="distill.relations of the AKT arms (e.g. v)")
    parser.add_argument("--dev", action="store_true",
                        help="distill on docs-en valid less every fifth document, measure on those (not test)")
    parser.add_argument("--arms", default="all", help="comma-separated arm indices (default: all)")
    parser.add_argument("--name", default=None,
                        help="results file (default: distill_akt plus each setting that is not the default, "
                             "e.g. distill_akt_cpu4x_w0.1)")
    parser.add_argument("--train", choices=SPLITS, default=None,
                        help="docs-en split to distill on (default: train for --full, else valid)")
    parser.add_argument("--seed", type=int, default=0,
                        help="window order of the transfer set (the skip student's init does not depend on it)")
    parser.add_argument("--lr", action="append", default=[], metavar="INIT=LR", help="e.g. skip=1e-3")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is far faster on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = "full" if args.full else args.budget
    b = BUDGETS[budget]
    args.train = args.train or default_split(budget)
    if args.dev and args.train != "valid":
        parser.error("--dev holds out documents of docs-en valid: it needs --train valid")
    args.name = args.name or default_name(budget, args)
    if args.table:
        print(render_table(json.loads((RESULTS / f"{args.name}.json").read_text())))
        return
    logging.basicConfig(level=logging.WARNING)
    weights = {"lm": 1.0, "logit": 1.0, "akt": args.akt_weight}
    LR.update({k: float(v) for k, v in (item.split("=") for item in args.lr)})
    arms = ARMS if args.arms == "all" else [ARMS[int(i)] for i in args.arms.split(",")]
    config = {"budget": budget, **b, "lr": LR, "weights": weights,
              "train_split": args.train, "temperature": 1.0, "relation_heads": args.relation_heads,
              # recorded only when not the default, so the JSON of earlier runs still matches
              # and re-running skips their measured arms
              **({"layer_map": args.layer_map} if args.layer_map != "uniform" else {}),
              **({"seed": args.seed} if args.seed else {}),
              **({"relations": args.relations} if args.relations != "qkv" else {}),
              **({"eval": "docs-en-dev"} if args.dev else {}),
              "threads": torch.get_num_threads(), "tokens_per_arm": b["steps"] * b["batch_size"] * b["seq_len"]}
    results = Results(args.name, config, key=("init", "loss", "schedule"))  # re-running skips finished arms
    with dev_split() if args.dev else contextlib.nullcontext() as dev:
        opts = {"split": args.train, "relation_heads": args.relation_heads, "layer_map": args.layer_map,
                "seed": args.seed, "relations": args.relations, "dev": dev}
        run_arms(results, arms, b, weights, opts)
    print(results.save())


def run_arms(results: Results, arms: list[tuple[str, str, str]], b: dict[str, Any], weights: dict[str, float],
             opts: dict[str, Any]) -> None:
    """The teacher's perplexity, then each arm not yet in the results."""
    windows = "null" if b["windows"] is None else b["windows"]
    if not results.has(init="teacher", loss="-", schedule="-"):
        teacher = run(["pipeline=eval", *MODEL_DATA, f"data.eval.max_windows={windows}", *eval_overrides(opts)])
        results.add({"init": "teacher", "loss": "-", "schedule": "-", "ppl": teacher["ppl"][eval_name(opts)],
                     "params": teacher["params"]})
    for init, loss, schedule in arms:
        if not results.has(init=init, loss=loss, schedule=schedule):
            results.add(run_arm(init, loss, schedule, b, weights, opts))


def default_name(budget: str, args: argparse.Namespace) -> str:
    """distill_akt, then each setting that differs from the default: one file per configuration."""
    parts = ["distill_akt"]
    parts += [budget] if budget != "cpu" else []
    parts += [f"w{args.akt_weight:g}"] if args.akt_weight != 1.0 else []
    parts += [args.layer_map] if args.layer_map != "uniform" else []
    parts += [f"r{args.relation_heads}"] if args.relation_heads != 8 else []
    parts += [args.relations] if args.relations != "qkv" else []
    parts += [f"seed{args.seed}"] if args.seed else []
    parts += [f"on-{args.train}"] if args.train != default_split(budget) else []
    parts += [f"lr-{item.replace('=', '')}" for item in args.lr]
    parts += ["dev"] if args.dev else []
    return re.sub(r"[^\w.-]", "-", "_".join(parts))  # an explicit map "0:1,1:3" -> "0-1-1-3"


LOSS_LABEL = {"lm": "LM only", "logits": "logit KD", "akt": "AKT ({}) + logit KD", "logits+lm": "LM + logit KD",
              "akt+logits+lm": "AKT ({}) + logit KD + LM"}


def loss_label(loss: str, relations: str = "qkv") -> str:
    return LOSS_LABEL[loss].format("/".join(relations.upper()))


def render_table(p: dict[str, Any]) -> str:
    """The results JSON as a Markdown table (one row per arm)."""
    c = p["config"]
    init_ppl = {r["init"]: r["init_ppl"] for r in p["rows"] if r.get("init_ppl") is not None}
    rows = []
    for r in p["rows"]:
        if r["init"] == "teacher":
            rows.append(["teacher (8 layers, 384)", "-", "-", r["ppl"], None, None, None, None])
            continue
        label = loss_label(r["loss"], c.get("relations", "qkv"))
        label += " progressive" if r["schedule"] == "progressive" else ""
        rows.append([f"student init={r['init']}", label, init_ppl.get(r["init"]), r["ppl"], r["steps"], r["tokens"],
                     f"{r['seconds_train']:.0f}", f"{r['tokens_per_s']:.0f}"])
    head = (f"Budget per arm (joint): {c['steps']} steps x {c['batch_size']} x {c['seq_len']} tokens "
            f"= {c['tokens_per_arm']:,} tokens; test windows: {c['windows'] or 'all'} x 512.\n\n")
    return head + md(["model", "training", "ppl at init", "test ppl", "steps", "tokens", "train s", "tokens/s"],
                     rows) + footer(p)


def base_settings(c: dict[str, Any]) -> bool:
    """Whether a results file ran the default AKT weight, map, relation heads and split (its
    budget, seed, relations and evaluation split may be any)."""
    return (c["weights"]["akt"] == 1.0 and c.get("layer_map", "uniform") == "uniform" and c["relation_heads"] == 8
            and c["train_split"] == default_split(c["budget"]))


def default_settings(c: dict[str, Any]) -> bool:
    """Whether a results file ran the default AKT settings (it may differ in budget only)."""
    return base_settings(c) and c.get("relations", "qkv") == "qkv" and "eval" not in c and not c.get("seed", 0)


def joint_ppl(p: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(init, loss) -> test perplexity of the joint-schedule arms (and the teacher)."""
    return {(r["init"], r["loss"]): r["ppl"] for r in p["rows"] if r["schedule"] in ("joint", "-")}


def render_budgets(payloads: list[dict[str, Any]]) -> str:
    """The three joint arms of each init at every budget measured with the default AKT settings
    (weight 1, uniform map, 8 relation heads, the budget's default split): how the gap moves."""
    rows = []
    for p in sorted(payloads, key=lambda p: p["config"]["tokens_per_arm"]):
        c = p["config"]
        if not default_settings(c):
            continue
        ppl = joint_ppl(p)
        epochs = c["tokens_per_arm"] / TRAIN_TOKENS[c["train_split"]]
        for init in INITS:
            lm, logit, akt = (ppl.get((init, loss)) for loss in ("lm", "logits", "akt"))
            if lm is None and logit is None and akt is None:
                continue
            gap = f"{akt - logit:+.3f}" if akt is not None and logit is not None else ""
            rows.append([c["budget"], f"{c['tokens_per_arm']:,}", f"{epochs:.1f}", f"init={init}", lm, logit, akt, gap])
    return md(["budget", "tokens per arm", "epochs of the split", "student", "LM only", "logit KD",
               "AKT + logit KD", "AKT - logit KD"], rows)


def render_variants(payloads: list[dict[str, Any]]) -> str:
    """Every arm of the runs with other AKT settings (--akt-weight, --layer-map, ...), one row each;
    runs that differ only in budget, seed, relations or evaluation split are the rows of
    render_budgets, render_seeds and render_relations."""
    rows = []
    for p in payloads:
        c = p["config"]
        if base_settings(c):
            continue
        for r in p["rows"]:
            if r["init"] == "teacher":
                continue
            akt = (f"weight {c['weights']['akt']}, map {c.get('layer_map', 'uniform')}, "
                   f"relations {c.get('relations', 'qkv')}") if r["loss"] == "akt" else "-"
            label = loss_label(r["loss"], c.get("relations", "qkv"))
            rows.append([p["benchmark"], f"{c['tokens_per_arm']:,}", f"init={r['init']}", label, akt,
                         c.get("eval", "docs-en-test"), r["ppl"], f"{r['tokens_per_s']:.0f}"])
    return md(["results file", "tokens per arm", "student", "training", "AKT settings", "evaluated on", "ppl",
               "tokens/s"], rows)


def arm_ppl(payloads: list[dict[str, Any]]) -> dict[tuple[int, str, str, int, str], dict[str, float]]:
    """(tokens per arm, budget, evaluation split, seed, init) -> arm -> perplexity of the joint
    arms of every file with the base AKT settings; an arm is its distill.loss with the AKT
    relations named: lm, logits, akt-qkv, akt-v, logits+lm, akt-v+logits+lm, ... (so the LM-only
    and logit KD rows of one file meet the V-only rows of another)."""
    by: dict[tuple[int, str, str, int, str], dict[str, float]] = {}
    for p in payloads:
        c = p["config"]
        if not base_settings(c):
            continue
        for r in p["rows"]:
            if r["schedule"] == "joint":
                key = (c["tokens_per_arm"], c["budget"], c.get("eval", "docs-en-test"), c.get("seed", 0), r["init"])
                by.setdefault(key, {})[r["loss"].replace("akt", "akt-" + c.get("relations", "qkv"))] = r["ppl"]
    return by


def without_akt(arm: str) -> str:
    """The arm an AKT arm adds its AKT term to: akt-v -> logits, akt-v+logits+lm -> logits+lm."""
    return "+".join(arm.split("+")[1:]) or "logits"


def render_relations(payloads: list[dict[str, Any]]) -> str:
    """AKT on Q/K/V against AKT on V alone (--relations v), beside LM only and logit KD of the
    same budget and evaluation split (seed 0, otherwise default settings)."""
    rows = []
    for (_, budget, evaluated, seed, init), arms in sorted(arm_ppl(payloads).items(), key=table_order):
        if seed or "akt-v" not in arms:
            continue
        logit = arms.get("logits")
        gap = f"{arms['akt-v'] - logit:+.3f}" if logit is not None else ""
        rows.append([budget, evaluated, f"init={init}", arms.get("lm"), logit, arms.get("akt-qkv"), arms["akt-v"], gap])
    return md(["budget", "evaluated on", "student", "LM only", "logit KD", "AKT (Q/K/V) + logit KD",
               "AKT (V) + logit KD", "AKT (V) - logit KD"], rows)


def table_order(item: tuple[tuple[int, str, str, int, str], Any]) -> tuple[Any, ...]:
    """By budget, evaluation split, seed, then the inits in the order of INITS."""
    tokens, budget, evaluated, seed, init = item[0]
    return tokens, budget, evaluated, seed, list(INITS).index(init)


def render_seeds(payloads: list[dict[str, Any]]) -> str:
    """Each AKT arm against the same arm without AKT, over the seeds measured at one budget (the
    seed orders the transfer windows): is AKT's lead larger than the spread? And in how many seeds
    it beats both LM only and logit KD (the issue's bar), where those were measured."""
    by: dict[tuple[int, str, int, str], dict[int, dict[str, float]]] = {}
    for (tokens, budget, evaluated, seed, init), arms in arm_ppl(payloads).items():
        for akt in sorted(a for a in arms if a.startswith("akt-") and without_akt(a) in arms):
            if evaluated == "docs-en-test":
                by.setdefault((tokens, budget, list(INITS).index(init), akt), {})[seed] = arms
    rows = []
    for (_, budget, init_index, akt), seeds in sorted(by.items()):
        if len(seeds) < 2:
            continue
        order, base = sorted(seeds), without_akt(akt)
        gaps = [seeds[s][akt] - seeds[s][base] for s in order]
        bar = [s for s in order if "lm" in seeds[s] and "logits" in seeds[s]]
        relations, loss = akt.split("+")[0][4:], "+".join(["akt", *akt.split("+")[1:]])
        rows.append([budget, f"init={list(INITS)[init_index]}", loss_label(loss, relations), ", ".join(map(str, order)),
                     ", ".join(f"{seeds[s][base]:.3f}" for s in order), ", ".join(f"{seeds[s][akt]:.3f}" for s in order),
                     ", ".join(f"{g:+.3f}" for g in gaps), f"{statistics.mean(gaps):+.3f} ± {statistics.stdev(gaps):.3f}",
                     f"{sum(g < 0 for g in gaps)} of {len(gaps)}",
                     f"{sum(seeds[s][akt] < min(seeds[s]['lm'], seeds[s]['logits']) for s in bar)} of {len(bar)}"
                     if bar else "-"])
    return md(["budget", "student", "AKT arm", "seeds", "without AKT", "with AKT", "AKT - without", "mean ± sd",
               "AKT ahead", "ahead of LM only and logit KD"], rows)


def render_lm_term(payloads: list[dict[str, Any]]) -> str:
    """The arms with the LM term (LM + logit KD, AKT + logit KD + LM) beside LM only and logit KD
    of the same budget and evaluation split (seed 0, otherwise default settings)."""
    rows = []
    for (_, budget, evaluated, seed, init), arms in sorted(arm_ppl(payloads).items(), key=table_order):
        if seed or "logits+lm" not in arms:
            continue
        v = arms.get("akt-v+logits+lm")
        best = min(arms.get("lm", float("inf")), arms.get("logits", float("inf")))
        rows.append([budget, evaluated, f"init={init}", arms.get("lm"), arms.get("logits"), arms["logits+lm"],
                     arms.get("akt-qkv+logits+lm"), v, f"{v - best:+.3f}" if v is not None and best < float("inf") else "",
                     f"{v - arms['logits+lm']:+.3f}" if v is not None else ""])
    return md(["budget", "evaluated on", "student", "LM only", "logit KD", "LM + logit KD", "AKT (Q/K/V) + logit KD + LM",
               "AKT (V) + logit KD + LM", "AKT (V) + logit KD + LM - best of LM only, logit KD",
               "AKT (V) + logit KD + LM - (LM + logit KD)"], rows)


if __name__ == "__main__":
    main()
