"""The import direction of the house: engine < quant < prune, distill < shrink < benchmarks.

Every import of every module (at any depth: function-level and TYPE_CHECKING imports count
too) is read from the source, so the layering cannot drift unnoticed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = {"engine": 0, "quant": 1, "prune": 2, "distill": 2, "shrink": 3, "benchmarks": 4}
STAGES = {"quant.stage", "prune.stage", "distill.stage"}
# Kernels: pure functions on tensors, in the papers' notation; besides the project's own kernels
# they may import only torch and the standard library.
KERNELS = {"engine.hessian", "engine.obs", "quant.grid", "quant.gptq", "quant.pack", "prune.baselines",
           "prune.sparsegpt", "prune.reconstruct", "distill.losses", "distill.blockwise",
           "distill.chunked"}
THIRD_PARTY_IN_KERNELS = {"torch"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in FLOOR for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to the longest known module
    (`from engine import data` -> engine.data); third-party imports are returned as written."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in known else base, node.lineno))
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def test_every_package_is_on_a_floor() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(FLOOR), f"top-level packages without a floor: {packages ^ set(FLOOR)}"


def test_imports_point_down_only() -> None:
    modules = project_modules()
    bad = []
    for name, path in modules.items():
        here = top(name)
        for target, line in imports_of(name, path, set(modules)):
            there = top(target)
            if there not in FLOOR or there == here:
                continue
            if FLOOR[there] >= FLOOR[here]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({here} is not above {there})")
            elif target in STAGES and FLOOR[here] < FLOOR["shrink"]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the stage {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    modules = project_modules()
    graph = {name: {t for t, _ in imports_of(name, path, set(modules)) if t in modules and t != name}
             for name, path in modules.items()}
    # a package's __init__ is imported by its submodules implicitly; only explicit edges count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_import_only_torch(kernel: str) -> None:
    modules = project_modules()
    path = modules[kernel]
    import sys

    outside = {top(t) for t, _ in imports_of(kernel, path, set(modules))
               if top(t) not in FLOOR and top(t) not in sys.stdlib_module_names and t != "__future__"}
    assert outside <= THIRD_PARTY_IN_KERNELS, f"{kernel} imports {sorted(outside - THIRD_PARTY_IN_KERNELS)}"
