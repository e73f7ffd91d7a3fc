"""`shrink plan`'s rendering: the plan as the Markdown tables the command prints."""
from __future__ import annotations

from typing import Any

from shrink.plan.memory import gib


def format_plan(plan: dict[str, Any]) -> str:
    model, target, workload = plan["model"], plan["target"], plan["workload"]
    lines = [f"{model['architecture']} ({model['params'] / 1e9:.2f}B params, {model['layers']} layers, "
             f"{model['kv_heads']} KV heads x {model['head_dim']}) on {target['spec']}: "
             f"{gib(target['usable_bytes'])} usable per GPU ({target['reserve']:.0%} reserve)",
             f"KV cache: batch {workload['batch']} x context {workload['context']} ({workload['dtype']}) = "
             f"{gib(workload['kv_cache_bytes'])}",
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
    if plan["offloaded_to_cpu"]:
        lines += ["", f"does NOT fit: {len(plan['offloaded_to_cpu'])} modules offloaded to cpu"]
    return "\n".join(lines)
