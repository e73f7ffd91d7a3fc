"""SparseGPT against magnitude and Wanda on the shared teacher, and prune+quantize
against each step alone. 128 x 512 calibration from docs-en train, perplexity on
docs-en test. Writes benchmarks/results/prune_quality.json.

    python benchmarks/prune_quality.py           # ~30 min on 2 CPU cores
    python benchmarks/prune_quality.py --quick   # 50% unstructured only
"""
from __future__ import annotations

import argparse
import logging

from benchmarks.common import Results, run

# (pattern, sparsity, methods): Wanda only where the quality bar compares it
SETTINGS = [("unstructured", 0.5, ("magnitude", "wanda", "sparsegpt")), ("2:4", 0.5, ("magnitude", "wanda", "sparsegpt")),
            ("unstructured", 0.6, ("magnitude", "sparsegpt")), ("unstructured", 0.7, ("magnitude", "sparsegpt"))]
# Each step alone is in quant_quality.json (GPTQ 4-bit g128) and in the rows above (SparseGPT 50%).
COMBINED = [  # (pipeline, extra overrides, label)
    ("prune_quantize", ["prune.method=sparsegpt", "quant.method=gptq"], "SparseGPT 50% then GPTQ 4-bit g128"),
    ("prune", ["prune.method=sparsegpt", "prune.joint_quant=true"], "SparseGPT 50% + 4-bit g128 joint sweep"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = ["model=llama_teacher", "data=docs_en", "eval.batch_size=8", "quant.bits=4", "quant.group_size=128"]
    results = Results("prune_quality", {"overrides": base, "calibration": "128 x 512 docs-en train, seed 0",
                                        "eval": "docs-en test, 512-token windows"},
                      key=("kind", "method", "pattern", "sparsity_target", "label"))
    for pattern, sparsity, methods in SETTINGS[:1] if args.quick else SETTINGS:
        for method in methods:
            if results.has(kind="prune", method=method, pattern=pattern, sparsity_target=sparsity, label=None):
                continue
            m = run(base + ["pipeline=prune", f"prune.method={method}", f"prune.pattern='{pattern}'",
                            f"prune.sparsity={sparsity}", f"eval.baseline={not results.rows}"])
            report = m["stages"]["prune"]
            layers = 1 + max(r["layer"] for r in report["layers"])
            row = {"kind": "prune", "method": method, "pattern": pattern, "sparsity_target": sparsity,
                   "ppl": m["ppl"]["docs-en-test"], "sparsity": m["sparsity"],
                   "pattern_ok": report.get("pattern_ok"), "seconds_prune": m["seconds"]["prune"],
                   "seconds_per_layer": m["seconds"]["prune"] / layers}
            if "baseline_ppl" in m:
                row["baseline_ppl"] = m["baseline_ppl"]["docs-en-test"]
            results.add(row)
    for pipeline, extra, label in [] if args.quick else COMBINED:
        if results.has(kind="combined", method=None, pattern=None, sparsity_target=None, label=label):
            continue
        m = run(base + [f"pipeline={pipeline}", "eval.baseline=false", "prune.sparsity=0.5"] + extra)
        results.add({"kind": "combined", "label": label, "pipeline": pipeline, "ppl": m["ppl"]["docs-en-test"],
                     "sparsity": m["sparsity"], "seconds": {k: v for k, v in m["seconds"].items()
                                                            if k in ("prune", "quantize")}})

if __name__ == "__main__":
    main()
