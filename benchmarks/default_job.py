"""The README's main job as a user runs it: `shrink` with no overrides, in a fresh process,
with an empty model cache (so the GGUF import is counted). Writes
benchmarks/results/default_job.json (wall time, seconds per step, perplexities, peak RSS).

    python -m benchmarks.default_job      # about 5 minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Results
from benchmarks.markdown import footer


def main() -> None:
    results = Results("default_job", {"command": "shrink out=RUN", "cache": "empty (SHRINK_CACHE=TMP)"},
                      key=("command",))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SHRINK_CACHE": str(Path(tmp) / "cache")}
        run = Path(tmp) / "run"
        start = time.time()
        subprocess.run([sys.executable, "-m", "shrink.cli", f"out={run}"], cwd=tmp, env=env, check=True)
        wall = time.time() - start
        metrics = json.loads((run / "metrics.json").read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    results.rows = [{"command": "shrink out=RUN", "wall_seconds": wall, "seconds": metrics["seconds"],
                     "ppl": metrics["ppl"], "baseline_ppl": metrics["baseline_ppl"],
                     "peak_rss_bytes": peak_kib * 1024}]
    print(results.save())


def render(p: dict[str, Any]) -> str:
    """One Markdown line for the README's quick start."""
    r = p["rows"][0]
    s = r["seconds"]
    name = next(iter(r["ppl"]))
    return (f"- the default job after installing (`shrink`, cold cache): {r['wall_seconds'] / 60:.1f} min in all "
            f"(GGUF import {s.get('gguf_import', 0):.0f} s, perplexity before {s['baseline_eval']:.0f} s, GPTQ "
            f"{s['quantize']:.0f} s, perplexity after {s['eval']:.0f} s, export {s['export']:.0f} s), peak RSS "
            f"{r['peak_rss_bytes'] / 2**30:.1f} GiB; {name} perplexity {r['baseline_ppl'][name]:.3f} -> "
            f"{r['ppl'][name]:.3f}." + footer(p).replace("\n\n", " "))


if __name__ == "__main__":
    main()
