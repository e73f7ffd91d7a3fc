"""Builds two offline lm-eval tasks from any JSONL corpus ({"text": ...} per line):

- `<name>_next_line` (multiple choice): a passage of a document's lines; choose the line that
  truly follows it among four lines of the same document (chance 25%).
- `<name>_last_word` (LAMBADA-style): the last word of a line, given the passage before it;
  accuracy is whether the word is the model's greedy continuation.

Each task is an lm-eval YAML plus its items as JSONL, read through local_jsonl.py (copied next
to them), so the folder works from anywhere as `eval.task_dir`. The package's own tasks are
made from the public-domain Julius Caesar it ships:

    python -m benchmarks.make_tasks shrink/assets/shakespeare-eval.jsonl.gz shrink/assets/tasks \\
        --name shakespeare --items 300
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from engine.data import load_texts

LOADER = Path(__file__).resolve().parent.parent / "shrink" / "assets" / "tasks" / "local_jsonl.py"
CONTEXT_LINES = 6
WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z']{2,})[.,;:!?]*$")


def usable(line: str) -> bool:
    """A line of running text: several words with lower-case letters (not a heading or a name)."""
    return len(line.split()) >= 4 and any(c.islower() for c in line)


def doc_lines(texts: list[str]) -> list[list[str]]:
    return [[line.strip() for line in text.splitlines() if line.strip()] for text in texts]


def next_line_items(docs: list[list[str]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Passage of CONTEXT_LINES lines, the true next line and three lines of similar length from
    elsewhere in the same document (at least 20 lines away)."""
    slots = [(d, i) for d, lines in enumerate(docs) for i in range(CONTEXT_LINES, len(lines)) if usable(lines[i])]
    items = []
    for d, i in rng.sample(slots, min(n * 3, len(slots))):
        lines, gold = docs[d], docs[d][i]
        pool = [x for j, x in enumerate(lines) if abs(j - i) > 20 and usable(x) and x != gold
                and 0.5 <= len(x) / len(gold) <= 2.0]
        if len(set(pool)) < 3:
            continue
        choices = rng.sample(sorted(set(pool)), 3) + [gold]
        rng.shuffle(choices)
        items.append({"passage": "\n".join(lines[i - CONTEXT_LINES:i]), "choices": choices,
                      "label": choices.index(gold)})
        if len(items) == n:
            break
    return items


def last_word_items(docs: list[list[str]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Context = CONTEXT_LINES lines and the line up to its last word; target = that word."""
    slots = [(d, i) for d, lines in enumerate(docs) for i in range(CONTEXT_LINES, len(lines))
             if usable(lines[i]) and WORD.match(lines[i])]
    items = []
    for d, i in rng.sample(slots, min(n, len(slots))):
        head, word = WORD.match(docs[d][i]).groups()
        items.append({"context": "\n".join(docs[d][i - CONTEXT_LINES:i] + [head]), "target": word})
    return items


def task_yaml(task: str, kind: str) -> str:
    common = (f"task: {task}\ncustom_dataset: !function local_jsonl.load\ndataset_kwargs:\n  file: {task}.jsonl\n"
              "test_split: test\n")
    if kind == "next_line":
        return common + ("output_type: multiple_choice\ndoc_to_text: \"{{passage}}\\n\"\ntarget_delimiter: \"\"\n"
                         "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
                         "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
                         "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
                         "metadata:\n  version: 1.0\n  chance: 0.25\n")
    return common + ("output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{' ' + target}}\"\n"
                     "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
                     "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
                     "metadata:\n  version: 1.0\n  chance: 0.0\n")


def make_tasks(corpus: str | Path, out: str | Path, name: str, items: int = 300, seed: int = 0,
               text_field: str = "text") -> list[str]:
    """Write <name>_next_line and <name>_last_word (YAML + JSONL) and the loader into `out`."""
    docs = doc_lines(load_texts(corpus, text_field, key="corpus"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if LOADER.parent.resolve() != out.resolve():
        shutil.copy(LOADER, out / LOADER.name)
    made = []
    for kind, build in (("next_line", next_line_items), ("last_word", last_word_items)):
        task = f"{name}_{kind}"
        rows = build(docs, items, random.Random(seed))
        (out / f"{task}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
        (out / f"{task}.yaml").write_text(task_yaml(task, kind))
        made.append(task)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="JSONL corpus (optionally .gz) with a text field")
    parser.add_argument("out", help="folder for the task YAMLs and items (an eval.task_dir)")
    parser.add_argument("--name", required=True, help="task name prefix")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-field", default="text")
    args = parser.parse_args()
    print(make_tasks(args.corpus, args.out, args.name, args.items, args.seed, args.text_field))


if __name__ == "__main__":
    main()
