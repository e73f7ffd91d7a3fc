"""Results files: one per configuration, filled safely by several processes at once."""
from __future__ import annotations

import argparse
import json

import pytest

import benchmarks.common as common
from benchmarks.distill_akt import default_name


def test_two_writers_of_one_file_keep_each_others_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    config = {"budget": "cpu8x"}
    a = common.Results("bench", config, key=("arm",))
    b = common.Results("bench", config, key=("arm",))  # both opened the file before any row
    a.add({"arm": "akt", "ppl": 21.0})
    b.add({"arm": "logits", "ppl": 20.0})
    a.add({"arm": "lm", "ppl": 25.0})
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted(r["arm"] for r in rows) == ["akt", "lm", "logits"]
    assert common.Results("bench", config, key=("arm",)).has(arm="logits")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_copy_of_the_tree_without_git_takes_its_sha_from_the_environment(tmp_path, monkeypatch) -> None:
    """On a lent GPU machine the tree arrives without .git: the results must still name the commit."""
    monkeypatch.setattr(common, "ROOT", tmp_path)  # no repository here
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("SHRINK_GIT_SHA", raising=False)
    assert common.git_sha() == "unknown"
    monkeypatch.setenv("SHRINK_GIT_SHA", "ab" * 20)
    assert common.git_sha() == "ab" * 20


def test_a_run_of_another_configuration_never_overwrites_measured_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.Results("bench", {"budget": "cpu"}, key=("arm",)).add({"arm": "akt", "ppl": 30.0})
    before = (tmp_path / "bench.json").read_text()
    with pytest.raises(SystemExit, match="another configuration"):
        common.Results("bench", {"budget": "cpu8x"}, key=("arm",))
    assert (tmp_path / "bench.json").read_text() == before


def test_a_rerun_resumes_a_file_whose_config_holds_tuples(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    config = {"shapes": [(4096, 4096), (14336, 4096)]}  # JSON gives them back as lists
    common.Results("bench", config, key=("batch",)).add({"batch": 1, "ms": 0.1})
    again = common.Results("bench", config, key=("batch",))
    assert again.has(batch=1) and not again.has(batch=16)


@pytest.mark.parametrize("budget,weight,layer_map,train,relations,dev,name", [
    ("cpu", 1.0, "uniform", "valid", "qkv", False, "distill_akt"),
    ("cpu4x", 0.1, "uniform", "valid", "qkv", False, "distill_akt_cpu4x_w0.1"),
    ("cpu", 1.0, "last", "valid", "qkv", False, "distill_akt_last"),
    ("cpu8x", 1.0, "uniform", "valid", "qkv", False, "distill_akt_cpu8x"),
    ("full", 1.0, "0:1,1:3", "valid", "qkv", False, "distill_akt_full_0-1-1-3_on-valid"),
    ("cpu", 1.0, "uniform", "valid", "v", False, "distill_akt_v"),
    ("cpu", 1.0, "uniform", "valid", "v", True, "distill_akt_v_dev"),
    ("cpu", 1.0, "uniform", "valid", "qkv", True, "distill_akt_dev"),
])
def test_distill_results_are_named_by_every_setting_off_the_default(budget, weight, layer_map, train, relations, dev,
                                                                    name) -> None:
    args = argparse.Namespace(akt_weight=weight, layer_map=layer_map, relation_heads=8, train=train, lr=[], seed=0,
                              relations=relations, dev=dev)
    assert default_name(budget, args) == name


def test_a_seed_other_than_0_names_its_own_file() -> None:
    args = argparse.Namespace(akt_weight=1.0, layer_map="uniform", relation_heads=8, train="valid", lr=[], seed=2,
                              relations="qkv", dev=False)
    assert default_name("cpu8x", args) == "distill_akt_cpu8x_seed2"


def test_an_arm_process_reports_its_last_row_and_a_failed_one_names_itself() -> None:
    """The ROW protocol between a benchmark and the arm it runs in a process of its own."""
    import subprocess
    import sys

    emit = "from benchmarks.common import print_row; print('log line'); print_row({'a': 1}); print_row({'a': 2})"
    done = subprocess.run([sys.executable, "-c", emit], cwd=common.ROOT, capture_output=True, text=True)
    assert common.row_of(done, "arm x") == {"a": 2}
    died = subprocess.run([sys.executable, "-c", emit + "; raise SystemExit('out of memory')"], cwd=common.ROOT,
                          capture_output=True, text=True)
    with pytest.raises(RuntimeError, match=r"(?s)arm x failed \(1\):\n.*out of memory"):
        common.row_of(died, "arm x")
    silent = subprocess.run([sys.executable, "-c", "print('no row')"], capture_output=True, text=True)
    with pytest.raises(RuntimeError, match=r"arm y failed \(0\)"):
        common.row_of(silent, "arm y")
