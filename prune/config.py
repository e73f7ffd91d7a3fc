"""Schema of the `prune` config group."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import FRACTION_BELOW_1, OPEN_FRACTION, POSITIVE, ROUTER_PATTERNS, Range, check_ranges
from engine.errors import ShrinkError


@dataclass
class PruneConfig:
    method: str = "sparsegpt"  # sparsegpt | wanda | magnitude
    sparsity: float = 0.5  # fraction of zeros (ignored for N:M patterns: N/M)
    pattern: str = "unstructured"  # unstructured | N:M, e.g. 2:4, 4:8
    # Per-layer overrides, decoder layer index -> sparsity (e.g. {0: 0.3}).
    layer_sparsity: dict[int, float] = field(default_factory=dict)
    joint_quant: bool = False  # prune_quantize: one OBS sweep that prunes and quantizes
    damp: float = 0.01
    block_size: int = 128
    # After the mask is chosen (by any method), re-solve each row's kept weights for the least
    # output error on the calibration data (prune/reconstruct.py): SparseGPT's sweep only
    # moves error to later columns, so its update is not optimal for its own mask.
    reconstruct: bool = False
    # The SparseGPT and Wanda reference code prune every Linear of a layer from one pass.
    true_sequential: bool = False
    # Decoder-layer modules left dense (fnmatch on the name inside the layer or its last part);
    # MoE routers by default.
    skip: list[str] = field(default_factory=lambda: list(ROUTER_PATTERNS))


METHODS = ("sparsegpt", "wanda", "magnitude")
RANGES: dict[str, Range] = {"sparsity": FRACTION_BELOW_1, "damp": OPEN_FRACTION, "block_size": POSITIVE}


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"unstructured" -> (0, 0); "N:M" -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return 0, 0
    n_str, sep, m_str = str(pattern).partition(":")
    if not sep or not n_str.isdigit() or not m_str.isdigit():
        raise ShrinkError(f"prune.pattern: {pattern!r} is not 'unstructured' or 'N:M' (e.g. 2:4)")
    n, m = int(n_str), int(m_str)
    if not 0 < n < m:
        raise ShrinkError(f"prune.pattern: {pattern!r} needs 0 < N < M")
    return n, m


def check_pattern_fits(name: str, columns: int, pattern: str) -> None:
    """An N:M pattern's M divides the Linear's input columns (its runs of M cover the row)."""
    n, m = parse_pattern(pattern)
    if m and columns % m:
        raise ShrinkError(f"{name}: prune.pattern {n}:{m}: M={m} does not divide {columns} input columns")


def check_prune_config(prune: PruneConfig) -> tuple[int, int]:
    if prune.method not in METHODS:
        raise ShrinkError(f"prune.method: unknown method {prune.method!r} (sparsegpt | wanda | magnitude)")
    check_ranges(prune, "prune", RANGES)
    for layer, sparsity in prune.layer_sparsity.items():
        if not FRACTION_BELOW_1.holds(sparsity):
            raise ShrinkError(f"prune.layer_sparsity.{layer}: {sparsity} must be {FRACTION_BELOW_1}")
    n, m = parse_pattern(prune.pattern)
    # an N:M pattern prunes exactly N of every M: a sparsity of another value would be recorded
    # in recipe.yaml and the model card but not applied
    if m and abs(prune.sparsity - n / m) > 1e-9:
        raise ShrinkError(f"prune.sparsity: {prune.sparsity} but prune.pattern={prune.pattern} prunes exactly "
                          f"{n / m:g}; set prune.sparsity={n / m:g} (or prune.pattern=unstructured)")
    if m and prune.layer_sparsity:
        raise ShrinkError(f"prune.layer_sparsity: not with prune.pattern={prune.pattern} (every layer prunes {n} of {m})")
    if prune.joint_quant and prune.method != "sparsegpt":
        raise ShrinkError("prune.joint_quant: only SparseGPT prunes and quantizes in one sweep")
    if prune.joint_quant and prune.reconstruct:
        raise ShrinkError("prune.reconstruct: not with prune.joint_quant (it would move weights off the grid); "
                          "use pipeline=prune_quantize to reconstruct, then quantize")
    return n, m
