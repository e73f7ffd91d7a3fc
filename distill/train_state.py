"""Training checkpoints: student, optimizer, RNG and step, so a killed run resumes exactly.

Tensors go to safetensors and everything else to JSON; nothing is pickled. The state
dicts are the unsharded ("full") ones of torch.distributed.checkpoint.state_dict, keyed
by parameter name, so one format serves a single process and an FSDP2 run alike (rank 0
writes; every rank reads). The folder is replaced atomically: a kill while saving leaves
the previous checkpoint intact.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill.distributed import DistContext, full_state
from engine.errors import ShrinkError
from engine.files import atomic_folder
from engine.weights import unique_tensors

SEP = "::"  # between a parameter name and its optimizer-state key


def save_train_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                     ctx: DistContext) -> None:
    """Collective: every rank calls it; rank 0 writes `folder`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_state(model, ctx)
    optim_state = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.main:
        return
    # tied weights once (safetensors refuses shared storage); the aliases map the rest back
    unique, aliases = unique_tensors(model_state)
    tensors = {name: tensor.contiguous() for name, tensor in unique.items()}
    optim_tensors, optim_scalars = {}, {}
    for param, entries in optim_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                optim_tensors[f"{param}{SEP}{key}"] = value.detach().cpu().contiguous()
            else:
                optim_scalars[f"{param}{SEP}{key}"] = value
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {**meta, "aliases": aliases, "optimizer_scalars": optim_scalars,
            "param_groups": optim_state["param_groups"]}
    # The old checkpoint waits at `previous` during the swap: after a kill there it is the
    # only complete one (load falls back to it), so it is removed only once folder is whole.
    with atomic_folder(folder, replace=True, backup=previous(folder)) as tmp:
        save_file(tensors, tmp / "model.safetensors")
        save_file(optim_tensors, tmp / "optimizer.safetensors")
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(previous(folder), ignore_errors=True)


def previous(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def latest_checkpoint(folder: Path) -> Optional[Path]:
    """The complete checkpoint: `folder`, or the previous one if a kill hit the swap."""
    for candidate in (folder, previous(folder)):
        if (candidate / "trainer.json").is_file():
            return candidate
    return None


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "trainer.json").read_text())


def load_train_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `folder` on every rank; returns the JSON meta."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    meta = read_meta(folder)
    state = load_file(folder / "model.safetensors")
    for alias, name in meta["aliases"].items():
        state[alias] = state[name]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    entries: dict[str, dict[str, Any]] = {}
    for key, value in {**load_file(folder / "optimizer.safetensors"), **meta["optimizer_scalars"]}.items():
        param, _, name = key.partition(SEP)
        entries.setdefault(param, {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    # Parameters frozen so far (progressive schedule) have no optimizer state yet. The loader
    # would initialize one (a zero step), which the uninterrupted run never does: drop it.
    set_optimizer_state_dict(model, optimizer, {"state": entries, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    for name, param in model.named_parameters():
        if name not in entries:
            optimizer.state.pop(param, None)
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return meta


def check_resumable(folder: Path, settings_digest: str) -> None:
    recorded = read_meta(folder).get("settings")
    if recorded != settings_digest:
        raise ShrinkError(f"resume: the training checkpoint in {folder} was made with other distill settings; "
                          "remove it or use the same settings")
