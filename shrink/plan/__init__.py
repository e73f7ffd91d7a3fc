"""`shrink plan`: will a model, compressed by a recipe, fit on N GPUs, and how to spread it.

Everything is computed from config.json alone: the model is built on the meta device
(shapes, no storage), so a 176B-parameter plan takes a second and no weights. For each
stage of the recipe (dense -> prune -> quantize) the bytes of every parameter are priced
by how that stage stores it (memory.py).

The KV cache is 2 x layers x kv_heads x head_dim x context x batch x dtype bytes, booked
on the GPU holding each layer. A target `NxNAME-XXGB` is N devices of XX GiB (what
nvidia-smi reports); `reserve` (default 10%) of each is kept free for activations, the CUDA
context and allocator fragmentation. The device_map splits the model into contiguous runs
(embeddings, layers..., final norm + lm_head) over the N GPUs minimizing the largest
per-GPU total, so the GPUs holding the embeddings and the head get fewer layers, the way
Yuan 2.0 balances its pipeline stages by memory rather than by layer count (placement.py).

args.py parses the command's key=value arguments, compute.py assembles plan.json, render.py
prints it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.files import atomic_write_text
from shrink.plan.args import parse_plan_args
from shrink.plan.compute import compute_plan
from shrink.plan.render import format_plan


def write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def run_plan(argv: list[str]) -> dict[str, Any]:
    """`shrink plan key=value...`: compute, then write plan.json + device_map.json into out."""
    args = parse_plan_args(argv)
    plan, dmap = compute_plan(args)
    plan["device_map_file"] = "device_map.json"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "device_map.json", dmap)
    write_json_atomic(args.out / "plan.json", plan)
    print(format_plan(plan))
    print(f"\nwrote {args.out / 'plan.json'} and {args.out / 'device_map.json'}")
    return plan
