"""Schema of the `quant` config group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.config import ROUTER_PATTERNS
from engine.errors import ShrinkError
from quant.grid import SUPPORTED_BITS


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
    # Decoder-layer modules kept in full precision (fnmatch on the name inside the layer or its
    # last part); MoE routers by default.
    skip: list[str] = field(default_factory=lambda: list(ROUTER_PATTERNS))


METHODS = ("gptq", "rtn")


def check_quant_config(q: QuantConfig) -> None:
    if q.method not in METHODS:
        raise ShrinkError(f"quant.method: unknown method {q.method!r} (gptq | rtn)")
    if q.bits not in SUPPORTED_BITS:
        raise ShrinkError(f"quant.bits: {q.bits} is not supported ({' | '.join(map(str, SUPPORTED_BITS))})")
    if q.group_size != -1 and q.group_size <= 0:
        raise ShrinkError(f"quant.group_size: {q.group_size} must be -1 (per channel) or positive")
    if q.static_groups and q.group_size == -1:
        raise ShrinkError("quant.static_groups: needs a group size (quant.group_size > 0)")
    if not 0 <= q.damp < 1:
        raise ShrinkError(f"quant.damp: {q.damp} must be in [0, 1)")
