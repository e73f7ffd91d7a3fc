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

The arms and how each is run live in distill_akt_arms.py, the tables in distill_akt_tables.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re

import torch

from benchmarks.common import RESULTS, Results
from benchmarks.distill_akt_arms import ARMS, BUDGETS, LR, SPLITS, default_split, dev_split, run_arms
from benchmarks.distill_akt_tables import render_table


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
    budget_sizes = BUDGETS[budget]
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
    config = {"budget": budget, **budget_sizes, "lr": LR, "weights": weights,
              "train_split": args.train, "temperature": 1.0, "relation_heads": args.relation_heads,
              # recorded only when not the default, so the JSON of earlier runs still matches
              # and re-running skips their measured arms
              **({"layer_map": args.layer_map} if args.layer_map != "uniform" else {}),
              **({"seed": args.seed} if args.seed else {}),
              **({"relations": args.relations} if args.relations != "qkv" else {}),
              **({"eval": "docs-en-dev"} if args.dev else {}),
              "threads": torch.get_num_threads(), "tokens_per_arm": budget_sizes["steps"] * budget_sizes["batch_size"]
              * budget_sizes["seq_len"]}
    results = Results(args.name, config, key=("init", "loss", "schedule"))  # re-running skips finished arms
    with dev_split() if args.dev else contextlib.nullcontext() as dev:
        opts = {"split": args.train, "relation_heads": args.relation_heads, "layer_map": args.layer_map,
                "seed": args.seed, "relations": args.relations, "dev": dev}
        run_arms(results, arms, budget_sizes, weights, opts)
    print(results.save())


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


if __name__ == "__main__":
    main()
