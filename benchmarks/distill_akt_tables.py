"""The Markdown tables of benchmarks.distill_akt, rendered from its results JSON: one file's arms
(render_table) and the comparisons across files (budgets, variants, relations, seeds, LM term)."""
from __future__ import annotations

import statistics
from typing import Any

from benchmarks.distill_akt_arms import INITS, TRAIN_TOKENS, default_split
from benchmarks.markdown import footer, md


LOSS_LABEL = {"lm": "LM only", "logits": "logit KD", "akt": "AKT ({}) + logit KD", "logits+lm": "LM + logit KD",
              "akt+logits+lm": "AKT ({}) + logit KD + LM"}


def loss_label(loss: str, relations: str = "qkv") -> str:
    return LOSS_LABEL[loss].format("/".join(relations.upper()))


def render_table(payload: dict[str, Any]) -> str:
    """The results JSON as a Markdown table (one row per arm)."""
    config = payload["config"]
    init_ppl = {row["init"]: row["init_ppl"] for row in payload["rows"] if row.get("init_ppl") is not None}
    rows = []
    for row in payload["rows"]:
        if row["init"] == "teacher":
            rows.append(["teacher (8 layers, 384)", "-", "-", row["ppl"], None, None, None, None])
            continue
        label = loss_label(row["loss"], config.get("relations", "qkv"))
        label += " progressive" if row["schedule"] == "progressive" else ""
        rows.append([f"student init={row['init']}", label, init_ppl.get(row["init"]), row["ppl"], row["steps"],
                     row["tokens"],
                     f"{row['seconds_train']:.0f}", f"{row['tokens_per_s']:.0f}"])
    head = (f"Budget per arm (joint): {config['steps']} steps x {config['batch_size']} x {config['seq_len']} tokens "
            f"= {config['tokens_per_arm']:,} tokens; test windows: {config['windows'] or 'all'} x 512.\n\n")
    return head + md(["model", "training", "ppl at init", "test ppl", "steps", "tokens", "train s", "tokens/s"],
                     rows) + footer(payload)


def base_settings(config: dict[str, Any]) -> bool:
    """Whether a results file ran the default AKT weight, map, relation heads and split (its
    budget, seed, relations and evaluation split may be any)."""
    return (config["weights"]["akt"] == 1.0 and config.get("layer_map", "uniform") == "uniform"
            and config["relation_heads"] == 8 and config["train_split"] == default_split(config["budget"]))


def default_settings(config: dict[str, Any]) -> bool:
    """Whether a results file ran the default AKT settings (it may differ in budget only)."""
    return (base_settings(config) and config.get("relations", "qkv") == "qkv" and "eval" not in config
            and not config.get("seed", 0))


def joint_ppl(payload: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(init, loss) -> test perplexity of the joint-schedule arms (and the teacher)."""
    return {(row["init"], row["loss"]): row["ppl"] for row in payload["rows"] if row["schedule"] in ("joint", "-")}


def render_budgets(payloads: list[dict[str, Any]]) -> str:
    """The three joint arms of each init at every budget measured with the default AKT settings
    (weight 1, uniform map, 8 relation heads, the budget's default split): how the gap moves."""
    rows = []
    for payload in sorted(payloads, key=lambda payload: payload["config"]["tokens_per_arm"]):
        config = payload["config"]
        if not default_settings(config):
            continue
        ppl = joint_ppl(payload)
        epochs = config["tokens_per_arm"] / TRAIN_TOKENS[config["train_split"]]
        for init in INITS:
            lm, logit, akt = (ppl.get((init, loss)) for loss in ("lm", "logits", "akt"))
            if lm is None and logit is None and akt is None:
                continue
            gap = f"{akt - logit:+.3f}" if akt is not None and logit is not None else ""
            rows.append([config["budget"], f"{config['tokens_per_arm']:,}", f"{epochs:.1f}", f"init={init}", lm, logit,
                         akt, gap])
    return md(["budget", "tokens per arm", "epochs of the split", "student", "LM only", "logit KD",
               "AKT + logit KD", "AKT - logit KD"], rows)


def render_variants(payloads: list[dict[str, Any]]) -> str:
    """Every arm of the runs with other AKT settings (--akt-weight, --layer-map, ...), one row each;
    runs that differ only in budget, seed, relations or evaluation split are the rows of
    render_budgets, render_seeds and render_relations."""
    rows = []
    for payload in payloads:
        config = payload["config"]
        if base_settings(config):
            continue
        for row in payload["rows"]:
            if row["init"] == "teacher":
                continue
            akt = (f"weight {config['weights']['akt']}, map {config.get('layer_map', 'uniform')}, "
                   f"relations {config.get('relations', 'qkv')}") if row["loss"] == "akt" else "-"
            label = loss_label(row["loss"], config.get("relations", "qkv"))
            rows.append([payload["benchmark"], f"{config['tokens_per_arm']:,}", f"init={row['init']}", label, akt,
                         config.get("eval", "docs-en-test"), row["ppl"], f"{row['tokens_per_s']:.0f}"])
    return md(["results file", "tokens per arm", "student", "training", "AKT settings", "evaluated on", "ppl",
               "tokens/s"], rows)


def arm_ppl(payloads: list[dict[str, Any]]) -> dict[tuple[int, str, str, int, str], dict[str, float]]:
    """(tokens per arm, budget, evaluation split, seed, init) -> arm -> perplexity of the joint
    arms of every file with the base AKT settings; an arm is its distill.loss with the AKT
    relations named: lm, logits, akt-qkv, akt-v, logits+lm, akt-v+logits+lm, ... (so the LM-only
    and logit KD rows of one file meet the V-only rows of another)."""
    by: dict[tuple[int, str, str, int, str], dict[str, float]] = {}
    for payload in payloads:
        config = payload["config"]
        if not base_settings(config):
            continue
        for row in payload["rows"]:
            if row["schedule"] == "joint":
                key = (config["tokens_per_arm"], config["budget"], config.get("eval", "docs-en-test"),
                       config.get("seed", 0), row["init"])
                by.setdefault(key, {})[row["loss"].replace("akt", "akt-" + config.get("relations", "qkv"))] = row["ppl"]
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
        akt_v = arms.get("akt-v+logits+lm")
        best = min(arms.get("lm", float("inf")), arms.get("logits", float("inf")))
        rows.append([budget, evaluated, f"init={init}", arms.get("lm"), arms.get("logits"), arms["logits+lm"],
                     arms.get("akt-qkv+logits+lm"), akt_v,
                     f"{akt_v - best:+.3f}" if akt_v is not None and best < float("inf") else "",
                     f"{akt_v - arms['logits+lm']:+.3f}" if akt_v is not None else ""])
    return md(["budget", "evaluated on", "student", "LM only", "logit KD", "LM + logit KD", "AKT (Q/K/V) + logit KD + LM",
               "AKT (V) + logit KD + LM", "AKT (V) + logit KD + LM - best of LM only, logit KD",
               "AKT (V) + logit KD + LM - (LM + logit KD)"], rows)
