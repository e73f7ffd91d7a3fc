"""Calibration over torch.distributed: 1 process against `torchrun --nproc_per_node 2`, one
thread each, GPTQ 4-bit g128 on the shared teacher and moe-teacher (docs-en, 128 x 512
calibration windows, eval on docs-en test). Per model: the share of identical 4-bit codes
(every quantized Linear, unpacked), the perplexity of both and their relative difference, the
wall time of both (the whole command: imports, load, quantize, eval, export) and the
quantize stage's own seconds. Writes benchmarks/results/scale_distributed.json.

    python -m benchmarks.scale_distributed            # both models
    python -m benchmarks.scale_distributed --quick    # a smoke run (16 x 128, 8 eval windows)
    python -m benchmarks.scale_distributed --model moe-teacher --calib 16 --eval-windows 32  # a smaller row

A row measured with --calib / --eval-windows records them (`extra_overrides`).

The 1-minute load average before and after each arm is recorded: on a machine shared with
other jobs the timings are noisy, the codes and perplexities are not.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from benchmarks.common import ROOT, Results
from benchmarks.markdown import footer, md
from quant.pack import unpack_rows

SHARED = Path(os.environ.get("SHRINK_SHARED", ROOT.parent / "shared"))
# both in fp32 on the CPU (the llama_teacher preset's dtype and device)
MODELS = {"llama-teacher": ["model=llama_teacher"],
          "moe-teacher": ["model=llama_teacher", f"model.path={SHARED / 'models' / 'moe-teacher'}"]}
BASE = ["data=docs_en", "pipeline=quantize", "eval.baseline=false", "quant.method=gptq", "quant.bits=4",
        "quant.group_size=128", "quant.sym=true", "quant.act_order=false", "quant.true_sequential=true"]
QUICK = ["data.calib.num_samples=16", "data.calib.seq_len=128", "data.eval.max_windows=8"]


def command(procs: int, overrides: list[str], out: Path) -> list[str]:
    head = [sys.executable, "-m", "shrink"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "shrink"]
    return head + overrides + [f"out={out}"]


def arm(procs: int, overrides: list[str], out: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command(procs, overrides, out), cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{procs} process(es) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": wall, "quantize_seconds": metrics["seconds"]["quantize"],
            "eval_seconds": metrics["seconds"].get("eval"), "ppl": next(iter(metrics["ppl"].values())),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}


def codes(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized Linear's 4-bit codes, unpacked (int32 [in, out])."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".qweight"):
                    out[key] = unpack_rows(f.get_tensor(key), 4)
    return out


def compare(a: Path, b: Path) -> dict[str, Any]:
    ca, cb = codes(a), codes(b)
    if ca.keys() != cb.keys():
        raise SystemExit(f"the two checkpoints quantize different Linears: {sorted(ca.keys() ^ cb.keys())[:3]}")
    same = sum(int((ca[k] == cb[k]).sum()) for k in ca)
    total = sum(ca[k].numel() for k in ca)
    differ = [k for k in ca if not torch.equal(ca[k], cb[k])]
    return {"codes": total, "identical_codes": same, "identical_share": same / total,
            "linears": len(ca), "linears_identical": len(ca) - len(differ)}


def measure(name: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    overrides = MODELS[name] + BASE + (QUICK if quick else []) + extra
    with tempfile.TemporaryDirectory() as tmp:
        one = arm(1, overrides, Path(tmp) / "one")
        two = arm(2, overrides, Path(tmp) / "two")
        match = compare(Path(tmp) / "one" / "model", Path(tmp) / "two" / "model")
    return {"model": name, "extra_overrides": extra, "one": one, "two": two, **match,
            "ppl_rel_diff": abs(two["ppl"] - one["ppl"]) / one["ppl"],
            "wall_speedup": one["wall_seconds"] / two["wall_seconds"],
            "quantize_speedup": one["quantize_seconds"] / two["quantize_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), help="only this model")
    parser.add_argument("--quick", action="store_true", help="a smoke run (scale_distributed_quick.json)")
    parser.add_argument("--calib", type=int, help="calibration windows of 512 tokens (default 128)")
    parser.add_argument("--eval-windows", type=int, help="docs-en test windows evaluated (default all)")
    args = parser.parse_args()
    extra = ([f"data.calib.num_samples={args.calib}"] if args.calib else []) + (
        [f"data.eval.max_windows={args.eval_windows}"] if args.eval_windows else [])
    results = Results("scale_distributed" + ("_quick" if args.quick else ""),
                      {"overrides": BASE + (QUICK if args.quick else []), "models": {n: o[0] for n, o in MODELS.items()},
                       "arms": "python -m shrink vs torchrun --standalone --nproc_per_node 2 -m shrink, "
                               "OMP_NUM_THREADS=1 per process", "cpus": os.cpu_count()},
                      key=("model",))
    for name in MODELS:
        if (args.model is None or name == args.model) and not results.has(model=name):
            results.add(measure(name, args.quick, extra))


def render_table(p: dict[str, Any]) -> str:
    rows = [[r["model"] + "".join(f", {o}" for o in r.get("extra_overrides", [])), f"{100 * r['identical_share']:.3f}% ({r['linears_identical']}/{r['linears']} Linears all equal)",
             r["one"]["ppl"], r["two"]["ppl"], f"{100 * r['ppl_rel_diff']:.2g}%",
             f"{r['one']['wall_seconds']:.1f}", f"{r['two']['wall_seconds']:.1f}",
             f"{r['one']['quantize_seconds']:.1f}", f"{r['two']['quantize_seconds']:.1f}",
             f"{r['one']['load_avg_before']:.1f} / {r['two']['load_avg_before']:.1f}"] for r in p["rows"]]
    return md(["model", "identical 4-bit codes", "ppl 1 proc", "ppl 2 procs", "ppl diff", "wall s 1 proc",
               "wall s 2 procs", "quantize s 1 proc", "quantize s 2 procs", "load avg before (1 / 2)"], rows) + footer(p)


if __name__ == "__main__":
    main()
