"""`shrink plan`'s placement: contiguous runs of units over the GPUs that minimize the largest
per-GPU total, CPU offload of what does not fit, and transformers' device_map."""
from __future__ import annotations

import math
from typing import Any

from engine.errors import ShrinkError
from shrink.plan.memory import Target, Unit, gib


def balance(sizes: list[int], parts: int) -> list[int]:
    """Cut points of the contiguous split of `sizes` into `parts` runs (runs may be empty)
    that minimizes the largest run sum: exact DP, O(parts x n^2), trivial for n ~ 100."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append(i)
        i = cut[k][i]
    return [0] + bounds[::-1]  # runs are sizes[bounds[d]:bounds[d + 1]]


def place(units: list[Unit], target: Target) -> tuple[list[list[Unit]], list[Unit]]:
    """(units per GPU, units offloaded to CPU). Balanced when everything fits; otherwise
    GPUs are filled in order and the rest goes to the CPU (accelerate's offload)."""
    usable = target.usable_bytes
    too_big = [u for u in units if u.total > usable]
    if too_big:
        unit = too_big[0]
        raise ShrinkError(f"target: {unit.label} alone needs {gib(unit.total)} but one {target.name} has "
                          f"{gib(usable)} usable ({target.gib:g} GiB, {target.reserve:.0%} reserve); "
                          "nothing can be placed")
    bounds = balance([u.total for u in units], target.count)
    runs = [units[bounds[d]:bounds[d + 1]] for d in range(target.count)]
    if max(sum(u.total for u in run) for run in runs) <= usable:
        return runs, []
    runs, rest = [[] for _ in range(target.count)], list(units)
    for d in range(target.count):
        used = 0
        while rest and used + rest[0].total <= usable:
            used += rest[0].total
            runs[d].append(rest.pop(0))
    return runs, rest


def device_map(runs: list[list[Unit]], offloaded: list[Unit]) -> dict[str, Any]:
    """transformers' device_map: module name -> GPU index (or "cpu")."""
    result: dict[str, Any] = {}
    for d, run in enumerate(runs):
        result.update({m: d for u in run for m in u.modules})
    result.update({m: "cpu" for u in offloaded for m in u.modules})
    return result
