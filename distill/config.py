"""Schema of the `distill` config group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StudentConfig:
    init: str = "pretrained"  # skip | width | pretrained | scratch
    path: Optional[str] = None  # for init=pretrained
    num_layers: Optional[int] = None  # for skip / width / scratch
    hidden_size: Optional[int] = None  # for width / scratch
    layers: Optional[list[int]] = None  # explicit teacher layers to keep (skip)


@dataclass
class DistillConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: str = "akt"  # akt | logits | lm
    layer_map: str = "uniform"  # uniform | last | explicit list "0:1,1:3,..."
    steps: int = 200
