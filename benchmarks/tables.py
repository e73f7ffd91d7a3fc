"""Render benchmarks/results/*.json into Markdown tables and splice them into README.md and
docs/results.md (GENERATED) between `<!-- BEGIN table:NAME -->` and `<!-- END table:NAME -->` markers.

    python -m benchmarks.tables  # rewrite those files in place
Tables are only ever generated from the JSON, never typed by hand.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from benchmarks.markdown import footer, md

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Reference figures for llama-teacher from ../shared/README.md (RTN computed by the task authors).
SHARED_RTN = {(4, 128): 16.892, (4, -1): 16.972, (3, 128): 17.992, (3, -1): 18.565, (2, 64): 26.793}


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
        by.setdefault((r["pattern"], r["sparsity_target"]), {})[(r["method"], bool(r.get("reconstruct")))] = r
    methods = ("magnitude", "wanda", "sparsegpt")

    def ratio(cell: dict, key: tuple[str, bool]) -> str | None:
        """The quality bar: increase over dense as a fraction of plain magnitude pruning's."""
        mag, r = cell.get(("magnitude", False)), cell.get(key)
        return f"{(r['ppl'] - base) / (mag['ppl'] - base):.2f}" if base and mag and r else None

    def table(reconstruct: bool) -> str:
        rows = []
        for (pattern, s), cell in by.items():
            label = f"{pattern}" if pattern != "unstructured" else f"{int(s * 100)}% unstructured"
            sg = cell.get(("sparsegpt", reconstruct))
            rows.append([label] + [cell[(m, reconstruct)]["ppl"] if (m, reconstruct) in cell else None for m in methods]
                        + [ratio(cell, ("sparsegpt", reconstruct)), sg and f"{sg['sparsity']:.4f}"]
                        + ([sg and f"{sg['layer_error_ratio']:.2f}"] if reconstruct else []))
        # summed over every Linear: the error the re-solve leaves of the SparseGPT sweep's
        extra = ["SparseGPT layer error, re-solved / swept"] if reconstruct else []
        return md(["setting", "magnitude", "Wanda", "SparseGPT", "SparseGPT increase / magnitude's",
                   "achieved sparsity"] + extra, rows)

    text = f"Dense baseline: {base:.3f}\n\n" if base else ""
    text += table(False)
    if any(r.get("reconstruct") for r in prune):
        text += ("\n\nThe same with `prune.reconstruct=true` (each method's mask, kept weights re-solved by "
                 "masked least squares; the ratio is still against plain magnitude pruning):\n\n" + table(True))
    timing = RESULTS / "prune_timing.json"
    if timing.is_file():  # measured alone: the quality runs above shared the CPU with other jobs
        t = json.loads(timing.read_text())
        one_thread = ", 1 thread" if t["config"].get("threads") == 1 else ""
        seconds = {(r["method"], bool(r.get("reconstruct")), r["pattern"]): r["seconds_per_layer"] for r in t["rows"]}
        rows = [[m + (" + reconstruct" if rec else "")]
                + [f"{seconds[(m, rec, pat)]:.2f}" if (m, rec, pat) in seconds else None for pat in ("unstructured", "2:4")]
                for m in methods for rec in (False, True) if any(k[:2] == (m, rec) for k in seconds)]
        text += ("\n\nSeconds per decoder layer, prune stage alone (calibration forward, Hessians, mask, "
                 f"updates; `--timing`{one_thread}; no other job running):\n\n"
                 + md(["method", "unstructured 50%", "2:4"], rows) + footer(t))
    combined = [r for r in p["rows"] if r["kind"] == "combined"]
    if combined:
        alone = []
        for rec in (False, True):
            sg = by.get(("unstructured", 0.5), {}).get(("sparsegpt", rec))
            if sg:
                alone.append([f"SparseGPT 50%{' + reconstruct' if rec else ''} alone", sg["ppl"], f"{sg['sparsity']:.4f}"])
        quant = RESULTS / "quant_quality.json"
        gptq = [r for r in json.loads(quant.read_text())["rows"] if (r["method"], r["act_order"], r["bits"],
                r["group_size"]) == ("gptq", False, 4, 128)] if quant.is_file() else []
        if gptq:
            alone.append(["GPTQ 4-bit g128 alone (quant_quality.json)", gptq[0]["ppl"], ""])
        text += "\n\n" + md(["prune + quantize", "ppl", "zeros in decoder Linears"],
                            alone + [[r["label"], r["ppl"], f"{r['sparsity']:.4f}"] for r in combined])
    return text + footer(p)


