"""`shrink report`: a real Hydra multirun gathered into Markdown, CSV and a Pareto plot."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shrink import report as report_mod
from engine.errors import ShrinkError
from shrink.report import build_table, find_runs, pareto_front, render_markdown, write_report
from tests.conftest import EVAL_NAME, ROOT, save_with_tokenizer, tiny_data_overrides, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


def shrink(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "shrink.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shipped_tokenizer: Path) -> Path:
    """`shrink -m` over quant.bits=2,4 on a tiny model: Hydra's own multirun layout."""
    root = tmp_path_factory.mktemp("sweep")
    model = save_with_tokenizer(tiny_model("llama"), root / "tiny", shipped_tokenizer)
    result = shrink("-m", "pipeline=quantize", f"model.path={model}", *tiny_data_overrides(), "quant.method=rtn",
                    "quant.bits=2,4", "quant.group_size=32", f"hydra.sweep.dir={root / 'multirun'}")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "multirun"


@pytest.mark.slow
def test_report_of_a_multirun_sweep(sweep: Path, tmp_path: Path) -> None:
    result = shrink("report", str(sweep), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-2000:]
    md = (tmp_path / "r" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    assert "quant.bits" in header and f"ppl {EVAL_NAME}" in header and "size (MiB)" in header
    assert "quant.method" not in header  # the same in every run: not a varying setting
    rows = list(csv.DictReader((tmp_path / "r" / "report.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1"] and [r["quant.bits"] for r in rows] == ["2", "4"]
    for row in rows:
        metrics = json.loads((sweep / row["run"] / "metrics.json").read_text())
        assert float(row[f"ppl:{EVAL_NAME}"]) == pytest.approx(metrics["ppl"][EVAL_NAME])
        assert int(row["size_bytes"]) == metrics["size_bytes"]
        assert float(row["seconds"]) == pytest.approx(metrics["seconds"]["total"])
    png = (tmp_path / "r" / "report.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    assert not list((tmp_path / "r").glob(".*"))  # no temporary files left


@pytest.mark.slow
def test_default_out_is_the_first_dir(sweep: Path) -> None:
    write_report([sweep])
    assert {"report.md", "report.csv", "report.png"} <= {p.name for p in sweep.iterdir()}
    assert len(find_runs([sweep])) == 2  # the report itself is not a run


def fake_run(folder: Path, ppl: float, size: int, **recipe) -> Path:
    folder.mkdir(parents=True)
    stages = recipe.pop("stages", ["quantize", "eval", "export"])
    plain = {"pipeline": {"name": "x", "stages": stages}, "quant": {"method": "gptq", "bits": 4},
             "prune": {"method": "sparsegpt", "sparsity": 0.5}, "out": str(folder), "fingerprints": {"a": 1}}
    for key, value in recipe.items():
        section, _, name = key.partition("__")
        plain[section][name] = value
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"defaults": ["shrink_schema", "_self_"], **plain}))
    metrics = {"ppl": {"test": ppl}, "baseline_ppl": {"test": 10.0}, "size_bytes": size, "bits_per_weight": 4.0,
               "sparsity": 0.0, "seconds": {"quantize": 1.0, "total": 2.0}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_pareto_front_is_the_non_dominated_points() -> None:
    points = [(1.0, 30.0), (2.0, 20.0), (3.0, 25.0), (4.0, 10.0), (2.0, 21.0)]
    assert pareto_front(points) == [0, 1, 3]


def test_rows_show_varying_settings_in_natural_order(tmp_path: Path) -> None:
    for job, bits in [(10, 2), (2, 3), (1, 4)]:
        fake_run(tmp_path / str(job), ppl=20.0 - bits, size=bits * 100, quant__bits=bits)
    fake_run(tmp_path / "prune_only", ppl=30.0, size=1000, stages=["prune", "eval"], quant__bits=8)
    table = build_table(find_runs([tmp_path]))
    assert [r.label for r in table.runs] == ["1", "2", "10", "prune_only"]
    assert "quant.bits" in table.settings and "out" not in table.settings
    assert "fingerprints.a" not in table.settings
    assert table.runs[-1].settings.get("quant.bits") is None  # not a quantize run: blank, not a default
    assert {table.runs[i].label for i in table.pareto} == {"1", "2", "10"}  # prune_only is beaten


def test_no_runs_and_broken_metrics_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ShrinkError, match="no run folders"):
        write_report([tmp_path])
    with pytest.raises(ShrinkError, match="is not a folder"):
        write_report([tmp_path / "missing"])
    run = fake_run(tmp_path / "0", ppl=1.0, size=1)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ShrinkError, match=r"0/metrics.json"):
        write_report([tmp_path])
    assert not list(tmp_path.glob("report.*")) and not list(tmp_path.glob(".report*"))


