"""Schema of the `quant` config group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class QuantConfig:
    method: str = "gptq"  # gptq | rtn
    bits: int = 4  # 2 | 3 | 4 | 8
    group_size: int = 128  # -1 = one grid per output channel
    sym: bool = False
    act_order: bool = False  # GPTQ desc_act: columns by descending diag(H)
    static_groups: bool = False  # with act_order: groups fitted before permuting
    true_sequential: bool = True  # quantize attention before MLP inside a layer
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # lazy-update block of the column sweep
    # Keep calibration activations on the CPU: true | false | null (auto: when they would
    # take more than half of the free device memory).
    offload_activations: Optional[bool] = None
