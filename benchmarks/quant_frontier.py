"""Quality per bit against the open quantizers (issue 31): shrink's GPTQ arms (min/max, scale
search, GPTAQ, the `quant=best` preset) and round-to-nearest next to gptqmodel (GPTQ, + mse, +
mse + GPTAQ; the project's venv), llm-compressor's GPTQModifier and AutoRound light (each in its
own venv: $SHRINK_PEER_VENVS/llmc and /autoround, default /work/venvs), on the shared teacher and
the MoE teacher at 4, 3 and 2 bits, group 128, symmetric. Every arm calibrates on the very same
128 x 512 docs-en train windows (sampled once here, handed to the peers as a file), saves its
model, and every saved model is evaluated by ONE evaluator (`shrink pipeline=eval`: the
perplexity protocol of docs/results.md) on the same windows. Seconds are the quantization alone as each tool reports it (shrink: the
quantize stage; peers: their quantize call), with the load average before and after (noisy when
the machine is shared). Writes benchmarks/results/quant_frontier.json (and the plot
quant_frontier.png); `--split valid` evaluates on docs-en valid instead (quant_frontier_dev.json:
the dev split on which shrink's defaults and preset are chosen, never on test).

    python -m benchmarks.quant_frontier                          # every model, bits and arm
    python -m benchmarks.quant_frontier --model llama-teacher --bits 3 --arm "AutoRound light"
    python -m benchmarks.quant_frontier --split valid --dev      # the dev arms (refinement settings)

Rows are keyed by (model, bits, arm): a re-run skips what is there, so a killed run goes on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import ROOT, SHARED, Results, row_of
from benchmarks.families import SOURCES, family_model

# the shared teachers, and the same weights in two families the tests do not build (benchmarks/families.py)
MODELS = {"llama-teacher": f"{SHARED}/models/llama-teacher", "moe-teacher": f"{SHARED}/models/moe-teacher",
          **{name: None for name in SOURCES}}
SPLITS = {"test": f"{SHARED}/data/docs-en/test.jsonl.gz", "valid": f"{SHARED}/data/docs-en/valid.jsonl.gz"}
# the peers that cannot share the project's venv each have their own, under SHRINK_PEER_VENVS
PEERS = Path(os.environ.get("SHRINK_PEER_VENVS", "/work/venvs"))
VENVS = {"shrink": sys.executable, "gptqmodel": sys.executable,
         "llmc": str(PEERS / "llmc" / "bin" / "python"), "autoround": str(PEERS / "autoround" / "bin" / "python")}
BITS = (4, 3, 2)
GROUP = 128
CALIB = ["data=docs_en", "data.calib.num_samples=128", "data.calib.seq_len=512", "seed=0"]
# (arm, tool, its options: shrink overrides or the peer script's arguments); in order of importance
ARMS: list[tuple[str, str, list[str]]] = [
    ("dense", "dense", []),
    ("RTN", "shrink", ["quant.method=rtn"]),
    ("shrink GPTQ", "shrink", []),
    ("shrink quant=best", "shrink", ["quant=best"]),
    ("AutoRound light", "autoround", ["--iters", "50", "--lr", "5e-3"]),
    ("shrink GPTQ + mse", "shrink", ["quant.scale_search=mse"]),
    ("shrink GPTQ + mse + GPTAQ", "shrink", ["quant.scale_search=mse", "quant.gptaq=true"]),
    ("gptqmodel GPTQ", "gptqmodel", []),
    ("gptqmodel GPTQ + mse", "gptqmodel", ["--mse", "2.0"]),
    ("gptqmodel GPTQ + mse + GPTAQ", "gptqmodel", ["--mse", "2.0", "--gptaq", "0.25"]),
    ("llm-compressor GPTQ", "llmc", []),
    ("shrink GPTQ + GPTAQ", "shrink", ["quant.gptaq=true"]),
    ("shrink GPTQ + hessian", "shrink", ["quant.scale_search=hessian"]),
]
# --dev: the settings compared on docs-en valid to choose the defaults and the preset
DEV_ARMS: list[tuple[str, str, list[str]]] = [
    ("dense", "dense", []),
    ("shrink GPTQ", "shrink", []),
    ("shrink GPTQ + mse", "shrink", ["quant.scale_search=mse"]),
    ("shrink GPTQ + hessian", "shrink", ["quant.scale_search=hessian"]),
    ("shrink GPTQ + mse + GPTAQ", "shrink", ["quant.scale_search=mse", "quant.gptaq=true"]),
    *[(f"shrink GPTQ + mse{' + GPTAQ' if gptaq else ''} + refine {s}x{w}, lr {lr}", "shrink",
       ["quant.scale_search=mse", *(["quant.gptaq=true"] if gptaq else []), f"quant.refine_steps={s}",
        f"quant.refine_windows={w}", f"quant.refine_lr={lr}"])
      for gptaq, s, w, lr in ((False, 25, 2, 0.005), (True, 25, 2, 0.005), (True, 50, 2, 0.005), (True, 25, 2, 0.01))],
    ("shrink quant=best", "shrink", ["quant=best"]),
    # what the preset's calibration settings buy (it runs without true-sequential, bfloat16 products)
    ("shrink quant=best, true-sequential", "shrink", ["quant=best", "quant.true_sequential=true"]),
    ("shrink quant=best, float32", "shrink", ["quant=best", "data.calib.dtype=float32"]),
    # its refinement's step size and the windows per step, at the same cost (50 x 1 reads as many windows)
    ("shrink quant=best, lr 0.01", "shrink", ["quant=best", "quant.refine_lr=0.01"]),
    ("shrink quant=best, lr 0.0025", "shrink", ["quant=best", "quant.refine_lr=0.0025"]),
    ("shrink quant=best, refine 25x4", "shrink", ["quant=best", "quant.refine_windows=4"]),
    ("shrink quant=best, refine 50x1", "shrink", ["quant=best", "quant.refine_steps=50", "quant.refine_windows=1"]),
    ("shrink quant=best, refine 50x1, lr 0.01", "shrink",
     ["quant=best", "quant.refine_steps=50", "quant.refine_windows=1", "quant.refine_lr=0.01"]),
]


def sample_windows(model: str, path: Path) -> None:
    """The calibration windows shrink samples for this model (data=docs_en, seed 0), as a file for the peers."""
    from safetensors.torch import save_file

    from engine.data import calibration_windows, token_stream
    from engine.modeling import load_tokenizer
    from shrink.config import compose

    cfg = compose(["model=local", f"model.path={model}", *CALIB])
    stream = token_stream(cfg.data.calib.path, load_tokenizer(Path(model), False), cfg.data.text_field,
                          cfg.data.cache_dir, key="data.calib.path")
    windows = calibration_windows(stream, cfg.data.calib.num_samples, cfg.data.calib.seq_len, cfg.seed)
    save_file({"input_ids": windows.contiguous()}, str(path))


def model_path(model: str) -> str:
    return MODELS[model] or str(family_model(model))


def shrink_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "shrink.cli", *overrides]


def evaluate(folder: Path, split: str, out: Path) -> dict[str, Any]:
    """The one evaluator: `shrink pipeline=eval` on a saved folder (GPTQ or dense), in a fresh process."""
    done = subprocess.run(shrink_cmd("pipeline=eval", "model=local", f"model.path={folder}", *CALIB,
                                     f"data.eval.path={SPLITS[split]}", "eval.batch_size=8", f"out={out}"),
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"evaluating {folder} failed:\n{done.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"ppl": next(iter(m["ppl"].values())), "eval_windows": next(iter(m["eval_windows"].values()))["evaluated"],
            "bits_per_weight": m.get("bits_per_weight")}


def run_arm(model: str, bits: int, tool: str, options: list[str], split: str, windows: Path,
            work: Path) -> dict[str, Any]:
    """One arm: quantize (its own process, its own venv), then the evaluator on what it saved."""
    folder = work / "model"
    if tool == "dense":
        return {**evaluate(Path(model_path(model)), split, work / "eval"), "seconds": 0.0}
    before = os.getloadavg()[0]
    if tool == "shrink":
        overrides = ["pipeline=quantize", "model=local", f"model.path={model_path(model)}", *CALIB,
                     f"data.eval.path={SPLITS[split]}", "eval.batch_size=8", "eval.baseline=false",
                     "quant.sym=true", f"quant.bits={bits}", f"quant.group_size={GROUP}", *options, f"out={work}"]
        done = subprocess.run(shrink_cmd(*overrides), cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"shrink {options} failed:\n{done.stderr[-3000:]}")
        m = json.loads((work / "metrics.json").read_text())
        stage = m["stages"]["quantize"]
        row = {"seconds": m["seconds"]["quantize"], "ppl_in_run": next(iter(m["ppl"].values())),
               "load_average": [before, os.getloadavg()[0]], "tool": "shrink",
               "refine": [p.get("after_layer", {}) for p in stage.get("profile", []) if p.get("after_layer")] or None}
    else:
        script = ROOT / "benchmarks" / "peers" / f"{tool}_arm.py"
        cmd = [VENVS[tool], str(script), "--model", model_path(model), "--windows", str(windows), "--bits", str(bits),
               "--group-size", str(GROUP), "--out", str(folder), *options]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        row = row_of(done, tool)
    return {**row, **evaluate(folder, split, work / "eval")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", choices=list(MODELS),
                        help="(repeat) default: the two shared teachers")
    parser.add_argument("--bits", action="append", type=int, choices=BITS, help="(repeat) default: 4, 3, 2")
    parser.add_argument("--arm", action="append", help="(repeat) an arm's label; default: every arm")
    parser.add_argument("--split", choices=list(SPLITS), default="test", help="the evaluation file")
    parser.add_argument("--dev", action="store_true", help="the dev arms (choose defaults; use with --split valid)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    arms = DEV_ARMS if args.dev else ARMS
    name = "quant_frontier" + ("_dev" if args.split == "valid" else "")
    results = Results(name, {"calibration": "128 x 512 docs-en train, seed 0 (the same windows for every arm)",
                             "eval": f"docs-en {args.split}, every 512-token window, by `shrink pipeline=eval`",
                             "group_size": GROUP, "sym": True, "peers": "gptqmodel 7.6.0 (project venv), "
                             f"llmcompressor 0.14 ({PEERS / 'llmc'}), auto-round 0.16.1 ({PEERS / 'autoround'})"},
                      key=("model", "bits", "arm"))
    chosen = [a for a in arms if not args.arm or a[0] in args.arm]
    for model in args.model or list(MODELS)[:2]:
        with tempfile.TemporaryDirectory(prefix="quant_frontier.") as tmp:
            windows = Path(tmp) / "windows.safetensors"
            sample_windows(model_path(model), windows)
            for bits in args.bits or BITS:
                for label, tool, options in chosen:
                    row_bits = 16 if tool == "dense" else bits
                    if results.has(model=model, bits=row_bits, arm=label):
                        continue
                    work = Path(tempfile.mkdtemp(prefix=f"{tool}.", dir=tmp))
                    start = time.time()
                    try:
                        row = run_arm(model, bits, tool, options, args.split, windows, work)
                    except RuntimeError as exc:  # a peer that does not run here: recorded, not fatal
                        print(f"{model} {bits}-bit {label}: {exc}", file=sys.stderr, flush=True)
                        row = {"failed": str(exc).splitlines()[0][:300]}
                    results.add({"model": model, "bits": row_bits, "arm": label, "options": options, **row,
                                 "wall_seconds": time.time() - start})
    if not args.dev:
        plot(results.read())


def plot(p: dict[str, Any], path: Optional[Path] = None) -> Path:
    """Perplexity against bits per weight of the decoder layers' codes, one panel per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = path or ROOT / "benchmarks" / "results" / f"{p['benchmark']}.png"
    models = [m for m in MODELS if any(r["model"] == m for r in p["rows"])]
    labels = [a[0] for a in ARMS if a[1] != "dense"]
    fig = Figure(figsize=(6 * len(models), 4.5))
    FigureCanvasAgg(fig)
    for k, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), k + 1)
        rows = [r for r in p["rows"] if r["model"] == model and "ppl" in r]
        dense = next((r["ppl"] for r in rows if r["arm"] == "dense"), None)
        for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "dense"):
            pts = sorted((r["bits"], r["ppl"]) for r in rows if r["arm"] == arm)
            ax.plot([b for b, _ in pts], [q for _, q in pts], marker="o", label=arm,
                    color=f"C{labels.index(arm) % 10}" if arm in labels else None)  # one colour per arm in every panel
        if dense:
            ax.axhline(dense, color="black", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xticks(list(BITS))
        ax.set_xlabel("bits per weight (codes; g128 scales add 0.125)")
        ax.set_ylabel("perplexity, docs-en test")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


def render_table(p: dict[str, Any]) -> str:
    """docs/results.md: per model and bits, every arm's perplexity, its increase over dense, seconds,
    for shrink's arms the perplexity of the exported folder reloaded in a fresh process, and the
    commit that measured the row (rows of one commit and model ran in one invocation)."""
    from benchmarks.markdown import footer, md

    order = [a[0] for a in ARMS + DEV_ARMS]
    out = []
    for model in dict.fromkeys(r["model"] for r in p["rows"]):
        rows = [r for r in p["rows"] if r["model"] == model]
        dense = next((r["ppl"] for r in rows if r["arm"] == "dense" and "ppl" in r), None)
        auto = {r["bits"]: r for r in rows if r["arm"] == "AutoRound light" and "seconds" in r}
        lines = []
        for bits in sorted({r["bits"] for r in rows if r["arm"] != "dense"}, reverse=True):
            for r in sorted((r for r in rows if r["bits"] == bits), key=lambda r: order.index(r["arm"])
                            if r["arm"] in order else len(order)):
                if "failed" in r:
                    lines.append([f"{bits}", r["arm"], "did not run: " + r["failed"][:80]] + [None] * 6)
                    continue
                ar = auto.get(bits)
                lines.append([f"{bits}", r["arm"], f"{r['ppl']:.3f}", dense and f"{r['ppl'] - dense:+.3f}",
                              f"{r['seconds']:.0f}",
                              ar and f"{r['seconds'] / ar['seconds']:.2f}",
                              r.get("ppl_in_run") and f"{r['ppl_in_run']:.3f}",
                              r.get("load_average") and "/".join(f"{x:.1f}" for x in r["load_average"]),
                              r.get("git_sha", "earlier")[:7]])
        head = f"`{model}`" + (f" (dense {dense:.3f})" if dense else "")
        out.append(head + "\n\n" + md(["bits", "arm", "ppl", "over dense", "seconds", "x AutoRound's time",
                                       "ppl in the run (shrink)", "load avg before/after", "git"], lines))
    return "\n\n".join(out) + footer(p)


if __name__ == "__main__":
    main()
