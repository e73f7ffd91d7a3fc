"""Schema of the `prune` config group."""
from __future__ import annotations

from dataclasses import dataclass, field


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