def prune_ablation(p: dict[str, Any]) -> str:
    """SparseGPT 50% settings: increase over dense as a fraction of magnitude's."""
    by = {r["label"]: r for r in p["rows"]}
    dense, mag = by.get("dense"), by.get("magnitude")
    rows = []
    for r in p["rows"]:
        ratio = (r["ppl"] - dense["ppl"]) / (mag["ppl"] - dense["ppl"]) if dense and mag and r is not dense else None
        rows.append([r["label"], " ".join(r["overrides"]) or "-", r["ppl"], ratio and f"{ratio:.2f}"])
    return md(["setting", "overrides", "docs-en valid ppl", "increase / magnitude's"], rows) + footer(p)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plans(paths: list[Path]) -> str:
    """Deployment plans (shrink plan) for one model on several targets."""
    loaded = [json.loads(p.read_text()) for p in paths]
    first = loaded[0]
    w = first["workload"]
    text = (f"{first['model']['architecture']} ({first['model']['params'] / 1e9:.1f}B parameters, from "
            f"`{first['model']['path']}`), batch {w['batch']}, context {w['context']}, {w['dtype']} "
            f"(KV cache {gib(w['kv_cache_bytes'])}), {first['target']['reserve']:.0%} of each GPU reserved.\n\n")
    rows = []
    for i, stage in enumerate(first["stages"]):
        cells = [stage["description"], gib(stage["weights_bytes"]), gib(stage["total_bytes"])]
        for plan in loaded:
            st = plan["stages"][i]
            cells.append(("fits" if st["fits"] else "does not fit") + f", largest GPU {gib(max(st['balanced_per_device_bytes']))}")
        rows.append(cells)
    text += md(["stage", "weights", "weights + KV"] + [p["target"]["spec"] for p in loaded], rows)
    if "moe" in first:
        text += "\n\n" + moe_plan_line(loaded)
    for plan in loaded:
        if plan["target"]["count"] > 1:
            text += f"\n\nDevice map on {plan['target']['spec']} ({plan['device_map_stage']} stage):\n\n"
            text += md(["GPU", "layers", "also holds", "total"],
                       [[d["device"], f"{d['layers']} ({d['num_layers']})",
                         ", ".join(u for u in d["units"] if not u.startswith(plan["model"]["layers_module"] + ".")) or "-",
                         gib(d["total_bytes"])] for d in plan["devices"]])
    return text


def moe_plan_line(loaded: list[dict[str, Any]]) -> str:
    """Active parameters, compute per token and the expert-parallel layout of an MoE plan."""
    first = loaded[0]
    moe, w = first["moe"], first["workload"]
    layouts = "; ".join(
        f"{p['target']['spec']}: {p['moe']['expert_parallel']['devices'][0]['experts_per_block']} experts per block "
        f"per GPU, largest GPU {gib(max(d['total_bytes'] for d in p['moe']['expert_parallel']['devices']))} "
        f"({'fits' if p['moe']['expert_parallel']['fits'] else 'does not fit'})" for p in loaded)
    return (f"Mixture of experts: {moe['experts_blocks']} blocks of {moe['experts_per_block']} experts, "
            f"{moe['experts_per_token']} per token: {first['model']['active_params'] / 1e9:.1f}B active parameters, "
            f"{w['flops_per_token'] / 1e9:.0f} GFLOP per token at position {w['context']}; KV cache of "
            f"{first['model']['kv_cache_holds']} per token and layer. Expert-parallel layout "
            f"({first['device_map_stage']} stage): {layouts}.")


def sweep_report(report_md: Path, where: Path) -> str:
    """The table written by `shrink report` for the demo sweep, its picture path relative to `where`."""
    body = report_md.read_text().split("\n", 2)[2].strip()
    rel = Path(os.path.relpath(report_md.parent, where)).as_posix()
    return body.replace("](report.png)", f"]({rel}/report.png)")


