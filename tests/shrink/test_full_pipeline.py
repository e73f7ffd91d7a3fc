"""One command from the teacher preset to a deployable checkpoint: distill (AKT) -> prune
(SparseGPT 2:4) -> quantize (GPTQ 4-bit) -> eval -> export, then a fresh process loads the
export with transformers (gptqmodel: the default 4-bit export is in the AWQ layout) and generates text. The presets read ../shared's
layout, here built from what ships (tests/conftest.py: shipped_shared)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT

LOAD_AND_GENERATE = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
inputs = tokenizer("The Python standard library", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
new = out[0][inputs["input_ids"].shape[1]:]
print("NEW_TOKENS:", len(new), repr(tokenizer.decode(new)))
"""


@pytest.mark.slow
def test_full_recipe_in_one_command_then_load_and_generate(tmp_path, on_shipped_shared) -> None:
    pytest.importorskip("gptqmodel")
    out = tmp_path / "full"
    calib = on_shipped_shared / "data" / "docs-en" / "valid.jsonl.gz"
    args = ["pipeline=full", "model=llama_teacher", "data=docs_en",
            "distill.student.init=skip", "distill.student.num_layers=4", "distill.steps=6", "distill.warmup=2",
            "distill.seq_len=128", "distill.batch_size=4",
            f"data.calib.path={calib}", "data.calib.num_samples=16", "data.calib.seq_len=128",
            # group 32 divides every input width of the tiny models (gptqmodel's CPU kernel needs that)
            "data.eval.max_windows=8", "prune.pattern='2:4'", "quant.bits=4", "quant.group_size=32",
            f"out={out}"]
    result = subprocess.run([sys.executable, "-m", "shrink.cli", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"distill", "prune", "quantize", "eval", "export"}
    assert metrics["stages"]["prune"]["pattern_ok"] is True
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["quantization_config"]["bits"] == 4
    teacher = AutoModelForCausalLM.from_pretrained(on_shipped_shared / "models" / "llama-teacher")
    assert metrics["params"] < sum(p.numel() for p in teacher.parameters())
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---") and "gptq" in card
    loaded = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out / "model")], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    # a 6-step student pruned 2:4 and quantized to 4 bits is no poet: check that it generates
    generated = [line for line in loaded.stdout.splitlines() if line.startswith("NEW_TOKENS:")]
    assert generated and int(generated[0].split()[1]) > 0, loaded.stdout
