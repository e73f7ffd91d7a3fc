"""GPTQ against round-to-nearest on the shared teacher (issue: GPTQ must beat RTN at
every setting). 128 calibration windows of 512 tokens from docs-en train, perplexity
on docs-en test by the protocol. Writes benchmarks/results/quant_quality.json.

    python -m benchmarks.quant_quality          # all settings (~30 min on 2 CPU cores)
    python -m benchmarks.quant_quality --quick  # 4-bit g128 only
"""
from __future__ import annotations

import argparse
import logging

from benchmarks.common import Results, run

SETTINGS = [(4, 128), (4, -1), (3, 128), (3, -1)]
METHODS = [("rtn", False), ("gptq", False), ("gptq", True)]  # (method, act_order)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = ["model=llama_teacher", "data=docs_en", "pipeline=quantize", "eval.baseline=false", "eval.batch_size=8"]
    results = Results("quant_quality", {"overrides": base, "calibration": "128 x 512 docs-en train, seed 0",
                                        "eval": "docs-en test, 512-token windows"},
                      key=("method", "act_order", "bits", "group_size"))
    for bits, group in SETTINGS[:1] if args.quick else SETTINGS:
        for method, act_order in METHODS:
            if results.has(method=method, act_order=act_order, bits=bits, group_size=group):
                continue
            overrides = base + [f"quant.method={method}", f"quant.bits={bits}", f"quant.group_size={group}",
                                f"quant.act_order={act_order}"]
            m = run(overrides)
            layers = m["stages"]["quantize"]["layers"]
            results.add({"method": method, "act_order": act_order, "bits": bits, "group_size": group,
                         "ppl": m["ppl"]["docs-en-test"], "seconds_quantize": m["seconds"]["quantize"],
                         "seconds_per_layer": m["seconds"]["quantize"] / (1 + max(r["layer"] for r in layers)),
                         "peak_memory_cpu": m["peak_memory_bytes"]["cpu"]})

if __name__ == "__main__":
    main()
