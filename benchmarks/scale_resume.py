"""Resume inside a stage, measured: GPTQ 4-bit g128 on the shared teacher (128 x 512 docs-en
calibration windows) run three times as CLI processes: uninterrupted; killed from outside with
SIGKILL as soon as it logs that a randomly chosen decoder layer (seeded, recorded) is done, so the
kill lands somewhere inside the next layer; and started again with resume=true. Records whether
the resumed model/ is byte-identical (sha256 of every file) to the uninterrupted one, the seconds
of each process, and what the per-layer checkpoints cost (seconds and MiB per layer, from the
run's own log lines). Writes benchmarks/results/scale_resume.json.

    python -m benchmarks.scale_resume             # seed 0
    python -m benchmarks.scale_resume --seed 1 --quick

The pipeline is quantize + export (no evaluation: the output's bytes are the result). Timings
depend on what else runs on the machine; the load average is recorded next to them.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import ROOT, Results
from benchmarks.markdown import footer, md

LAYERS = 8  # llama-teacher's decoder layers
BASE = ["model=llama_teacher", "data=docs_en", "pipeline=quantize", "pipeline.stages=[quantize,export]",
        "quant.method=gptq", "quant.bits=4", "quant.group_size=128"]
QUICK = ["data.calib.num_samples=16", "data.calib.seq_len=128"]
LAYER_DONE = re.compile(r"layer (\d+)/(\d+): ([\d.]+)s")
CHECKPOINT = re.compile(r"layer checkpoint (\d+) written in ([\d.]+)s \(([\d.]+) MiB\)")
RESUMING = re.compile(r"resuming at layer (\d+)/")


def shrink(args: list[str], kill_after: Optional[int] = None) -> dict[str, Any]:
    """One CLI process; with kill_after=k it gets SIGKILL from here once it logs layer k done."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, "-m", "shrink.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        done = LAYER_DONE.search(line)
        if kill_after is not None and done and int(done.group(1)) == kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    code = proc.wait()
    log = "".join(lines)
    if code != (-signal.SIGKILL if kill_after is not None else 0):
        raise SystemExit(f"shrink exited {code}:\n{log[-3000:]}")
    return {"seconds": time.perf_counter() - start, "loadavg_start": load, "loadavg_end": os.getloadavg()[0],
            "layer_seconds": [float(m.group(3)) for m in LAYER_DONE.finditer(log)],
            "checkpoint_seconds": [float(m.group(2)) for m in CHECKPOINT.finditer(log)],
            "checkpoint_mib": [float(m.group(3)) for m in CHECKPOINT.finditer(log)],
            "resumed_at": [int(m.group(1)) for m in RESUMING.finditer(log)]}


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def measure(seed: int, quick: bool) -> dict[str, Any]:
    kill_after = random.Random(seed).randint(1, LAYERS - 1)  # killed inside layer kill_after + 1
    args = BASE + (QUICK if quick else [])
    with tempfile.TemporaryDirectory() as tmp:
        reference = shrink(args + [f"out={tmp}/reference"])
        killed = shrink(args + [f"out={tmp}/run"], kill_after=kill_after)
        resumed = shrink(args + [f"out={tmp}/run", "resume=true"])
        ref, res = sha256s(Path(tmp) / "reference" / "model"), sha256s(Path(tmp) / "run" / "model")
    per_layer = reference["checkpoint_seconds"]
    return {"seed": seed, "quick": quick, "layers": LAYERS, "kill_after_layer": kill_after,
            "resumed_at_layer": (resumed["resumed_at"] or [None])[0], "identical": ref == res, "sha256": res,
            "seconds": {"uninterrupted": reference["seconds"], "killed": killed["seconds"],
                        "resumed": resumed["seconds"], "killed_plus_resumed": killed["seconds"] + resumed["seconds"]},
            "checkpoint_seconds_per_layer": per_layer,
            "checkpoint_seconds_mean": sum(per_layer) / max(len(per_layer), 1),
            "checkpoint_mib_per_layer": reference["checkpoint_mib"],
            "layer_seconds": reference["layer_seconds"],
            "loadavg": {name: [r["loadavg_start"], r["loadavg_end"]]
                        for name, r in (("uninterrupted", reference), ("killed", killed), ("resumed", resumed))},
            "cpu_count": os.cpu_count()}


def render_table(p: dict[str, Any]) -> str:
    rows = []
    for r in p["rows"]:
        s, layer = r["seconds"], sum(r["layer_seconds"]) / max(len(r["layer_seconds"]), 1)
        rows.append([r["seed"], f"after {r['kill_after_layer']}/{r['layers']}", r["resumed_at_layer"],
                     "yes" if r["identical"] else "NO", f"{s['uninterrupted']:.1f}", f"{s['killed']:.1f}",
                     f"{s['resumed']:.1f}", f"{r['checkpoint_seconds_mean']:.2f}", f"{layer:.1f}",
                     f"{sum(r['checkpoint_mib_per_layer']) / max(len(r['checkpoint_mib_per_layer']), 1):.0f}",
                     f"{max(v for pair in r['loadavg'].values() for v in pair):.1f}"])
    return md(["seed", "killed", "resumed at layer", "model/ sha256 equal", "uninterrupted s", "killed s",
               "resumed s", "checkpoint s/layer", "layer s", "checkpoint MiB/layer", "max load avg"],
              rows) + footer(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="16 x 128 calibration windows (a smoke run)")
    opts = parser.parse_args()
    results = Results("scale_resume" + ("_quick" if opts.quick else ""),
                      {"overrides": BASE + (QUICK if opts.quick else [])}, key=("seed",))
    if results.has(seed=opts.seed):
        print(f"seed {opts.seed} already measured in {results.path}")
        return
    results.add(measure(opts.seed, opts.quick))


if __name__ == "__main__":
    main()
