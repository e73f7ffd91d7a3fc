"""Resume inside a stage: a checkpoint after every finished decoder layer.

compress_model asks a LayerCheckpoint where to start (`restore`, before the first layer)
and hands it every finished layer (`save`). Each layer's checkpoint is one folder
`layer-<i>` under the checkpoint's folder, filled in a temp sibling, flushed to the disk
(fsync) and published by a rename, so a kill or a power loss at any moment leaves either
the whole folder or a temp folder that `restore` removes:
  state.safetensors   the layer's parameters and buffers after compression
  extras.safetensors  what the stage keeps on the side per Linear (the packed GPTQ tensors)
  hidden.safetensors  the next layer's inputs, exactly as calibration feeds them; only the
                      newest layer keeps them (the older copy goes once the newer is in place)
  entries.json        the layer's report entries and profile, so the stage's metrics are whole
`manifest.json` holds the fingerprint (the caller's digest of settings, input files and
stage): a checkpoint made by other settings or inputs is refused, never mixed in.
Feeding the restored hidden states to the next layer makes the resumed run compute exactly
what the uninterrupted one computed, so its output is the same bytes.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.errors import ShrinkError
from engine.files import atomic_folder, atomic_write_json, fsync_dir, fsync_tree, remove_stale_temps
from engine.weights import unique_tensors

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE, EXTRAS, HIDDEN, ENTRIES = "state.safetensors", "extras.safetensors", "hidden.safetensors", "entries.json"
SEP = "::"  # between a Linear's full name and its tensor's name in extras.safetensors


@dataclass
class Resumed:
    """Where a stage goes on: layers before `start` are restored in place."""
    start: int  # the first layer still to compress
    hidden: Optional[list[torch.Tensor]]  # its inputs (None for a stage without calibration data)
    report: list[dict[str, Any]]  # the finished layers' report entries, in order
    profile: list[dict[str, Any]]  # and their profiles


class LayerCheckpoint:
    """The per-layer checkpoints of one stage, in `folder`, made under `fingerprint`."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.extras: dict[str, dict[str, torch.Tensor]] = {}
        self.seconds = 0.0  # spent writing checkpoints (the overhead of being resumable)

    def track(self, extras: dict[str, dict[str, torch.Tensor]]) -> None:
        """The stage's side tensors per Linear full name (filled by its compressor): each layer's
        are saved with it, and restored into this very dict."""
        self.extras = extras

    def restore(self, layers: Sequence[nn.Module]) -> Optional[Resumed]:
        """Load the finished layers' states into `layers` (and their extras); None when there
        is nothing to resume. ShrinkError if the checkpoint was made under another fingerprint."""
        if not self.folder.is_dir():
            return None
        for path in remove_stale_temps(self.folder):
            log.info("removed %s (a layer checkpoint cut off by the interruption)", path)
        if not self._check_manifest(len(layers)):
            return None
        done = self._finished(len(layers))
        if not done:
            return None
        report: list[dict[str, Any]] = []
        profile: list[dict[str, Any]] = []
        for i in range(done):
            entries = self._load_layer(i, layers[i])
            report += entries["report"]
            profile.append(entries["profile"])
        hidden_file = self._layer(done - 1) / HIDDEN
        hidden = None
        if hidden_file.is_file():
            tensors = load_tensors(hidden_file)
            hidden = [tensors[str(j)] for j in range(len(tensors))]
        elif entries["hidden"]:
            raise ShrinkError(f"resume: {hidden_file} is missing; delete {self.folder} to redo the stage")
        log.info("resuming at layer %d/%d from %s", done + 1, len(layers), self.folder)
        return Resumed(done, hidden, report, profile)

    def save(self, index: int, layer: nn.Module, hidden: Optional[list[torch.Tensor]],
             report: list[dict[str, Any]], profile: dict[str, Any]) -> None:
        """Checkpoint finished layer `index`: its state, its Linears' extras, the next layer's
        inputs and its report entries; durable once this returns."""
        start = time.perf_counter()
        if index == 0 or not (self.folder / MANIFEST).is_file():
            atomic_write_json(self.folder / MANIFEST, {"fingerprint": self.fingerprint})
            fsync_tree(self.folder)
        with atomic_folder(self._layer(index), replace=True) as tmp:
            save_tensors(layer.state_dict(), tmp / STATE)
            save_tensors({f"{e['full_name']}{SEP}{k}": v for e in report
                          for k, v in self.extras.get(e["full_name"], {}).items()}, tmp / EXTRAS)
            if hidden is not None:
                save_tensors({str(j): h for j, h in enumerate(hidden)}, tmp / HIDDEN)
            (tmp / ENTRIES).write_text(json.dumps({"report": report, "profile": profile,
                                                   "hidden": hidden is not None}))
            fsync_tree(tmp)
        fsync_dir(self.folder)
        if index:  # only the newest layer's outputs are needed to go on
            (self._layer(index - 1) / HIDDEN).unlink(missing_ok=True)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        log.info("layer checkpoint %d written in %.2fs (%.1f MiB)", index + 1, elapsed,
                 sum(p.stat().st_size for p in self._layer(index).iterdir()) / 2**20)

    def remove(self) -> None:
        """The stage is done (and its result saved): its layer checkpoints go."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _layer(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}"

    def _check_manifest(self, num_layers: int) -> bool:
        path = self.folder / MANIFEST
        if not path.is_file():  # nothing was saved yet (the manifest comes before layer 0)
            return False
        if json.loads(path.read_text()).get("fingerprint") != self.fingerprint:
            raise ShrinkError(f"resume: the layer checkpoints in {self.folder} were made with other settings or "
                              f"input files; cannot resume from them")
        if self._layer(num_layers).exists():
            raise ShrinkError(f"resume: {self.folder} holds more layers than the model's {num_layers}")
        return True

    def _finished(self, num_layers: int) -> int:
        """How many layers from the first are checkpointed (published folders only)."""
        done = 0
        while done < num_layers and (self._layer(done) / ENTRIES).is_file():
            done += 1
        return done

    def _load_layer(self, index: int, layer: nn.Module) -> dict[str, Any]:
        folder = self._layer(index)
        layer.load_state_dict(load_tensors(folder / STATE), strict=True)
        entries = json.loads((folder / ENTRIES).read_text())
        tensors = load_tensors(folder / EXTRAS)
        for entry in entries["report"]:  # in report order, as the compressor filled the dict
            name = entry["full_name"]
            found = {k.split(SEP, 1)[1]: v for k, v in tensors.items() if k.split(SEP, 1)[0] == name}
            if found:
                self.extras[name] = found
        return entries


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors of CPU copies; a tensor under several names (the experts of a block share
    one g_idx) is written once and its other names recorded, so loading shares it again."""
    unique, aliases = unique_tensors({k: v.detach() for k, v in tensors.items()})
    save_file({k: v.cpu().contiguous() for k, v in unique.items()}, path, metadata={"aliases": json.dumps(aliases)})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    tensors.update({name: tensors[first] for name, first in aliases.items()})
    return tensors
