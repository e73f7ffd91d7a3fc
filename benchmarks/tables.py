"""Render benchmarks/results/*.json into Markdown tables and splice them into README.md
between `<!-- BEGIN table:NAME -->` and `<!-- END table:NAME -->` markers.

    python benchmarks/tables.py          # rewrite README.md in place
Tables are only ever generated from the JSON, never typed by hand.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Reference figures for llama-teacher from ../shared/README.md (RTN computed by the task authors).
SHARED_RTN = {(4, 128): 16.892, (4, -1): 16.972, (3, 128): 17.992, (3, -1): 18.565, (2, 64): 26.793}


def md(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def footer(payload: dict[str, Any]) -> str:
    dev = payload["device"]
    where = dev.get("cuda") or f"{dev['cpu']} CPU, {dev['threads']} threads"
    return f"\n\n_Measured {payload['date']} on {where}, torch {dev['torch']}, git {payload['git_sha'][:10]}._"


def quant_quality(p: dict[str, Any]) -> str:
    by = {}
    for r in p["rows"]:
        by.setdefault((r["bits"], r["group_size"]), {})[(r["method"], r["act_order"])] = r
    rows = []
    for (bits, g), cell in by.items():
        rtn, gptq, gptq_ao = cell.get(("rtn", False)), cell.get(("gptq", False)), cell.get(("gptq", True))
        rows.append([f"{bits}-bit {'per-channel' if g == -1 else f'g{g}'}", SHARED_RTN.get((bits, g)),
                     rtn and rtn["ppl"], gptq and gptq["ppl"], gptq_ao and gptq_ao["ppl"],
                     gptq and f"{gptq['seconds_per_layer']:.1f}",
                     gptq and f"{gptq['peak_memory_cpu'] / 2**30:.2f}"])
    return md(["setting", "RTN (shared ref.)", "RTN (ours)", "GPTQ", "GPTQ act-order", "GPTQ s/layer",
               "peak RSS GiB"], rows) + footer(p)


def prune_quality(p: dict[str, Any]) -> str:
    prune = [r for r in p["rows"] if r["kind"] == "prune"]
    base = next((r["baseline_ppl"] for r in prune if "baseline_ppl" in r), None)
    by = {}
    for r in prune:
        by.setdefault((r["pattern"], r["sparsity_target"]), {})[r["method"]] = r
    rows = []
    for (pattern, s), cell in by.items():
        label = f"{pattern}" if pattern != "unstructured" else f"{int(s * 100)}% unstructured"
        sg = cell.get("sparsegpt")
        rows.append([label] + [cell[m]["ppl"] if m in cell else None for m in ("magnitude", "wanda", "sparsegpt")]
                    + [sg and f"{sg['sparsity']:.4f}", sg and f"{sg['seconds_per_layer']:.1f}"])
    text = f"Dense baseline: {base:.3f}\n\n" if base else ""
    text += md(["setting", "magnitude", "Wanda", "SparseGPT", "achieved sparsity", "SparseGPT s/layer"], rows)
    combined = [r for r in p["rows"] if r["kind"] == "combined"]
    if combined:
        text += "\n\n" + md(["prune + quantize", "ppl", "zeros in decoder Linears"],
                            [[r["label"], r["ppl"], f"{r['sparsity']:.4f}"] for r in combined])
    return text + footer(p)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "quant_quality": quant_quality,
    "prune_quality": prune_quality,
}


def render_all(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    for name, render in RENDERERS.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        block = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- BEGIN table:{name} -->\n).*?(\n<!-- END table:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + block + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    render_all()