def summary(loaded: dict[str, dict[str, Any]]) -> str:
    """The README's headline rows: GPTQ against RTN and SparseGPT against its baselines on llama-teacher."""
    rows = []
    quant = loaded.get("quant_quality")
    if quant:
        ppl = {(r["method"], r["act_order"], r["bits"], r["group_size"]): r["ppl"] for r in quant["rows"]}
        for bits, g in ((4, 128), (3, 128)):
            if ("gptq", False, bits, g) in ppl:
                rtn = ppl.get(("rtn", False, bits, g))
                rows.append([f"quantize, {bits}-bit g{g}", rtn and f"RTN {rtn:.3f}",
                             f"GPTQ {ppl[('gptq', False, bits, g)]:.3f}", "[quantization](docs/results.md#quantization)"])
    speed = {(r["tool"], r["bits"]): r for r in loaded.get("calib_speed", {}).get("rows", []) if r["group_size"] == 128}
    for bits in (4, 3):
        ours, theirs = speed.get(("shrink", bits)), speed.get(("gptqmodel", bits))
        if ours and theirs:
            rows.append([f"GPTQ {bits}-bit g128 time, 2 CPU threads",
                         f"gptqmodel {theirs['seconds']:.0f} s (ppl {theirs['ppl']:.3f})",
                         f"{ours['seconds']:.0f} s (ppl {ours['ppl']:.3f}), {theirs['seconds'] / ours['seconds']:.1f}x faster",
                         "[calibration speed](docs/results.md#calibration-speed-against-gptqmodel-python--m-benchmarkscalib_speed)"])
    prune = [r for r in loaded.get("prune_quality", {}).get("rows", []) if r["kind"] == "prune"]
    by = {(r["pattern"], r["sparsity_target"], r["method"], bool(r.get("reconstruct"))): r["ppl"] for r in prune}
    for pattern, label in (("unstructured", "50% unstructured"), ("2:4", "2:4")):
        if (pattern, 0.5, "sparsegpt", False) in by:
            ours = f"SparseGPT {by[(pattern, 0.5, 'sparsegpt', False)]:.3f}"
            if (pattern, 0.5, "sparsegpt", True) in by:
                ours += f", + reconstruct {by[(pattern, 0.5, 'sparsegpt', True)]:.3f}"
            base = ", ".join(f"{name} {by[(pattern, 0.5, m, False)]:.3f}"
                             for m, name in (("magnitude", "magnitude"), ("wanda", "Wanda")) if (pattern, 0.5, m, False) in by)
            rows.append([f"prune, {label}", base, ours, "[pruning](docs/results.md#pruning)"])
    rows += moe_summary(loaded.get("moe"))
    dense = next((r["baseline_ppl"] for r in prune if "baseline_ppl" in r), None)
    head = (f"`llama-teacher` unless a row names `moe-teacher`, docs-en test perplexity (dense fp32: {dense:.3f}):\n\n"
            if dense else "")
    return head + md(["task", "baselines", "shrink", "details"], rows)


def moe_summary(p: dict[str, Any] | None) -> list[list[Any]]:
    """Headline rows of the mixture-of-experts benchmark: GPTQ against RTN, SparseGPT against magnitude/Wanda."""
    if not p:
        return []
    by = {r["label"]: r for r in p["rows"]}
    where = f"`moe-teacher`, {p['config']['eval'].split(', ')[1].split(' of ')[0]}"
    link = "[mixture of experts](docs/results.md#mixture-of-experts-moe-teacher-python--m-benchmarksmoe)"
    rows = []
    # (task, baseline arm and its short name, shrink arm and its short name)
    pairs = (("quantize MoE, 4-bit g128", "RTN 4-bit g128", "RTN", "GPTQ 4-bit g128", "GPTQ"),
             ("quantize MoE, 4-bit g128, 4-bit head, 8-bit embedding", "RTN 4-bit g128, packed ends", "RTN",
              "GPTQ 4-bit g128, packed ends", "GPTQ"),
             ("prune 50% + quantize MoE, packed ends", "magnitude 50% + RTN 4-bit, packed ends", "magnitude + RTN",
              "SparseGPT 50% + GPTQ 4-bit, packed ends", "SparseGPT + GPTQ"))
    for task, base, base_name, ours, our_name in pairs:
        if base in by and ours in by:
            rows.append([f"{task} ({where})", f"{base_name} {by[base]['ppl']:.3f}",
                         f"{our_name} {by[ours]['ppl']:.3f} at {by[ours]['bits_per_weight']:.2f} bits/weight", link])
    for pattern in ("50%", "2:4"):
        if f"SparseGPT {pattern}" in by:
            base = ", ".join(f"{m} {by[f'{m} {pattern}']['ppl']:.3f}" for m in ("magnitude", "Wanda")
                             if f"{m} {pattern}" in by)
            rows.append([f"prune MoE, {pattern} ({where})", base, f"SparseGPT {by[f'SparseGPT {pattern}']['ppl']:.3f}",
                         link])
    return rows


