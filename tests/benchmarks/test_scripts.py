"""Every benchmark script imports, and the CUDA-only one says so on a CPU machine."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                 if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    # libraries of the scripts, not scripts: no main
    assert name in ("common", "markdown", "tables", "distill_akt_arms", "distill_akt_tables") or callable(
        getattr(module, "main", None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real benchmark on CUDA machines")
def test_sparse_matmul_refuses_a_machine_without_cuda() -> None:
    from benchmarks.sparse_matmul import main

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main()


@pytest.mark.parametrize("name", ["README.md", "docs/results.md"])
def test_readme_tables_are_the_ones_the_results_generate(name: str) -> None:
    """Every table in README.md and docs/results.md is what benchmarks/tables.py renders from the
    committed JSON (a hand edit, or a results file committed without re-rendering, fails here)."""
    from benchmarks.tables import GENERATED, ROOT, render

    path = ROOT / name
    assert path in GENERATED
    assert render(path.read_text(), path.parent) == path.read_text(), "run: python -m benchmarks.tables"


def test_every_generated_table_stands_in_a_generated_file() -> None:
    """A table rendered from the results but spliced into no file would silently vanish."""
    from benchmarks.tables import GENERATED, ROOT, blocks

    texts = "".join(path.read_text() for path in GENERATED)
    missing = [name for name in blocks(ROOT) if f"<!-- BEGIN table:{name} -->" not in texts]
    assert not missing, f"tables with no markers in {[str(p.relative_to(ROOT)) for p in GENERATED]}: {missing}"


def test_distill_memory_interleaves_the_ratio_arms_and_runs_naive_kernels_only_where_they_fit() -> None:
    from benchmarks.distill_memory import NAIVE_MAX, RATIO_T, REPEATS, arms, overrides
    from distill.plan import check_distill_config
    from shrink.config import compose

    plan = arms()
    ratio = plan[:2 * REPEATS]
    assert [a["loss"] for a in ratio] == ["logits", "akt"] * REPEATS
    assert {(a["seq_len"], a["kernels"]) for a in ratio} == {(RATIO_T, "blockwise")}
    keys = [tuple(a.values()) for a in plan]
    assert len(keys) == len(set(keys))
    assert all(a["seq_len"] <= NAIVE_MAX[(a["vocab"], a["loss"])] for a in plan if a["kernels"] == "naive")
    assert {"naive", "blockwise"} == {a["kernels"] for a in plan if a["seq_len"] == 2048 and a["loss"] == "akt"}
    cfg = compose(overrides(Path("/teacher"), 4096, "akt", "blockwise", 2))
    check_distill_config(cfg.distill)
    assert (cfg.distill.seq_len, cfg.distill.batch_size, cfg.distill.relation_heads) == (4096, 1, 16)
    assert list(cfg.pipeline.stages) == ["distill"] and cfg.distill.kernels == "blockwise"
