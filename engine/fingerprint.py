"""Short fingerprints of the tensors a compression run computes, so two runs can be compared.

Each compressed Linear's report entry (metrics.json, stages.<stage>.layers) carries the
fingerprint of the Hessian it was solved with and of the weights it ended with, so two runs of
one recipe (two machines) are compared without their models: the first Linear whose weights
differ is where the results parted, and its Hessian says whether the data reaching it had
already parted (the forwards before it) or the solve did. `shrink report` names it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

DIGITS = 12  # hex digits kept: 48 bits, enough to tell a few thousand tensors apart


def fingerprint(t: torch.Tensor) -> str:
    """Hex digest of the tensor's dtype, shape and bytes (bitwise: -0.0 != 0.0)."""
    data = t.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=DIGITS // 2)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_divergence(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The first compressed Linear (report entries in run order) whose weights differ between two
    runs, and whether the Hessian it was solved with differed too (then the data reaching it
    already differed: the forwards of the layers before it, or the data itself; else the solve
    did). None when every Linear both runs hold agrees. Hessians alone may differ in their last
    bits (a float64 calibration on another machine) without any weight changing."""
    theirs = {e.get("full_name"): e.get("fingerprint") for e in b}
    for entry in a:
        mine, other = entry.get("fingerprint"), theirs.get(entry.get("full_name"))
        if mine and other and mine.get("weights") != other.get("weights"):
            return {"full_name": entry["full_name"], "layer": entry.get("layer"),
                    "hessian_differs": mine.get("hessian") != other.get("hessian")}
    return None
