"""SparseGPT against magnitude and Wanda on the shared teacher, and prune+quantize
against each step alone. 128 x 512 calibration from docs-en train, perplexity on
docs-en test. Writes benchmarks/results/prune_quality.json.

    python -m benchmarks.prune_quality             # ~30 min on 2 CPU cores
    python -m benchmarks.prune_quality --quick     # 50% unstructured only
    python -m benchmarks.prune_quality --ablation  # SparseGPT 50% settings, docs-en valid
    python -m benchmarks.prune_quality --timing --threads 1  # seconds per layer, prune stage only
"""
from __future__ import annotations

import argparse
import logging

import torch

from benchmarks.common import Results, run

# (pattern, sparsity, methods)
SETTINGS = [("unstructured", 0.5, ("magnitude", "wanda", "sparsegpt")), ("2:4", 0.5, ("magnitude", "wanda", "sparsegpt")),
            ("unstructured", 0.6, ("magnitude", "wanda", "sparsegpt")), ("unstructured", 0.7, ("magnitude", "wanda", "sparsegpt"))]
# The same with prune.reconstruct=true (kept weights re-solved for each method's mask).
RECONSTRUCT = {("unstructured", 0.5): ("magnitude", "wanda", "sparsegpt"), ("2:4", 0.5): ("magnitude", "wanda", "sparsegpt"),
               ("unstructured", 0.6): ("sparsegpt",), ("unstructured", 0.7): ("sparsegpt",)}
# Each step alone is in quant_quality.json (GPTQ 4-bit g128) and in the rows above (SparseGPT 50%).
COMBINED = [  # (pipeline, extra overrides, label)
    ("prune_quantize", ["prune.method=sparsegpt", "quant.method=gptq"], "SparseGPT 50% then GPTQ 4-bit g128"),
    ("prune", ["prune.method=sparsegpt", "prune.joint_quant=true"], "SparseGPT 50% + 4-bit g128 joint sweep"),
    ("prune_quantize", ["prune.method=sparsegpt", "prune.reconstruct=true", "quant.method=gptq"],
     "SparseGPT 50% + reconstruct, then GPTQ 4-bit g128"),
]

# SparseGPT 50% under other settings, against the same dense and magnitude models. Measured on
# docs-en valid so that the test split is never used to choose a setting.
ABLATION = [("dense", ["pipeline=eval"]), ("magnitude", ["prune.method=magnitude"]),
            ("sparsegpt (defaults)", []), ("true_sequential", ["prune.true_sequential=true"]),
            ("damp 0.1", ["prune.damp=0.1"]), ("block 64", ["prune.block_size=64"]),
            ("block 1024 (whole rows)", ["prune.block_size=1024"]),
            ("512 x 512 calibration", ["data.calib.num_samples=512"]),
            ("reconstruct", ["prune.reconstruct=true"])]
VALID = ["data.eval.path=${oc.env:SHRINK_SHARED,'../shared'}/data/docs-en/valid.jsonl.gz", "data.eval.name=docs-en-valid"]


def variants(pattern: str, sparsity: float, methods: tuple[str, ...]) -> list[tuple[str, bool | None]]:
    """(method, reconstruct) to measure at one setting: every method plain (None: the rows
    measured before the option existed have no such field), some also reconstructed."""
    return [(m, r) for m in methods for r in ((None, True) if m in RECONSTRUCT[(pattern, sparsity)] else (None,))]


def ablation(base: list[str]) -> None:
    results = Results("prune_ablation", {"overrides": base + VALID, "calibration": "128 x 512 docs-en train, seed 0",
                                         "eval": "docs-en valid, 512-token windows"}, key=("label",))
    for label, extra in ABLATION:
        if not results.has(label=label):
            m = run(base + VALID + ["pipeline=prune", "prune.sparsity=0.5", "eval.baseline=false", *extra])
            results.add({"label": label, "overrides": extra, "ppl": m["ppl"]["docs-en-valid"],
                         "sparsity": m["sparsity"], "seconds": m["seconds"].get("prune")})


