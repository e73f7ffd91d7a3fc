"""Calibration speed side by side: shrink's GPTQ against gptqmodel 7.6.0 (through
optimum's GPTQQuantizer, the path transformers takes) on the shared teacher, the same 128 x
512 docs-en train windows, the same settings (symmetric, g128, damp 0.01, no act-order,
true-sequential, batches of 8), perplexity on docs-en test by the protocol. Writes
benchmarks/results/calib_speed.json (seconds, peak RSS, perplexity, and shrink's per-layer
profile: forwards, Hessians, sweeps, packing next to the FLOPs).

    python -m benchmarks.calib_speed            # 4-bit g128 and 3-bit g128, both tools
    python -m benchmarks.calib_speed --bits 4   # 4-bit g128 only

Each arm runs in its own process (`--arm TOOL`), so its peak RSS (ru_maxrss: load, quantize,
evaluate) is its own; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import ROOT, Results, print_row, row_of, run
from benchmarks.markdown import footer, md
from engine.metrics import peak_memory_bytes
from shrink.config import compose

TOOLS = ("shrink", "gptqmodel")
SETTINGS = [(4, 128), (3, 128)]
BASE = ["model=llama_teacher", "data=docs_en", "pipeline=quantize", "eval.baseline=false", "eval.batch_size=8",
        "quant.sym=true", "quant.damp=0.01", "quant.act_order=false", "quant.true_sequential=true"]
QUICK = ["data.calib.num_samples=16", "data.calib.seq_len=128", "data.eval.max_windows=8"]  # --quick: a smoke run
BATCH = 8  # calibration windows per forward, both tools


def quant_overrides(bits: int, group_size: int, quick: bool = False) -> list[str]:
    return BASE + (QUICK if quick else []) + [f"quant.bits={bits}", f"quant.group_size={group_size}"]


def arm_shrink(bits: int, group_size: int, quick: bool) -> dict[str, Any]:
    m = run(quant_overrides(bits, group_size, quick))
    stage = m["stages"]["quantize"]
    return {"seconds": m["seconds"]["quantize"], "ppl": m["ppl"]["docs-en-test"], "profile": stage["profile"]}


def arm_gptqmodel(bits: int, group_size: int, quick: bool) -> dict[str, Any]:
    """optimum.gptq.GPTQQuantizer (gptqmodel's GPTQ and packing) on the windows shrink samples."""
    from optimum.gptq import GPTQQuantizer

    from engine.evaluation import perplexity
    from engine.state import RunState
    from shrink.model_folder import load_model

    cfg = compose(quant_overrides(bits, group_size, quick))
    model, tokenizer = load_model(cfg.model)
    state = RunState(cfg, ROOT, model, tokenizer)
    windows = state.calibration()
    dataset = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    quantizer = GPTQQuantizer(bits=bits, group_size=group_size, sym=True, desc_act=False, true_sequential=True,
                              damp_percent=cfg.quant.damp, dataset=dataset, batch_size=BATCH,
                              pad_token_id=tokenizer.eos_token_id, model_seqlen=windows.shape[1])
    start = time.perf_counter()
    model = quantizer.quantize_model(model, tokenizer)
    seconds = time.perf_counter() - start
    ppl = perplexity(model, state.eval_windows()[0], batch_size=cfg.eval.batch_size, label="gptqmodel eval")
    return {"seconds": seconds, "ppl": ppl}


def arm(tool: str, bits: int, group_size: int, quick: bool) -> None:
    torch.manual_seed(0)
    row = {"tool": tool, "bits": bits, "group_size": group_size,
           **(arm_shrink if tool == "shrink" else arm_gptqmodel)(bits, group_size, quick)}
    row["peak_rss_bytes"] = peak_memory_bytes()["cpu"]
    print_row(row)


def run_arm(tool: str, bits: int, group_size: int, quick: bool) -> dict[str, Any]:
    """One arm in a fresh process; its row from the line it prints."""
    cmd = [sys.executable, "-m", "benchmarks.calib_speed", "--arm", tool, "--bits", str(bits),
           "--group-size", str(group_size)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return row_of(done, f"arm {tool} {bits}-bit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, choices=[b for b, _ in SETTINGS], help="only this setting")
    parser.add_argument("--arm", choices=TOOLS, help="internal: run one arm in this process")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a smoke run (calib_speed_quick.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.arm:
        arm(args.arm, args.bits, args.group_size, args.quick)
        return
    calibration = "16 x 128" if args.quick else "128 x 512"
    results = Results("calib_speed" + ("_quick" if args.quick else ""),
                      {"overrides": BASE + (QUICK if args.quick else []),
                       "calibration": f"{calibration} docs-en train, seed 0", "batch": BATCH,
                       "threads": torch.get_num_threads(), "gptqmodel": "7.6.0 via optimum.gptq.GPTQQuantizer",
                       "eval": "docs-en test, 512-token windows"},
                      key=("tool", "bits", "group_size"))
    for bits, group in SETTINGS:
        if args.bits is not None and bits != args.bits:
            continue
        for tool in TOOLS:
            if not results.has(tool=tool, bits=bits, group_size=group):
                results.add(run_arm(tool, bits, group, args.quick))


def render_table(p: dict[str, Any]) -> str:
    """Both tools per setting, then shrink's per-layer profile at the first setting."""
    by = {(r["bits"], r["group_size"], r["tool"]): r for r in p["rows"]}
    rows, profiled = [], None
    for bits, group in sorted({(b, g) for b, g, _ in by}, reverse=True):
        ours, theirs = by.get((bits, group, "shrink")), by.get((bits, group, "gptqmodel"))
        speedup = f"{theirs['seconds'] / ours['seconds']:.2f}x" if ours and theirs else None
        rows.append([f"{bits}-bit g{group}"]
                    + [r and f"{r['seconds']:.1f}" for r in (ours, theirs)] + [speedup]
                    + [r and r["ppl"] for r in (ours, theirs)]
                    + [r and f"{r['peak_rss_bytes'] / 2**30:.2f}" for r in (ours, theirs)])
        profiled = profiled or ours
    text = md(["setting", "shrink s", "gptqmodel s", "speed-up", "shrink ppl", "gptqmodel ppl",
               "shrink peak RSS GiB", "gptqmodel peak RSS GiB"], rows)
    if profiled:
        prof = profiled["profile"]
        keys = ("forward_seconds", "hessian_seconds", "sweep_seconds", "pack_seconds")
        lines = [[p["layer"], f"{p['forwards']:.2f}"] + [f"{p[k]:.2f}" for k in keys]
                 + [f"{p['forwards'] * p['forward_flops'] / 1e9:.0f}", f"{p['hessian_flops'] / 1e9:.0f}",
                    f"{p['forwards'] * p['forward_flops'] / 1e9 / max(p['forward_seconds'], 1e-9):.0f}"] for p in prof]
        text += (f"\n\nshrink's {profiled['bits']}-bit g{profiled['group_size']} run per decoder layer: full-layer "
                 "forwards over all windows, seconds in the forwards, the x^T x products, the GPTQ sweeps "
                 "(with the inverse Hessian) and packing; the FLOPs of those forwards and products (the "
                 "Hessian count is the full 2 n cols^2, of which the block-triangular product does about "
                 "half); the forwards' achieved GFLOP/s:\n\n"
                 + md(["layer", "forwards", "forward s", "Hessian s", "sweep s", "pack s", "forward GFLOP",
                       "Hessian GFLOP", "forward GFLOP/s"], lines))
    return text + footer(p)


if __name__ == "__main__":
    main()