def test_points_it_cannot_report_are_named_and_the_rest_reported(tmp_path: Path) -> None:
    """A metrics.json value of the wrong type, a null where a number goes, a failed and an
    unfinished point: the report shows what it can and names the others with their reasons."""
    fake_run(tmp_path / "0", ppl=5.0, size=100)
    nulls = fake_run(tmp_path / "1", ppl=4.0, size=200)
    metrics = json.loads((nulls / "metrics.json").read_text())
    (nulls / "metrics.json").write_text(json.dumps({**metrics, "size_bytes": None, "baseline_ppl": None}))
    typed = fake_run(tmp_path / "2", ppl=3.0, size=300)
    (typed / "metrics.json").write_text(json.dumps({**metrics, "ppl": {"test": "3.1"}}))
    (tmp_path / "3" / ".hydra").mkdir(parents=True)
    (tmp_path / "3" / "failed.json").write_text(json.dumps({"error": "quant.damp: 0.0 must be in (0, 1)"}))
    (tmp_path / "4" / ".hydra").mkdir(parents=True)
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "progress.json").write_text("{}")
    out = write_report([tmp_path], tmp_path / "r")
    md = (out / "report.md").read_text()
    assert md.startswith("# Sweep report (2 runs)")
    assert "- 2: " in md and "ppl.test is str '3.1', not a number" in md
    assert "- 3: failed: quant.damp: 0.0 must be in (0, 1)" in md
    assert "- 4: failed or not run (no metrics.json)" in md and "- 5: unfinished (no metrics.json)" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1"] and rows[1]["size_bytes"] == ""


def test_a_failing_plot_leaves_the_previous_report_untouched(tmp_path: Path, monkeypatch) -> None:
    fake_run(tmp_path / "runs" / "0", ppl=5.0, size=100)
    out = write_report([tmp_path / "runs"], tmp_path / "r")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(table, path):
        raise RuntimeError("disk full")
    monkeypatch.setattr(report_mod, "render_plot", broken)
    fake_run(tmp_path / "runs" / "1", ppl=4.0, size=200)
    with pytest.raises(RuntimeError):
        write_report([tmp_path / "runs"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_runs_of_one_recipe_say_where_their_weights_part(tmp_path: Path) -> None:
    """Two machines replaying one recipe: the report names the first Linear whose weights differ."""
    def linears(*weights: str) -> list[dict]:
        return [{"full_name": f"model.layers.0.{n}", "layer": 0, "fingerprint": {"hessian": h, "weights": w}}
                for n, h, w in zip(("q", "k", "v"), ("h0", "h0", "h1"), weights)]

    for name, weights in (("a", ("w0", "w1", "w2")), ("b", ("w0", "w1", "w2")), ("c", ("w0", "x1", "x2"))):
        folder = fake_run(tmp_path / name, ppl=12.0, size=100)
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics["stages"] = {"quantize": {"layers": linears(*weights)}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    fake_run(tmp_path / "d", ppl=13.0, size=100, quant__bits=3)  # other settings: not compared
    text = render_markdown(build_table(find_runs([tmp_path])))
    assert "b has the settings of a and the same weights in every compressed Linear." in text
    assert ("c has the settings of a; their weights part at model.layers.0.k "
            "(its Hessian agrees, the solve differed).") in text
    assert "d has the settings" not in text
