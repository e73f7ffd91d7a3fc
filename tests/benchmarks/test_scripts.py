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
    assert name in ("common", "markdown", "tables") or callable(getattr(module, "main", None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the real benchmark on CUDA machines")
def test_sparse_matmul_refuses_a_machine_without_cuda() -> None:
    from benchmarks.sparse_matmul import main

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main()


def test_readme_tables_are_the_ones_the_results_generate(tmp_path) -> None:
    """Every table in README.md is what benchmarks/tables.py renders from the committed JSON
    (a hand edit, or a results file committed without re-rendering, fails here)."""
    from benchmarks.tables import ROOT, render_all

    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text())
    render_all(copy)
    assert copy.read_text() == (ROOT / "README.md").read_text(), "run: python -m benchmarks.tables"
