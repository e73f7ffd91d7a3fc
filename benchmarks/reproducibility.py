"""How far the README's main job moves between machines of one kind, emulated on this one.

A machine decides which kernels a float32 calibration rounds with: ATen's vectorised kernels
(ATEN_CPU_CAPABILITY: the attention, softmax), MKL's code path (MKL_ENABLE_INSTRUCTIONS: every
GEMM, the Cholesky) and the thread count (OMP_NUM_THREADS: how MKL splits its sums). Each arm
runs the default job (`shrink`, SmolLM2-135M, GPTQ 4-bit g128 on 32 x 512 windows; perplexity
after, no baseline, no export) in a fresh process under one such setting, with the calibration
in float32 and in float64 (data.calib.dtype), and records the perplexity, the quantize time and
every Linear's weights fingerprint (metrics.json), compared with this machine's run.
Writes benchmarks/results/reproducibility.json; re-running skips the arms measured.

    python -m benchmarks.reproducibility      # 8 arms, about 45 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Results
from benchmarks.markdown import footer, md

# name -> the environment that makes this machine compute like another machine of its kind
MACHINES: dict[str, dict[str, str]] = {
    "this machine": {},
    "ATen AVX2 kernels": {"ATEN_CPU_CAPABILITY": "avx2"},
    "MKL AVX2 code path": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
DTYPES = ("float32", "float64")
OVERRIDES = ["eval.baseline=false", "pipeline.stages=[quantize,eval]"]


def run_arm(machine: str, dtype: str, cache: Path) -> dict[str, Any]:
    """The default job in a fresh process under `machine`'s environment; its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **MACHINES[machine], "SHRINK_CACHE": str(cache)}
        run = Path(tmp) / "run"
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "shrink.cli", f"out={run}", f"data.calib.dtype={dtype}", *OVERRIDES],
                       cwd=ROOT, env=env, check=True)
        metrics = json.loads((run / "metrics.json").read_text())
    quant = metrics["stages"]["quantize"]
    return {"machine": machine, "calib_dtype": dtype, "env": MACHINES[machine], "ppl": metrics["ppl"],
            "quantize_seconds": metrics["seconds"]["quantize"],
            "profile_seconds": {key: sum(p[key] for p in quant["profile"])
                                for key in ("forward_seconds", "hessian_seconds", "compress_seconds")},
            "calibration": quant["calibration"], "load_avg": [load, os.getloadavg()[0]],
            "linears": [r["full_name"] for r in quant["layers"]],
            "weights": [r["fingerprint"]["weights"] for r in quant["layers"]]}


def main() -> None:
    results = Results("reproducibility", {"command": "shrink " + " ".join(OVERRIDES), "machines": MACHINES,
                                          "dtypes": list(DTYPES)}, key=("machine", "calib_dtype"))
    with tempfile.TemporaryDirectory() as cache:  # the GGUF import once, for every arm
        for machine in MACHINES:
            for dtype in DTYPES:  # interleaved: the time ratio float64 / float32 under the same load
                if not results.has(machine=machine, calib_dtype=dtype):
                    start = time.time()
                    results.add({**run_arm(machine, dtype, Path(cache)), "wall_seconds": time.time() - start})
    print(results.save())


def spread(rows: list[dict[str, Any]]) -> float:
    """(max - min) / min of the perplexities, in percent."""
    ppl = [next(iter(r["ppl"].values())) for r in rows]
    return 100 * (max(ppl) - min(ppl)) / min(ppl)


def render_table(p: dict[str, Any]) -> str:
    rows, out = p["rows"], []
    for dtype in DTYPES:
        arms = [r for r in rows if r["calib_dtype"] == dtype]
        ref = next((r for r in arms if r["machine"] == "this machine"), None)
        if ref is None:
            continue
        base = next(iter(ref["ppl"].values()))
        for r in arms:
            ppl = next(iter(r["ppl"].values()))
            same = sum(a == b for a, b in zip(r["weights"], ref["weights"]))
            first = next((n for n, a, b in zip(r["linears"], r["weights"], ref["weights"]) if a != b), "none")
            out.append([dtype, r["machine"], ppl, f"{100 * (ppl - base) / base:+.2f}%", f"{same}/{len(ref['weights'])}",
                        first.removeprefix("model."), f"{r['quantize_seconds']:.0f}",
                        f"{r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f}{' noisy' if max(r['load_avg']) > 2.5 else ''}"])
    table = md(["calibration", "machine (emulated)", "perplexity", "vs this machine", "Linears equal bitwise",
                "first that differs", "quantize s", "load avg"], out)
    lines = ["spread (max - min) / min over the machines: "
             + ", ".join(f"{d} {spread([r for r in rows if r['calib_dtype'] == d]):.2f}%" for d in DTYPES
                         if any(r["calib_dtype"] == d for r in rows))]
    pairs = [(a, b) for a in rows for b in rows if a["machine"] == b["machine"] and a["calib_dtype"] == "float32"
             and b["calib_dtype"] == "float64"]
    if pairs:
        ratios = sorted(b["quantize_seconds"] / a["quantize_seconds"] for a, b in pairs)
        lines.append(f"quantize time float64 / float32, same machine setting, run back to back: "
                     f"{', '.join(f'{x:.2f}' for x in ratios)}")
    return table + "\n\n" + "; ".join(lines) + "." + footer(p)


if __name__ == "__main__":
    main()
