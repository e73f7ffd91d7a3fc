"""Every stage on a mixture-of-experts teacher (issue 17): `../shared/models/moe-teacher`
(Mixtral family, 8 layers, 4 experts, top-2). GPTQ 4-bit g128 (experts' statistics from every
calibration token, `moe.all_experts=true`, and from the routed tokens only) against RTN, with
and without packed ends (lm_head at 4 bits, the input embedding at 8: quant/ends.py);
SparseGPT 50% and 2:4 against magnitude and Wanda; prune_quantize (SparseGPT + GPTQ against
magnitude + RTN). The same calibration windows for every arm
(docs-en train, seed 0); perplexity on docs-en test by the protocol. Quantized arms are exported
(to a throwaway folder) so `bits_per_weight` is that of the written GPTQ checkpoint. Each row
records the tokens routed to each expert (min/max per layer), the stage's seconds and the load
average of the machine while it ran (the seconds are noisy on a shared machine; perplexities
are not). Writes benchmarks/results/moe.json.

    python -m benchmarks.moe --calib 128 --windows 0   # 128 x 512, the whole test file
    python -m benchmarks.moe                      # 32 x 512 calibration, 64 test windows (quicker)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import ROOT, Results, run

MODEL = f"{os.environ.get('SHRINK_SHARED', '../shared')}/models/moe-teacher"
# quant.lm_head + quant.embed_bits: the head quantized like the layers, the embedding to 8 bits
ENDS = ["quant.lm_head=true", "quant.embed_bits=8"]
HALF = ["prune.sparsity=0.5", "prune.pattern=unstructured"]
# (label, pipeline, overrides): the order is the order of importance, so a cut run keeps the comparisons
ARMS: list[tuple[str, str, list[str]]] = [
    ("dense", "eval", []),
    ("RTN 4-bit g128, packed ends", "quantize", ["quant.method=rtn", *ENDS]),
    ("GPTQ 4-bit g128, packed ends", "quantize", ["quant.method=gptq", "moe.all_experts=true", *ENDS]),
    ("magnitude 50%", "prune", ["prune.method=magnitude", *HALF]),
    ("SparseGPT 50%", "prune", ["prune.method=sparsegpt", *HALF]),
    ("magnitude 50% + RTN 4-bit, packed ends", "prune_quantize", ["prune.method=magnitude", *HALF,
                                                                  "quant.method=rtn", *ENDS]),
    ("SparseGPT 50% + GPTQ 4-bit, packed ends", "prune_quantize", ["prune.method=sparsegpt", *HALF,
                                                                   "quant.method=gptq", *ENDS]),
    ("RTN 4-bit g128", "quantize", ["quant.method=rtn"]),
    ("GPTQ 4-bit g128", "quantize", ["quant.method=gptq", "moe.all_experts=true"]),
    ("Wanda 50%", "prune", ["prune.method=wanda", *HALF]),
    ("SparseGPT 2:4", "prune", ["prune.method=sparsegpt", "prune.pattern=2:4"]),
    ("magnitude 2:4", "prune", ["prune.method=magnitude", "prune.pattern=2:4"]),
    ("Wanda 2:4", "prune", ["prune.method=wanda", "prune.pattern=2:4"]),
    ("GPTQ 4-bit g128, routed tokens only", "quantize", ["quant.method=gptq", "moe.all_experts=false"]),
]
# exported and evaluated again from the folder in a fresh process
EXPORTED = ("quantize", "prune_quantize")


def expert_tokens(stage: dict[str, Any]) -> dict[str, list[int]]:
    """Per MoE block: [min, max] of the calibration tokens routed to its experts."""
    per_block = stage.get("moe", {}).get("tokens_per_expert", {})
    return {block: [min(t), max(t)] for block, t in per_block.items()}


def arm_row(label: str, pipeline: str, m: dict[str, Any]) -> dict[str, Any]:
    stage_name = "quantize" if pipeline == "prune_quantize" else pipeline  # its coverage and experts' tokens
    stage = m.get("stages", {}).get(stage_name, {}) if pipeline != "eval" else {}
    row = {"label": label, "pipeline": pipeline, "ppl": m["ppl"]["docs-en-test"],
           "bits_per_weight": m["bits_per_weight"], "params": m["params"], "sparsity": m["sparsity"],
           "windows": m["eval_windows"]["docs-en-test"]["evaluated"],
           "seconds": (m["seconds"]["prune"] + m["seconds"]["quantize"] if pipeline == "prune_quantize"
                       else m["seconds"].get(pipeline, m["seconds"]["total"]))}
    if "size_parts" in m:
        row["bits_per_weight_parts"] = {k: v["bits_per_weight"] for k, v in m["size_parts"].items()}
    if stage:
        row["coverage"] = stage.get("coverage", {}).get("fraction")
        tokens = expert_tokens(stage)
        if any(hi for _, hi in tokens.values()):  # magnitude pruning and RTN calibrate nothing
            row["tokens_per_expert_min_max"] = tokens
        row["fallbacks"] = len(stage.get("moe", {}).get("fallbacks", []))
    return row


def reload_eval(base: list[str]) -> Callable[[Path], dict[str, Any]]:
    """Evaluate the exported model/ again in a fresh `shrink` process (the project's loader)."""
    def evaluate(out: Path) -> dict[str, Any]:
        subprocess.run([sys.executable, "-m", "shrink.cli", *base, "pipeline=eval", f"model.path={out / 'model'}",
                        f"out={out / 'reload'}"], check=True, cwd=ROOT, capture_output=True)
        m = json.loads((out / "reload" / "metrics.json").read_text())
        return {"ppl": m["ppl"]["docs-en-test"], "bits_per_weight": m["bits_per_weight"]}
    return evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=64, help="test windows (0 = the whole file)")
    parser.add_argument("--no-reload", action="store_true", help="skip the fresh-process evaluation of the export "
                        "(time-boxed runs; the row then has no `reloaded`)")
    parser.add_argument("--arm", action="append", default=[], help="an arm's label to run (repeat for several, "
                        "in that order; default: all); a second process on other arms fills the same file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    windows = args.windows or None
    base = ["model=local", f"model.path={MODEL}", "data=docs_en", f"data.calib.num_samples={args.calib}",
            f"data.eval.max_windows={windows if windows else 'null'}", "eval.baseline=false", "eval.batch_size=8"]
    results = Results("moe", {"overrides": base, "calibration": f"{args.calib} x 512 docs-en train, seed 0",
                              "eval": f"docs-en test, {args.windows or 'all'} windows of 512 tokens"},
                      key=("label",))
    arms = {a[0]: a for a in ARMS}
    chosen = [arms[label] for label in args.arm] if args.arm else ARMS
    for label, pipeline, overrides in chosen:
        if results.has(label=label):
            continue
        load_before = os.getloadavg()[0]
        start = time.time()
        # quantized arms and SparseGPT 50% keep their export (bits per weight of the written folder)
        # and are evaluated again from it in a fresh process
        reload = (pipeline in EXPORTED or label == "SparseGPT 50%") and not args.no_reload
        m = run(base + [f"pipeline={pipeline}"] + overrides, keep_export=reload or pipeline in EXPORTED,
                then=reload_eval([b for b in base if not b.startswith("model.path=")]) if reload else None)
        row = arm_row(label, pipeline, m)
        if reload:
            row["reloaded"] = m["then"]
        row.update(wall_seconds=time.time() - start, load_average=[load_before, os.getloadavg()[0]])
        results.add(row)


if __name__ == "__main__":
    main()


def render_table(p: dict[str, Any]) -> str:
    """docs/results.md: every arm, then the calibration tokens routed to the experts of each layer."""
    from benchmarks.markdown import footer, md

    cfg = p["config"]
    head = f"Calibration {cfg['calibration']}; evaluation on {cfg['eval']}.\n\n"
    order = [a[0] for a in ARMS]
    p = {**p, "rows": sorted(p["rows"], key=lambda r: order.index(r["label"]) if r["label"] in order else len(order))}
    rows = []
    for r in p["rows"]:
        parts = r.get("bits_per_weight_parts", {})
        reloaded = r.get("reloaded", {})
        # bits of the written folder: the quantized/exported arms; the others keep the input's files
        written = bool(parts) or r["pipeline"] == "eval"
        rows.append([r["label"], r["ppl"], reloaded.get("ppl"), f"{r['bits_per_weight']:.2f}" if written else None,
                     parts.get("decoder_layers") and f"{parts['decoder_layers']:.2f}",
                     parts.get("outside_layers") and f"{parts['outside_layers']:.2f}",
                     f"{r['sparsity']:.3f}", r.get("coverage") and f"{r['coverage']:.3f}", r.get("fallbacks"),
                     f"{r['seconds']:.0f}", "/".join(f"{x:.1f}" for x in r["load_average"])])
    text = head + md(["arm", "ppl", "ppl reloaded (fresh process)", "bits/weight (all, as written)", "decoder layers",
               "embeddings + rest", "sparsity", "coverage", "RTN/magnitude fallbacks", "stage s",
               "load avg before/after"], rows)
    routed = [r for r in p["rows"] if any(hi for _, hi in r.get("tokens_per_expert_min_max", {}).values())]
    if routed:
        blocks = list(routed[0]["tokens_per_expert_min_max"])
        text += ("\n\nCalibration tokens routed to each expert (top-2, so twice the tokens in all), min / max "
                 "over the experts of each layer; with `moe.all_experts=true` every expert's statistics "
                 "also see every other token:\n\n")
        text += md(["layer"] + [r["label"] for r in routed],
                   [[b.split(".")[2] if b.count(".") >= 2 else b]
                    + ["{} / {}".format(*r["tokens_per_expert_min_max"][b]) if b in r["tokens_per_expert_min_max"]
                       else None for r in routed] for b in blocks])
    return text + footer(p)
