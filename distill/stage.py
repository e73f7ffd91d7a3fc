"""The `distill` pipeline stage (AKT); being written."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shrink.errors import ShrinkError

if TYPE_CHECKING:
    from shrink.pipeline import RunState


def distill_stage(state: "RunState") -> dict[str, Any]:
    raise ShrinkError("pipeline: the distill stage is not available in this version")
