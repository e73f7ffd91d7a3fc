"""Which decoder-layer weights a stage reaches: skip patterns, coverage, the min_coverage check.

Coverage counts every weight matrix of the decoder layers (parameters with 2+ dims, a
packed Linear by its unpacked size), so a weight the engine cannot reach (an unknown
3-D tensor, a custom projection) lowers it instead of being left out silently.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable, Sequence

from torch import nn

from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, find_linears, is_packed_linear


def is_skipped(name: str, patterns: Sequence[str]) -> bool:
    """name (inside a decoder layer) matches a pattern, in full or by its last part."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatchcase(name, p) or fnmatchcase(last, p) for p in patterns)


def layer_matrices(model: nn.Module) -> dict[str, int]:
    """Full module name -> number of weight-matrix entries it holds, over all decoder layers."""
    parent, layers = find_decoder_layers(model)
    sizes: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            full = f"{parent}.{i}.{name}" if name else f"{parent}.{i}"
            n = module.in_features * module.out_features if is_packed_linear(module) else 0
            n += sum(p.numel() for p in module.parameters(recurse=False) if p.ndim >= 2)
            if n:
                sizes[full] = n
    return sizes


def coverage(model: nn.Module, compressed: Iterable[str]) -> dict[str, Any]:
    """{"fraction": share of decoder-layer weights in `compressed` modules, "not_compressed": names}."""
    sizes = layer_matrices(model)
    done = set(compressed)
    total = sum(sizes.values())
    covered = sum(n for name, n in sizes.items() if name in done)
    return {"fraction": covered / total if total else 1.0,
            "not_compressed": sorted(name for name in sizes if name not in done)}


def check_coverage(report: dict[str, Any], min_coverage: float, what: str) -> None:
    """One-line ShrinkError when a stage would reach less than min_coverage of the weights."""
    if report["fraction"] >= min_coverage:
        return
    missing = report["not_compressed"]
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    raise ShrinkError(f"min_coverage: {what} would reach only {report['fraction']:.1%} of the decoder-layer weights "
                      f"(under {min_coverage:.0%}); not handled: {shown} (lower min_coverage or quant/prune.skip "
                      f"to go on)")


def compression_targets(model: nn.Module, skip: Sequence[str], min_coverage: float,
                        what: str) -> tuple[str, list[dict[str, nn.Module]]]:
    """(the decoder stack's name, per layer the Linears a stage compresses: those not matching
    `skip`), refused in one line when they hold under min_coverage of the decoder-layer weights."""
    parent, layers = find_decoder_layers(model)
    targets = [{n: m for n, m in find_linears(layer).items() if not is_skipped(n, skip)} for layer in layers]
    check_coverage(coverage(model, [f"{parent}.{i}.{n}" for i, t in enumerate(targets) for n in t]), min_coverage, what)
    return parent, targets
