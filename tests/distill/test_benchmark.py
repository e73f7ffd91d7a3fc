"""The AKT benchmark script: every arm composes against the schema, one arm runs at smoke
size (the CI version of benchmarks/distill_akt.py), and the table renders from the JSON."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from benchmarks.distill_akt_arms import ARMS, BUDGETS, overrides, run_arm
from benchmarks.distill_akt_tables import render_table
from tests.conftest import compose_config

WEIGHTS = {"lm": 1.0, "logit": 1.0, "akt": 1.0}


def test_every_arm_composes_with_the_same_budget_and_seed() -> None:
    for arm in ARMS:
        cfg = compose_config(overrides(*arm, BUDGETS["cpu"], WEIGHTS))
        distill = cfg.distill
        assert (distill.steps, distill.batch_size, distill.seq_len, cfg.seed) == (40, 8, 256, 0)
        assert distill.loss == arm[1] and distill.schedule == arm[2] and distill.student.init == arm[0]
        assert cfg.model.device == "auto"  # the GPU of a lent machine (--full), the CPU here


def test_one_arm_at_smoke_size_and_the_table(on_shipped_shared: Path) -> None:
    row = run_arm("skip", "akt", "progressive", BUDGETS["smoke"], WEIGHTS)
    assert row["steps"] == 4 * 1 + 2 and row["tokens"] == row["steps"] * 2 * 64 and row["ppl"] > 1
    assert [p["name"] for p in row["phases"]] == ["layer0", "layer1", "layer2", "layer3", "joint"]
    payload = {"config": {**BUDGETS["smoke"], "tokens_per_arm": 256}, "date": "today", "git_sha": "0" * 40,
               "device": {"cpu": "x86_64", "threads": 1, "torch": "2"},
               "rows": [{"init": "teacher", "loss": "-", "schedule": "-", "ppl": 5.0, "params": 1}, row]}
    table = render_table(payload)
    assert "AKT (Q/K/V) + logit KD progressive" in table and "| student init=skip" in table


def test_dev_arms_distill_and_measure_on_two_halves_of_valid(on_shipped_shared: Path) -> None:
    from benchmarks.distill_akt_arms import DEFAULT_OPTS, DEV_EVERY, dev_split

    with gzip.open(on_shipped_shared / "data" / "docs-en" / "valid.jsonl.gz", "rt") as f:
        valid = len(f.readlines())

    with dev_split() as files:
        docs = {part: [json.loads(line)["source"] for line in gzip.open(path, "rt")] for part, path in files.items()}
        cfg = compose_config(overrides("pretrained", "akt", "joint", BUDGETS["cpu"], WEIGHTS,
                                       {**DEFAULT_OPTS, "dev": files, "relations": "v"}))
    assert len(docs["eval"]) == valid // DEV_EVERY and len(docs["train"]) == valid - valid // DEV_EVERY
    assert not set(docs["eval"]) & set(docs["train"])
    assert cfg.data.eval.path == files["eval"] and cfg.data.eval.name == "docs-en-dev"
    assert cfg.distill.train_path == files["train"] and cfg.distill.relations == "v"
    assert not Path(files["eval"]).exists()  # the split lives only as long as the run


def test_budget_table_lines_up_the_three_arms_and_skips_non_default_settings() -> None:
    from benchmarks.distill_akt_tables import render_budgets, render_relations, render_variants

    def payload(budget: str, tokens: int, akt_weight: float, ppl: dict[str, float]) -> dict:
        config = {"budget": budget, "tokens_per_arm": tokens, "weights": {"akt": akt_weight},
                  "relation_heads": 8, "train_split": "valid"}
        rows = [{"init": "skip", "loss": loss, "schedule": "joint", "ppl": v, "tokens_per_s": 100.0}
                for loss, v in ppl.items()]
        return {"benchmark": f"distill_akt_{budget}_w{akt_weight}", "config": config, "rows": [{"init": "teacher", "loss": "-", "schedule": "-", "ppl": 11.0}] + rows}

    payloads = [payload("cpu4x", 408_708, 1.0, {"lm": 25.0, "logits": 21.0, "akt": 21.5}),
                payload("cpu", 204_354, 1.0, {"lm": 34.0, "logits": 30.0, "akt": 29.0}),
                payload("cpu", 204_354, 0.1, {"akt": 1.0}),
                payload("cpu", 204_354, 1.0, {"akt": 2.0}), payload("cpu", 204_354, 1.0, {"akt": 3.0})]
    payloads[3]["config"]["relations"] = "v"
    payloads[4]["config"]["eval"] = "docs-en-dev"
    variants = render_variants(payloads).splitlines()[2:]
    assert len(variants) == 1  # relations v and the dev split are render_relations' rows
    assert "| AKT (Q/K/V) + logit KD | weight 0.1, map uniform, relations qkv | docs-en-test | 1.000 |" in variants[0]
    relations = render_relations(payloads).splitlines()[2:]
    assert relations == ["| cpu | docs-en-test | init=skip | 34.000 | 30.000 | 29.000 | 2.000 | -28.000 |"]
    payloads[4]["config"]["relations"] = "v"  # a dev run of V alone: its own row, without the other arms
    assert render_relations(payloads).splitlines()[2] == "| cpu | docs-en-dev | init=skip |  |  |  | 3.000 |  |"
    lines = render_budgets(payloads).splitlines()[2:]
    assert len(lines) == 2  # the weight-0.1 file is a variant, not a budget point
    assert lines[0].startswith("| cpu | 204,354 | 1.0 | init=skip | 34.000 | 30.000 | 29.000 | -1.000 |")
    assert lines[1].startswith("| cpu4x | 408,708 | 2.0 | init=skip | 25.000 | 21.000 | 21.500 | +0.500 |")


def test_seed_table_gives_each_seeds_gap_and_their_spread() -> None:
    from benchmarks.distill_akt_tables import render_budgets, render_seeds, render_variants

    def payload(seed: int, arms: dict[str, float], relations: str = "qkv") -> dict:
        config = {"budget": "cpu8x", "tokens_per_arm": 655_360, "weights": {"akt": 1.0}, "relation_heads": 8,
                  "train_split": "valid", **({"seed": seed} if seed else {}),
                  **({"relations": relations} if relations != "qkv" else {})}
        rows = [{"init": "skip", "loss": loss, "schedule": "joint", "ppl": v, "tokens_per_s": 1.0}
                for loss, v in arms.items()]
        return {"benchmark": f"distill_akt_cpu8x_seed{seed}", "config": config, "rows": rows}

    payloads = [payload(0, {"logits": 18.0, "akt": 17.0}), payload(2, {"logits": 18.0, "akt": 18.5}),
                payload(1, {"logits": 18.0, "akt": 17.5})]
    (line,) = render_seeds(payloads).splitlines()[2:]
    assert line == ("| cpu8x | init=skip | AKT (Q/K/V) + logit KD | 0, 1, 2 | 18.000, 18.000, 18.000 "
                    "| 17.000, 17.500, 18.500 | -1.000, -0.500, +0.500 | -0.333 ± 0.764 | 2 of 3 | - |")
    assert len(render_budgets(payloads).splitlines()) == 3  # only seed 0 is a budget point
    assert len(render_variants(payloads).splitlines()) == 2  # and no seed is a variant
    assert len(render_seeds(payloads[:1]).splitlines()) == 2  # one seed: no spread to show
    # V alone over two seeds, with and without the LM term. Seed 0's logit KD comes from the Q/K/V
    # file; each AKT arm meets the arm it adds to (akt+logits+lm: logits+lm); the bar (ahead of LM
    # only and logit KD) counts only seeds where both were measured
    v = [payload(0, {"akt": 17.2, "akt+logits+lm": 17.1, "logits+lm": 17.3}, "v"),
         payload(1, {"lm": 17.9, "logits": 18.1, "akt": 18.0, "logits+lm": 17.8, "akt+logits+lm": 17.85}, "v")]
    lines = render_seeds(payloads + v).splitlines()[2:]
    assert lines[1:] == [
        "| cpu8x | init=skip | AKT (V) + logit KD | 0, 1 | 18.000, 18.100 | 17.200, 18.000 | -0.800, -0.100 "
        "| -0.450 ± 0.495 | 2 of 2 | 0 of 1 |",
        "| cpu8x | init=skip | AKT (V) + logit KD + LM | 0, 1 | 17.300, 17.800 | 17.100, 17.850 | -0.200, +0.050 "
        "| -0.075 ± 0.177 | 1 of 2 | 1 of 1 |"]


def test_lm_term_table_sets_akt_with_lm_beside_every_arm_it_must_beat() -> None:
    from benchmarks.distill_akt_tables import render_lm_term

    def payload(relations: str, arms: dict[str, float]) -> dict:
        config = {"budget": "cpu", "tokens_per_arm": 81_920, "weights": {"akt": 1.0}, "relation_heads": 8,
                  "train_split": "valid", **({"relations": relations} if relations != "qkv" else {})}
        rows = [{"init": "pretrained", "loss": loss, "schedule": "joint", "ppl": v} for loss, v in arms.items()]
        return {"benchmark": "b", "config": config, "rows": rows}

    payloads = [payload("qkv", {"lm": 12.9, "logits": 13.0, "logits+lm": 12.8, "akt+logits+lm": 13.5}),
                payload("v", {"akt": 12.95, "akt+logits+lm": 12.75})]
    (line,) = render_lm_term(payloads).splitlines()[2:]
    assert line == ("| cpu | docs-en-test | init=pretrained | 12.900 | 13.000 | 12.800 | 13.500 | 12.750 "
                    "| -0.150 | -0.050 |")
    assert len(render_lm_term(payloads[1:]).splitlines()) == 2  # no LM + logit KD arm: no row
