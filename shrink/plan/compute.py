"""`shrink plan`'s plan: every recipe stage priced, the last one placed, as plan.json's content."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from shrink.plan.args import PlanArgs, load_config, load_recipe
from shrink.plan.memory import (DTYPE_BYTES, Storage, Target, Unit, build_meta_model, kv_geometry, merge, price_units,
                                recipe_storages, split_units)
from shrink.plan.moe import (ExpertBlock, active_params, expert_parallel, find_expert_blocks, flops_per_token,
                             kv_values_per_token_layer, top_k)
from shrink.plan.placement import balance, device_map, place


def compute_plan(args: PlanArgs) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan, device_map) for the last stage of the recipe; raises before anything is written."""
    from engine.modeling import find_linears

    config = load_config(args.model_path, args.trust_remote_code)
    stages, quant, prune = load_recipe(args)
    model = build_meta_model(config)
    layers, kv_heads, head_dim = kv_geometry(config)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    kv_values, kv_what = kv_values_per_token_layer(config, kv_heads, head_dim)
    kv_per_layer = kv_values * args.context * args.batch * dtype_bytes
    head, body, tail, layers_name = split_units(model)
    for unit in body:
        unit.kv_bytes = kv_per_layer
    linears = {f"{u.label}.{name}" for u in body for name in find_linears(model.get_submodule(u.label))}
    params = sum(p.numel() for p in model.parameters())
    blocks = find_expert_blocks(model)
    k = top_k(config) if blocks else 0
    layouts = {name: b.layout for name, b in blocks.items()}
    stage_reports, final_units = [], []
    for storage in recipe_storages(stages, quant, prune, args.dtype):
        units = price_units(model, head + body + tail, storage, dtype_bytes, linears, layouts)
        units = [merge("embeddings", units[:len(head)]), *units[len(head):len(units) - len(tail)],
                 merge("final norm + lm_head", units[len(units) - len(tail):])]
        stage_reports.append(stage_report(storage, units, args.target))
        final_units = units
    runs, offloaded = place(final_units, args.target)
    dmap = device_map(runs, offloaded)
    plan = {
        "model": {"path": str(args.model_path), "model_type": config.model_type,
                  "architecture": type(model).__name__, "params": params,
                  "active_params": active_params(params, blocks, k), "layers": layers,
                  "layers_module": layers_name, "kv_heads": kv_heads, "head_dim": head_dim,
                  "kv_values_per_token_per_layer": kv_values, "kv_cache_holds": kv_what,
                  "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))},
        "target": {**asdict(args.target), "device_bytes": args.target.device_bytes,
                   "usable_bytes": args.target.usable_bytes},
        "workload": {"batch": args.batch, "context": args.context, "dtype": args.dtype,
                     "kv_cache_bytes": kv_per_layer * layers, "kv_cache_bytes_per_layer": kv_per_layer,
                     "flops_per_token": flops_per_token(model, config, blocks, k, args.context)},
        "recipe": {"stages": stages, "source": str(args.recipe) if args.recipe else "conf/config.yaml",
                   "overrides": args.overrides},
        "stages": stage_reports,
        "device_map_stage": stage_reports[-1]["name"],
        "fits": not offloaded,
        "devices": [device_report(d, run) for d, run in enumerate(runs)],
        "offloaded_to_cpu": [m for u in offloaded for m in u.modules],
    }
    if blocks:
        plan["moe"] = moe_report(blocks, k, final_units, kv_per_layer * layers, kv_heads, "MLA" in kv_what, args.target)
    return plan, dmap


def moe_report(blocks: dict[str, ExpertBlock], k: int, units: list[Unit], kv_bytes: int, kv_heads: int, mla: bool,
               target: Target) -> dict[str, Any]:
    """Experts per block, top-k, and the expert-parallel layout of the last stage."""
    expert_bytes = {n: b for u in units for n, b in u.expert_bytes.items()}
    sizes = sorted({b.layout.num_experts for b in blocks.values()})
    return {"experts_blocks": len(blocks), "experts_per_block": sizes[0] if len(sizes) == 1 else sizes,
            "experts_per_token": k, "expert_params": sum(b.params for b in blocks.values()),
            "expert_bytes": sum(expert_bytes.values()),
            "expert_parallel": expert_parallel(blocks, expert_bytes, sum(u.weight_bytes for u in units), kv_bytes,
                                               kv_heads, mla, target.count, target.usable_bytes)}


def stage_report(storage: Storage, units: list[Unit], target: Target) -> dict[str, Any]:
    weights = sum(u.weight_bytes for u in units)
    kv = sum(u.kv_bytes for u in units)
    bounds = balance([u.total for u in units], target.count)
    per_device = [sum(u.total for u in units[bounds[d]:bounds[d + 1]]) for d in range(target.count)]
    return {"name": storage.name, "description": storage.description, "weights_bytes": weights,
            "embeddings_bytes": units[0].weight_bytes, "layers_bytes": weights - units[0].weight_bytes
            - units[-1].weight_bytes, "head_bytes": units[-1].weight_bytes, "kv_cache_bytes": kv,
            "total_bytes": weights + kv, "balanced_per_device_bytes": per_device,
            "fits": max(per_device) <= target.usable_bytes}


def device_report(d: int, run: list[Unit]) -> dict[str, Any]:
    layer_ids = [int(u.label.rsplit(".", 1)[1]) for u in run if u.label.rsplit(".", 1)[-1].isdigit()]
    return {"device": d, "layers": f"{layer_ids[0]}-{layer_ids[-1]}" if layer_ids else "",
            "num_layers": len(layer_ids), "units": [u.label for u in run],
            "weights_bytes": sum(u.weight_bytes for u in run), "kv_bytes": sum(u.kv_bytes for u in run),
            "total_bytes": sum(u.total for u in run)}
