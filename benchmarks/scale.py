"""Streaming from shards at scale (model.lazy): peak memory against depth, and past this machine's RAM.

The script writes its own synthetic checkpoints (random bf16 weights, no download): Llama-3-8B
shapes (hidden 4096, MLP 14336, 32 query / 8 key-value heads, vocab 128256, untied lm_head)
cut to a number of decoder layers, in 4 GB shards with model.safetensors.index.json, with the
shared docs-en tokenizer (8192 tokens: only the first 8192 embedding rows are ever read by
the calibration, all 128256 are loaded and written).

    python -m benchmarks.scale                    # depth: GPTQ and RTN 4-bit g128, 2, 4 and 8 layers, lazy
    python -m benchmarks.scale --beyond-ram 64    # RTN 4-bit g128 on a 64-layer (~29 GB) checkpoint
    python -m benchmarks.scale --depths 2 4 8 --methods gptq --side-by-side 4   # and gptqmodel on 4 layers

Depth arms: GPTQ (and RTN) 4-bit g128, 8 x 512 calibration tokens of the shipped Shakespeare, true-
sequential, model.dtype=bfloat16, model.lazy=true, pipeline [quantize] (the GPTQ folder is
written layer by layer, then discarded). Each arm runs in its own process; its peak RSS is
the kernel's high-water mark of that process (VmHWM). The machine is shared with other jobs
while this runs: seconds are noisy, so the 1-minute load average before and after each arm
is recorded next to them.

Side by side: gptqmodel 7.6.0 through optimum's GPTQQuantizer (the whole model loaded, as it
requires) on a cut whose shrink GPTQ depth arm runs in the same invocation, on the same
8 x 512 windows with the same settings (asymmetric as shrink's default, g128, damp 0.01, no
act-order, true-sequential, batches of 8): seconds of the quantization itself and peak RSS.

Beyond RAM: the checkpoint goes under --scratch (not the repository), is quantized with RTN
end to end lazily into a GPTQ folder there, the output's first window's logits are computed
by streaming that folder, and both are deleted after. The streamed logits are checked
against the non-streamed path (the whole quantized model loaded) on a 2-layer cut.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ROOT, Results, print_row, row_of
from benchmarks.markdown import footer, md

log = logging.getLogger(__name__)

SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
              rms_norm_eps=1e-5)
TOKENIZER = ROOT.parent / "shared" / "models" / "tokenizer-docs-en"
DEPTHS = (2, 4, 8)
SHARD = 4 * 10**9
POOL = 2**24
WINDOW = 64  # tokens of the reload check's window (64 layers of 8B shapes on a shared 2-core CPU)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """A random Llama-3-8B-shaped checkpoint of `layers` decoder layers in bf16 shards; its bytes.
    Tensors are generated and written one at a time (engine.streaming.ShardWriter)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.streaming import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, **SHAPES)
    config.dtype = "bfloat16"
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    # std 0.02 as the family initializes, so activations stay finite through the depth; drawn from
    # a pool of 2^24 Gaussian values at random offsets (generating 29 GB of fresh normals on a
    # shared 2-core machine would take longer than the runs themselves)
    pool = (torch.randn(POOL, generator=g) * 0.02).to(torch.bfloat16)
    writer = ShardWriter(folder, SHARD)
    for name, t in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            value = pooled(pool, t.numel(), g).reshape(t.shape)
        writer.add(name, value)
        del value
    writer.finish()
    config.save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def pooled(pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n values: slices of the pool at random offsets, one per pool length."""
    pieces, left = [], n
    while left:
        take = min(left, pool.numel() // 2)
        start = int(torch.randint(0, pool.numel() - take + 1, (1,), generator=g))
        pieces.append(pool[start:start + take])
        left -= take
    return torch.cat(pieces)


def ensure_checkpoint(folder: Path, layers: int) -> int:
    """write_checkpoint, unless `--write` already made it whole (its tokenizer files come last)."""
    if (folder / "tokenizer_config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    return write_checkpoint(folder, layers)


def overrides(folder: Path, method: str, lazy: bool, stages: str = "[quantize]") -> list[str]:
    return ["model=local", f"model.path={folder}", "model.dtype=bfloat16", "model.device=cpu",
            f"model.lazy={str(lazy).lower()}", "data=shakespeare", "data.calib.num_samples=8",
            "data.calib.seq_len=512", "pipeline=quantize", f"pipeline.stages={stages}", "eval.baseline=false",
            f"quant.method={method}", "quant.bits=4", "quant.group_size=128", "min_coverage=0.9"]


def vm_hwm() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def arm(folder: Path, method: str, lazy: bool, out: Path, stages: str) -> dict[str, Any]:
    """One quantization run in this process: seconds, per-layer profile, peak RSS."""
    from shrink.config import compose, quiet_import_noise
    from shrink.pipeline import run_pipeline

    quiet_import_noise()
    cfg = compose(overrides(folder, method, lazy, stages) + [f"out={out}"])
    start = time.time()
    metrics = run_pipeline(cfg, out)
    stage = metrics["stages"]["quantize"]
    layers = len(stage["profile"])
    return {"seconds": time.time() - start, "quantize_seconds": metrics["seconds"]["quantize"],
            "seconds_per_layer": metrics["seconds"]["quantize"] / layers, "layers": layers,
            "profile": [{k: p[k] for k in ("layer", "forward_seconds", "hessian_seconds", "compress_seconds")
                         if k in p} for p in stage["profile"]],
            "peak_rss_bytes": vm_hwm(), "output_bytes": metrics["size_bytes"]}


def arm_gptqmodel(folder: Path, out: Path) -> dict[str, Any]:
    """optimum.gptq.GPTQQuantizer (gptqmodel's GPTQ and packing) on the windows shrink samples
    for the same overrides, the whole model loaded."""
    from optimum.gptq import GPTQQuantizer

    from engine.state import RunState
    from shrink.config import compose, quiet_import_noise
    from shrink.model_folder import load_model

    quiet_import_noise()
    cfg = compose(overrides(folder, "gptq", False) + [f"out={out}"])
    model, tokenizer = load_model(cfg.model)
    windows = RunState(cfg, out, model, tokenizer).calibration()
    dataset = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    quantizer = GPTQQuantizer(bits=4, group_size=128, sym=bool(cfg.quant.sym), desc_act=False, true_sequential=True,
                              damp_percent=cfg.quant.damp, dataset=dataset, batch_size=8,
                              pad_token_id=tokenizer.eos_token_id, model_seqlen=windows.shape[1])
    start = time.time()
    quantizer.quantize_model(model, tokenizer)
    seconds = time.time() - start
    layers = model.config.num_hidden_layers
    return {"seconds": seconds, "quantize_seconds": seconds, "seconds_per_layer": seconds / layers,
            "layers": layers, "peak_rss_bytes": vm_hwm()}


def run_arm(folder: Path, method: str, lazy: bool, out: Path, stages: str = "[quantize]") -> dict[str, Any]:
    """`arm` in a subprocess of its own (its peak RSS is its own), with the load average around it."""
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "benchmarks.scale", "--arm", str(folder), "--method", method, "--out", str(out),
           "--stages", stages] + (["--lazy"] if lazy else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return {**row_of(proc, f"arm {method} on {folder.name}"), "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0]}


def depth(results: Results, scratch: Path, depths: tuple[int, ...], method: str) -> None:
    for layers in depths:
        if results.has(kind="depth", method=method, layers=layers, lazy=True):
            continue
        folder = scratch / f"llama3-8b-{layers}l"
        size = ensure_checkpoint(folder, layers)
        run = scratch / f"run-{layers}"
        shutil.rmtree(run, ignore_errors=True)  # an interrupted earlier invocation's
        try:
            row = run_arm(folder, method, True, run, stages="[quantize,export]")
            if layers == min(depths):  # streamed logits of the output against the whole-model path
                streamed, eager = streamed_logits(run / "model"), eager_logits(run / "model")
                row.update(streamed_logits_equal_eager=bool(torch.equal(streamed, eager)),
                           streamed_logits_max_abs_diff=float((streamed - eager).abs().max()))
        finally:
            shutil.rmtree(run, ignore_errors=True)
        results.add({"kind": "depth", "layers": layers, "lazy": True, "method": method, "checkpoint_bytes": size,
                     **row})
        log.info("depth %d: peak RSS %.2f GiB, %.1f s/layer", layers, row["peak_rss_bytes"] / 2**30,
                 row["seconds_per_layer"])


def side_by_side(results: Results, scratch: Path, layers: int) -> None:
    """gptqmodel's GPTQ on the cut whose shrink GPTQ depth row this invocation measured."""
    if results.has(kind="side_by_side", method="gptqmodel", layers=layers, lazy=False):
        return
    folder = scratch / f"llama3-8b-{layers}l"
    size = ensure_checkpoint(folder, layers)
    run = scratch / "side-gptqmodel"
    try:
        row = run_arm(folder, "gptqmodel", False, run)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    results.add({"kind": "side_by_side", "layers": layers, "lazy": False, "method": "gptqmodel",
                 "checkpoint_bytes": size, **row})


def streamed_logits(folder: Path) -> torch.Tensor:
    """Logits of the first eval-corpus window (WINDOW tokens) of a GPTQ folder, streamed layer by layer."""
    from engine.streaming import build_skeleton, lazy_forward
    from quant.export import quantized_skeleton
    from quant.layout import checkpoint_reader

    lazy = build_skeleton(folder, torch.bfloat16, replace=quantized_skeleton(folder, torch.bfloat16),
                          reader=checkpoint_reader)
    window = first_window(folder)
    with torch.no_grad(), lazy_forward(lazy, window, 1, torch.device("cpu")) as forward:
        return forward(input_ids=window).logits.float()


def first_window(folder: Path) -> torch.Tensor:
    from engine.data import eval_windows, token_stream
    from engine.modeling import load_tokenizer
    from shrink.config import asset_path

    stream = token_stream(asset_path("shakespeare-eval.jsonl.gz"), load_tokenizer(folder), "text", None)
    return eval_windows(stream, WINDOW, 1)


def eager_logits(folder: Path) -> torch.Tensor:
    from quant.export import load_quantized_model

    model = load_quantized_model(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(input_ids=first_window(folder)).logits.float()


def beyond_ram(results: Results, scratch: Path, layers: int) -> None:
    if results.has(kind="beyond_ram", method="rtn", layers=layers, lazy=True):
        return
    folder = scratch / f"llama3-8b-{layers}l"
    start = time.time()
    size = ensure_checkpoint(folder, layers)
    write_seconds = time.time() - start
    try:
        row = run_arm(folder, "rtn", True, scratch / "run", stages="[quantize,export]")
        start = time.time()
        logits = streamed_logits(scratch / "run" / "model")
        reload = {"reload_seconds": time.time() - start, "reload_logits_finite": bool(torch.isfinite(logits).all())}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(scratch / "run", ignore_errors=True)
    results.add({"kind": "beyond_ram", "layers": layers, "lazy": True, "method": "rtn", "checkpoint_bytes": size,
                 "checkpoint_write_seconds": write_seconds, "ram_bytes": ram_bytes(), **row, **reload})


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def run_label(r: dict[str, Any]) -> str:
    tool = "gptqmodel 7.6.0 GPTQ" if r["method"] == "gptqmodel" else r["method"].upper()
    where = "lazy" if r["lazy"] else "whole model loaded"
    suffix = {"beyond_ram": " (beyond RAM)", "side_by_side": " (side by side)"}.get(r["kind"], "")
    return f"{tool} 4-bit g128, {where}{suffix}"


def render_table(p: dict[str, Any]) -> str:
    kinds = ["depth", "side_by_side", "beyond_ram"]
    rows = sorted(p["rows"], key=lambda r: (kinds.index(r["kind"]), r["method"], not r["lazy"], r["layers"]))
    table = md(["run", "layers", "checkpoint GiB", "peak RSS GiB", "RSS / checkpoint", "s / layer",
                "load avg (before, after)"],
               [[run_label(r), r["layers"], gib(r["checkpoint_bytes"]), gib(r["peak_rss_bytes"]),
                 f"{r['peak_rss_bytes'] / r['checkpoint_bytes']:.2f}", f"{r['seconds_per_layer']:.1f}",
                 f"{r['load_average_before']:.1f}, {r['load_average_after']:.1f}"] for r in rows])
    notes = []
    for r in rows:
        if "streamed_logits_equal_eager" in r:
            notes.append(f"{r['method'].upper()} output of the {r['layers']}-layer cut reloaded by streaming: one "
                         f"{WINDOW}-token window's logits bitwise equal to the whole-model path's: "
                         f"{r['streamed_logits_equal_eager']} (max abs difference "
                         f"{r['streamed_logits_max_abs_diff']:.3g}).")
        ours = next((o for o in rows if o["kind"] == "depth" and o["method"] == "gptq" and o["layers"] == r["layers"]),
                    None)
        if r["kind"] == "side_by_side" and ours is not None:
            notes.append(f"Side by side on the {r['layers']}-layer cut: gptqmodel 7.6.0 (optimum's GPTQQuantizer, the "
                         f"whole model loaded; its seconds are quantize_model's) {r['quantize_seconds']:.0f} s and "
                         f"peak RSS {gib(r['peak_rss_bytes'])} GiB; shrink's streamed GPTQ "
                         f"{ours['quantize_seconds']:.0f} s (the quantize stage) and {gib(ours['peak_rss_bytes'])} "
                         f"GiB (with its export).")
        if r["kind"] == "beyond_ram":
            notes.append(f"Beyond RAM: {gib(r['checkpoint_bytes'])} GiB of bf16 shards on a machine with "
                         f"{gib(r['ram_bytes'])} GiB of RAM, quantized end to end with peak RSS "
                         f"{gib(r['peak_rss_bytes'])} GiB; the output ({gib(r['output_bytes'])} GiB) reloaded by "
                         f"streaming, one window's logits finite: {r['reload_logits_finite']}.")
    text = "\n\n".join([table, *notes]) if notes else table
    return text + ("\n\nSynthetic Llama-3-8B-shaped checkpoints (random bf16 weights, vocab 128256, untied lm_head: "
                   "the embeddings and lm_head alone are 1.96 GiB), model.dtype=bfloat16, GPTQ on 8 x 512 "
                   "calibration tokens (RTN needs none), one process per run, pipeline quantize + export (the "
                   "export's pass over the written layers for metrics.json's sparsity included in the peak); peak "
                   "RSS is the process's VmHWM (memory-mapped shard pages included). Seconds depend on what else ran "
                   "on the 2-core machine: the 1-minute load average before and after each run is recorded.") + footer(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS))
    parser.add_argument("--methods", nargs="*", default=["gptq", "rtn"])
    parser.add_argument("--beyond-ram", type=int, default=0, help="layers of the beyond-RAM checkpoint (0: skip)")
    parser.add_argument("--side-by-side", type=int, default=0,
                        help="layers of the cut for shrink against gptqmodel (0: skip)")
    parser.add_argument("--write", type=int, default=0, help="only write the beyond-RAM checkpoint of this depth")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scale_ckpt"))
    parser.add_argument("--arm", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="gptq", help=argparse.SUPPRESS)
    parser.add_argument("--lazy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stages", default="[quantize]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.write:
        ensure_checkpoint(args.scratch / f"llama3-8b-{args.write}l", args.write)
        return
    if args.arm:
        row = arm_gptqmodel(args.arm, args.out) if args.method == "gptqmodel" else \
            arm(args.arm, args.method, args.lazy, args.out, args.stages)
        print_row(row)
        return
    config = {"shapes": SHAPES, "calibration": "8 x 512 shakespeare", "bits": 4, "group_size": 128,
              "dtype": "bfloat16", "shard_bytes": SHARD}
    results = Results("scale", config, key=("kind", "method", "layers", "lazy"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        depth(results, args.scratch, tuple(args.depths), method)
    if args.side_by_side:
        side_by_side(results, args.scratch, args.side_by_side)
    for layers in {*args.depths, args.side_by_side} - {0}:  # kept until every arm ran on them
        shutil.rmtree(args.scratch / f"llama3-8b-{layers}l", ignore_errors=True)
    if args.beyond_ram:
        beyond_ram(results, args.scratch, args.beyond_ram)


if __name__ == "__main__":
    main()
