"""What every peer arm of benchmarks/quant_frontier.py shares. A peer runs as a script in its own
virtual environment (its own torch/transformers), so this imports nothing of the project:

    VENV/bin/python benchmarks/peers/TOOL_arm.py --model DIR --windows FILE --bits 3 --group-size 128 --out DIR

It loads the model (fp32) and the calibration windows the benchmark sampled (the very token ids
shrink calibrates on), times the tool's quantization alone, saves a folder shrink's evaluator
reads (the tool's GPTQ checkpoint, or the dequantized weights as a dense model) with the
tokenizer, and prints one line `ROW {json}`: seconds, load averages, the tool's version.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

ROW = "ROW "


def arguments(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the model folder (Hugging Face, safetensors)")
    parser.add_argument("--windows", required=True, help="safetensors file with input_ids [n, seq_len]")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--out", required=True, help="where the quantized model folder goes")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def load(args: argparse.Namespace, model: bool = True) -> tuple[Any, Any, Any]:
    """(model fp32 on the CPU or None, tokenizer, windows int64 [n, seq_len])."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval() if model else None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = load_file(args.windows)["input_ids"].to(torch.int64)
    return model, tokenizer, windows


def timed(call: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """The call's result and its seconds, with the machine's load average before and after."""
    before = os.getloadavg()[0]
    start = time.perf_counter()
    result = call()
    return result, {"seconds": time.perf_counter() - start, "load_average": [before, os.getloadavg()[0]]}


def finish(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """Tokenizer files next to the saved weights (the evaluator tokenizes with them), then the row."""
    out = Path(args.out)
    for name in os.listdir(args.model):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            if not (out / name).exists():
                shutil.copy(Path(args.model) / name, out / name)
    print(ROW + json.dumps(row), flush=True)
