"""Evaluation as a user runs it: the file's own name, every window unless capped (and then
"n of N" in the log and metrics.json), several sets, bits per byte on Chinese text. An eval file
without a complete window and two sets of one name are rows of test_bad_inputs.py's table."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT
from tests.shrink.test_cli import shrink

TANG = ROOT / "tests" / "fixtures" / "tang-poems.jsonl"  # Tang poems, Debian fortunes-zh (tang300)


@pytest.fixture
def model(tiny_model_dir):
    """A tiny random Llama with the byte-level BPE trained on the shipped (English) Shakespeare."""
    return tiny_model_dir("llama")


def test_an_overridden_eval_file_is_evaluated_whole_under_its_own_name(tmp_path, model) -> None:
    result = shrink("pipeline=eval", f"model.path={model}", f"data.eval.path={TANG}", "data.eval.seq_len=64",
                    f"out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(m["ppl"]) == ["tang-poems"]
    total = m["eval_windows"]["tang-poems"]
    assert total["evaluated"] == total["total"] > 32 and total["seq_len"] == 64
    # Chinese: about 3 UTF-8 bytes per character, and the three figures describe one NLL
    (figures,) = m["stages"]["eval"].values()
    assert 2.5 < figures["bytes"] / figures["chars"] <= 3.0
    nll = math.log(m["ppl"]["tang-poems"]) * figures["tokens"]
    assert m["bits_per_byte"]["tang-poems"] * math.log(2) * figures["bytes"] == pytest.approx(nll, rel=1e-6)
    assert m["bits_per_char"]["tang-poems"] * math.log(2) * figures["chars"] == pytest.approx(nll, rel=1e-6)
    assert m["baseline_bits_per_byte"] == m["bits_per_byte"]


def test_a_capped_set_says_how_many_of_how_many_and_sets_are_measured_apart(tmp_path, model, shipped_corpus) -> None:
    valid = shipped_corpus / "valid.jsonl.gz"
    sets = f"data.eval=[{{path:{TANG},seq_len:64,max_windows:3}},{{path:{valid},seq_len:64,max_windows:2}}]"
    result = shrink("pipeline=eval", f"model.path={model}", "data.eval=null", sets, f"out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(m["ppl"]) == set(m["bits_per_byte"]) == {"tang-poems", "valid"}
    assert m["eval_windows"]["tang-poems"]["evaluated"] == 3 < m["eval_windows"]["tang-poems"]["total"]
    assert m["eval_windows"]["valid"]["evaluated"] == 2 < m["eval_windows"]["valid"]["total"]
    log = result.stdout + result.stderr
    assert "tang-poems, 3 of" in log and "capped by data.eval[0].max_windows" in log
    # an English tokenizer spends about a token per byte on Chinese, several bytes per token on English
    assert m["bits_per_byte"]["tang-poems"] > m["bits_per_byte"]["valid"]