def _rendered_by(module: str) -> Callable[[dict[str, Any]], str]:
    """The table of a benchmark whose script renders its own (imported when rendered: the
    scripts import this module)."""
    def render(p: dict[str, Any]) -> str:
        return importlib.import_module(module).render_table(p)

    return render


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "quant_quality": quant_quality,
    "calib_speed": _rendered_by("benchmarks.calib_speed"),
    "scale_distributed": _rendered_by("benchmarks.scale_distributed"),
    "scale": _rendered_by("benchmarks.scale"),
    "prune_quality": prune_quality,
    "prune_ablation": prune_ablation,
    "distill_akt": _rendered_by("benchmarks.distill_akt_tables"),
    "distill_moe": _rendered_by("benchmarks.distill_moe"),
    "distill_memory": _rendered_by("benchmarks.distill_memory"),
    "scale_resume": _rendered_by("benchmarks.scale_resume"),
    "moe": _rendered_by("benchmarks.moe"),
    "reproducibility": _rendered_by("benchmarks.reproducibility"),
    "serve": _rendered_by("benchmarks.serve"),
    "quant_frontier": _rendered_by("benchmarks.quant_frontier"),
    "quant_frontier_dev": _rendered_by("benchmarks.quant_frontier"),
}


def splice(text: str, name: str, block: str) -> str:
    """Replace what stands between the BEGIN/END markers of `name` (possibly nothing)."""
    pattern = re.compile(rf"(<!-- BEGIN table:{name} -->\n)(?:.*?\n)?(<!-- END table:{name} -->)", re.S)
    return pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)


# Every file that holds generated tables; each table is spliced wherever its markers stand.
GENERATED = (ROOT / "README.md", ROOT / "docs" / "results.md")


def blocks(where: Path) -> dict[str, str]:
    """Every table rendered from the committed results, by marker name, for a file in folder `where`."""
    from benchmarks.task_accuracy import render as task_accuracy

    renderers = {**RENDERERS, "task_accuracy": task_accuracy}
    loaded = {name: json.loads(path.read_text()) for name in renderers if (path := RESULTS / f"{name}.json").is_file()}
    out = {name: renderers[name](payload) for name, payload in loaded.items()}
    out["summary"] = summary(loaded)
    if (RESULTS / "default_job.json").is_file():
        from benchmarks.default_job import render

        out["default_job"] = render(json.loads((RESULTS / "default_job.json").read_text()))
    variants = sorted(RESULTS.glob("distill_akt_*.json"))
    if variants:
        from benchmarks.distill_akt_tables import (render_budgets, render_lm_term, render_relations, render_seeds,
                                                   render_variants)

        payloads = [json.loads(p.read_text()) for p in variants]
        base = [loaded["distill_akt"]] if "distill_akt" in loaded else []
        out["distill_variants"] = render_variants(payloads)
        out["distill_budgets"] = render_budgets(base + payloads)
        out["distill_seeds"] = render_seeds(base + payloads)
        out["distill_relations"] = render_relations(base + payloads)
        out["distill_lm_term"] = render_lm_term(base + payloads)
    if (RESULTS / "sweep_report" / "report.md").is_file():
        out["sweep"] = sweep_report(RESULTS / "sweep_report" / "report.md", where)
    groups: dict[str, list[Path]] = {}
    for path in sorted(RESULTS.glob("plan_*/plan.json"), key=lambda p: ("4x" in str(p), str(p))):
        groups.setdefault(json.loads(path.read_text())["model"]["path"], []).append(path)
    if groups:
        out["plan"] = "\n\n".join(plans(paths) for paths in groups.values())
    return out


def render(text: str, where: Path) -> str:
    """`text` (a file in folder `where`) with every table between its markers re-rendered."""
    for name, block in blocks(where).items():
        text = splice(text, name, block)
    return text


def render_all(files: tuple[Path, ...] = GENERATED) -> None:
    for path in files:
        path.write_text(render(path.read_text(), path.parent))


if __name__ == "__main__":
    render_all()
