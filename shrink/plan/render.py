"""`shrink plan`'s rendering: the plan as the Markdown tables the command prints."""
from __future__ import annotations

from typing import Any

from shrink.plan.memory import gib


def format_plan(plan: dict[str, Any]) -> str:
    model, target, workload = plan["model"], plan["target"], plan["workload"]
    attention = ("multi-head latent attention" if model["kv_cache_holds"].startswith("MLA")
                 else f"{model['kv_heads']} KV heads x {model['head_dim']}")
    lines = [f"{model['architecture']} ({model['params'] / 1e9:.2f}B params, {model['layers']} layers, "
             f"{attention}) on {target['spec']}: "
             f"{gib(target['usable_bytes'])} usable per GPU ({target['reserve']:.0%} reserve)",
             f"KV cache: batch {workload['batch']} x context {workload['context']} ({workload['dtype']}) = "
             f"{gib(workload['kv_cache_bytes'])} ({model['kv_cache_holds']} per token and layer)",
             f"compute: {workload['flops_per_token'] / 1e9:.1f} GFLOP per token at position {workload['context']} "
             f"({model['active_params'] / 1e9:.2f}B active params)",
             "", f"| stage | weights | KV cache | total | largest GPU | fits {target['spec']} |",
             "|---|---|---|---|---|---|"]
    for stage in plan["stages"]:
        lines.append(f"| {stage['description']} | {gib(stage['weights_bytes'])} | {gib(stage['kv_cache_bytes'])} | "
                     f"{gib(stage['total_bytes'])} | {gib(max(stage['balanced_per_device_bytes']))} | "
                     f"{'yes' if stage['fits'] else 'no'} |")
    lines += ["", f"device map ({plan['device_map_stage']}):", "", "| GPU | layers | holds | weights | KV | total |",
              "|---|---|---|---|---|---|"]
    for device in plan["devices"]:
        extra = [unit for unit in device["units"] if not unit.rsplit(".", 1)[-1].isdigit()]
        lines.append(f"| {device['device']} | {device['layers'] or '-'} ({device['num_layers']}) | "
                     f"{', '.join(extra) or '-'} | {gib(device['weights_bytes'])} | {gib(device['kv_bytes'])} | "
                     f"{gib(device['total_bytes'])} |")
    if "moe" in plan:
        lines += ["", *format_expert_parallel(plan["moe"], plan["device_map_stage"])]
    if plan["offloaded_to_cpu"]:
        lines += ["", f"does NOT fit: {len(plan['offloaded_to_cpu'])} modules offloaded to cpu"]
    return "\n".join(lines)


def format_expert_parallel(moe: dict[str, Any], stage: str) -> list[str]:
    ep = moe["expert_parallel"]
    lines = [f"experts: {moe['experts_blocks']} blocks x {moe['experts_per_block']} experts, {moe['experts_per_token']} "
             f"per token; {moe['expert_params'] / 1e9:.2f}B expert params = {gib(moe['expert_bytes'])} ({stage})",
             f"expert-parallel layout ({stage}; experts split over the GPUs, the rest tensor-parallel): "
             f"{'fits' if ep['fits'] else 'does NOT fit'}", "",
             "| GPU | experts per block | experts | rest (sharded) | KV | total |", "|---|---|---|---|---|---|"]
    for d in ep["devices"]:
        lines.append(f"| {d['device']} | {d['experts_per_block']} | {gib(d['expert_bytes'])} | "
                     f"{gib(d['sharded_bytes'])} | {gib(d['kv_bytes'])} | {gib(d['total_bytes'])} |")
    return lines
