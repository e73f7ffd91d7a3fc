"""eval.tasks: lm-evaluation-harness on the in-memory model of a stage, results beside the
baseline's in metrics.json, the model card and `shrink report`. Bad task input (unknown name,
YAML that does not parse, a hub dataset while offline) is a row of test_bad_inputs.py's table."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from benchmarks.make_tasks import make_tasks
from engine.config import ModelConfig
from shrink.model_folder import load_model
from shrink.report import write_report
from shrink.tasks import SHIPPED, run_tasks
from tests.conftest import SHARED, TEACHER, compose_config, needs_shared, run_shrink, tiny_data_overrides

pytest.importorskip("lm_eval")
LIMIT = 8


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@torch.no_grad()
def next_line_by_hand(model: transformers.PreTrainedModel, tokenizer) -> tuple[float, float]:
    """acc and acc_norm of the first LIMIT items: the choice of highest log-likelihood after the
    passage (acc_norm: per character of the choice), continuation tokens split as lm-eval does
    (the passage's trailing newline is scored as the continuation's first token)."""
    items = [json.loads(line) for line in (SHIPPED / "shakespeare_next_line.jsonl").read_text().splitlines()[:LIMIT]]
    acc = acc_norm = 0
    for item in items:
        context = item["passage"]
        lls = []
        for choice in item["choices"]:
            whole = tokenizer(context + "\n" + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, :-1].float(), dim=-1)
            lls.append(float(logp[torch.arange(n_ctx - 1, len(whole) - 1), torch.tensor(whole[n_ctx:])].sum()))
        acc += max(range(4), key=lambda i: lls[i]) == item["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(item["choices"][i])) == item["label"]
    return acc / LIMIT, acc_norm / LIMIT


@torch.no_grad()
def greedy_word(model: transformers.PreTrainedModel, tokenizer, context: str, word: str) -> bool:
    """LAMBADA's accuracy by hand: every token of " word" is the model's argmax after the context
    (a multi-token word must come out whole)."""
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    whole = tokenizer(context + " " + word, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([whole])).logits[0, n_ctx - 1:-1]
    return logits.argmax(-1).tolist() == whole[n_ctx:]


@needs_shared
def test_last_word_accuracy_is_the_greedy_match_of_the_whole_word(tmp_path) -> None:
    """The last-word task scores what LAMBADA scores: the target, after one space, is the
    teacher's greedy continuation. On docs-en (the teacher's own domain) it finds some words;
    on the shipped Julius Caesar none, by hand as in lm-eval: that 0 is the model's (it read
    only Python and Perl documentation), not a lost space or a wrong metric."""
    items = 24
    make_tasks(SHARED / "data" / "docs-en" / "test.jsonl.gz", tmp_path, "docs_en", items=items)
    model, tokenizer = load_model(ModelConfig(path=str(TEACHER)))
    cfg = compose_config(["pipeline=eval", f"model.path={TEACHER}", f"eval.task_dir={tmp_path}",
                          "eval.tasks=[docs_en_last_word,shakespeare_last_word]", f"eval.limit={items}"])
    tasks = run_tasks(model, tokenizer, cfg, "test")
    hits = {}
    for task, folder in (("docs_en_last_word", tmp_path), ("shakespeare_last_word", SHIPPED)):
        rows = [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()[:items]]
        assert all(r["target"].strip() == r["target"] and not r["context"][-1].isspace() for r in rows)
        hits[task] = sum(greedy_word(model, tokenizer, r["context"], r["target"]) for r in rows) / items
        assert tasks[task]["acc"] == pytest.approx(hits[task]) and tasks[task]["samples"] == items
    assert hits["docs_en_last_word"] > 0 == hits["shakespeare_last_word"]


def test_tasks_before_and_after_gptq_in_metrics_card_and_report(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.group_size=32",
                          "eval.tasks=[shakespeare_next_line,shakespeare_last_word]", f"eval.limit={LIMIT}"], out)
    after, before = metrics["tasks"], metrics["baseline_tasks"]
    assert set(after) == set(before) == {"shakespeare_next_line", "shakespeare_last_word"}
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(after["shakespeare_next_line"])
    assert after["shakespeare_next_line"]["samples"] == LIMIT and "perplexity" in after["shakespeare_last_word"]
    # the same figures by hand: the dense input model (baseline) and the exported GPTQ model,
    # whose packed QuantLinears are what the in-run evaluation measured
    dense, tokenizer = load_model(ModelConfig(path=str(folder)))
    packed, _ = load_model(ModelConfig(path=str(out / "model")))
    for model, figures in ((dense, before), (packed, after)):
        acc, acc_norm = next_line_by_hand(model, tokenizer)
        assert figures["shakespeare_next_line"]["acc"] == pytest.approx(acc)
        assert figures["shakespeare_next_line"]["acc_norm"] == pytest.approx(acc_norm)
    card = (out / "model" / "README.md").read_text()
    assert "| shakespeare_next_line | acc_norm |" in card and "bits per byte" in card
    report = (write_report([tmp_path]) / "report.md").read_text()
    assert "shakespeare_next_line acc_norm" in report and "± its standard error" in report
    # before as after: the baseline's accuracy with its stderr
    assert f"Baseline acc_norm on shakespeare_next_line: {before['shakespeare_next_line']['acc_norm']:.3f} ± " in report