def timing(base: list[str]) -> None:
    """The prune stage alone, one method after the other; run it with no other job on the machine."""
    results = Results("prune_timing", {"overrides": base, "calibration": "128 x 512 docs-en train, seed 0",
                                       "stages": ["prune"], "threads": torch.get_num_threads()},
                      key=("method", "pattern", "reconstruct"))
    for pattern, sparsity, methods in SETTINGS[:2]:
        for method, reconstruct in variants(pattern, sparsity, methods):
            if results.has(method=method, pattern=pattern, reconstruct=reconstruct):
                continue
            m = run(base + ["pipeline=prune", "pipeline.stages=[prune]", f"prune.method={method}",
                            f"prune.pattern='{pattern}'", "prune.sparsity=0.5", f"prune.reconstruct={bool(reconstruct)}"])
            layers = 1 + max(r["layer"] for r in m["stages"]["prune"]["layers"])
            results.add({"method": method, "pattern": pattern, "seconds_prune": m["seconds"]["prune"],
                         **({"reconstruct": True} if reconstruct else {}),
                         "seconds_per_layer": m["seconds"]["prune"] / layers})


def prune_row(results: Results, base: list[str], method: str, pattern: str, sparsity: float,
              reconstruct: bool | None) -> None:
    """One method at one setting, unless measured already."""
    if results.has(kind="prune", method=method, pattern=pattern, sparsity_target=sparsity, label=None,
                   reconstruct=reconstruct):
        return
    m = run(base + ["pipeline=prune", f"prune.method={method}", f"prune.pattern='{pattern}'",
                    f"prune.sparsity={sparsity}", f"prune.reconstruct={bool(reconstruct)}",
                    f"eval.baseline={not results.rows}"])
    report = m["stages"]["prune"]
    layers = 1 + max(r["layer"] for r in report["layers"])
    row = {"kind": "prune", "method": method, "pattern": pattern, "sparsity_target": sparsity,
           "ppl": m["ppl"]["docs-en-test"], "sparsity": m["sparsity"],
           "pattern_ok": report.get("pattern_ok"), "seconds_prune": m["seconds"]["prune"],
           "seconds_per_layer": m["seconds"]["prune"] / layers}
    if reconstruct:
        row["reconstruct"] = True
        row["layer_error_ratio"] = (sum(r["reconstruct_error_after"] for r in report["layers"])
                                    / sum(r["reconstruct_error_before"] for r in report["layers"]))
    if "baseline_ppl" in m:
        row["baseline_ppl"] = m["baseline_ppl"]["docs-en-test"]
    results.add(row)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="SparseGPT 50%% settings (prune_ablation.json)")
    parser.add_argument("--timing", action="store_true", help="seconds per layer alone (prune_timing.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    base = ["model=llama_teacher", "data=docs_en", "eval.batch_size=8", "quant.bits=4", "quant.group_size=128"]
    if args.ablation or args.timing:
        (ablation if args.ablation else timing)(base)
        return
    results = Results("prune_quality", {"overrides": base, "calibration": "128 x 512 docs-en train, seed 0",
                                        "eval": "docs-en test, 512-token windows"},
                      key=("kind", "method", "pattern", "sparsity_target", "label", "reconstruct"))
    for pattern, sparsity, methods in SETTINGS[:1] if args.quick else SETTINGS:
        for method, reconstruct in variants(pattern, sparsity, methods):
            prune_row(results, base, method, pattern, sparsity, reconstruct)
    for pipeline, extra, label in [] if args.quick else COMBINED:
        if results.has(kind="combined", method=None, pattern=None, sparsity_target=None, label=label,
                       reconstruct=None):
            continue
        m = run(base + [f"pipeline={pipeline}", "eval.baseline=false", "prune.sparsity=0.5"] + extra)
        results.add({"kind": "combined", "label": label, "pipeline": pipeline, "ppl": m["ppl"]["docs-en-test"],
                     "sparsity": m["sparsity"], "seconds": {k: v for k, v in m["seconds"].items()
                                                            if k in ("prune", "quantize")}})

if __name__ == "__main__":
    main()
