"""The AKT benchmark script: every arm composes against the schema, one arm runs at smoke
size (the CI version of benchmarks/distill_akt.py), and the table renders from the JSON."""
from __future__ import annotations

from benchmarks.distill_akt import ARMS, BUDGETS, overrides, render_table, run_arm
from tests.conftest import compose_config, needs_shared

WEIGHTS = {"lm": 1.0, "logit": 1.0, "akt": 1.0}


def test_every_arm_composes_with_the_same_budget_and_seed() -> None:
    for arm in ARMS:
        cfg = compose_config(overrides(*arm, BUDGETS["cpu"], WEIGHTS))
        d = cfg.distill
        assert (d.steps, d.batch_size, d.seq_len, cfg.seed) == (40, 8, 256, 0)
        assert d.loss == arm[1] and d.schedule == arm[2] and d.student.init == arm[0]


@needs_shared
def test_one_arm_at_smoke_size_and_the_table() -> None:
    row = run_arm("skip", "akt", "progressive", BUDGETS["smoke"], WEIGHTS)
    assert row["steps"] == 4 * 1 + 2 and row["tokens"] == row["steps"] * 2 * 64 and row["ppl"] > 1
    assert [p["name"] for p in row["phases"]] == ["layer0", "layer1", "layer2", "layer3", "joint"]
    payload = {"config": {**BUDGETS["smoke"], "tokens_per_arm": 256}, "date": "today", "git_sha": "0" * 40,
               "device": {"cpu": "x86_64", "threads": 1, "torch": "2"},
               "rows": [{"init": "teacher", "loss": "-", "schedule": "-", "ppl": 5.0, "params": 1}, row]}
    table = render_table(payload)
    assert "AKT (Q/K/V) + logit KD progressive" in table and "| student init=skip" in table
