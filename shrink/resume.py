"""The run folder `out`: who may write into it, stage checkpoints and `progress.json`.

After every stage the run folder's progress.json records what is done (stage reports,
seconds, metrics so far) together with the config digest; after a stage that changed
the model, the model is saved to `checkpoints/<i>-<stage>/` first (paths in progress.json
are relative to out, so a run folder can be moved). A resumed run with the same settings
loads the last checkpoint and goes on with the next stage; a failed or killed stage
therefore never costs the stages before it. Inside a stage that compresses layer by
layer (quantize, prune), every finished decoder layer is checkpointed too
(`checkpoints/<i>-<stage>.layers/`, engine/layer_checkpoint.py), so a run killed mid-stage
goes on from its last finished layer and ends with the same bytes; those go once the stage
is done. progress.json also records a digest of the input files: a resume with other
settings or other input files is refused. Checkpoints are deleted once the whole
pipeline has finished. An `out` holding anything else (another recipe's run, a finished
run, any other files) is refused before anything is loaded or written.

`RunFolder` is every run's hold on `out`: a lock that a second run on the same `out` finds
taken (refused in one line), and on a failure before anything resumable exists (no stage
finished, no layer or training checkpoint) `out` is put back as it was, so the corrected
command runs in the same `out`. Operating-system errors (disk full, a name too long, ...)
become the one-line error there too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from engine.errors import ShrinkError, io_error_line
from engine.files import LOCK_NAME, FolderBusy, FolderLock, atomic_folder, atomic_write_json, remove_stale_temps
from engine.layer_checkpoint import LayerCheckpoint
from quant.export import export_float_dtype
from shrink.model_folder import save_model_folder

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
# What Hydra itself puts into its run folder, which is `out` when out= is not given.
HYDRA_ENTRIES = (".hydra",)
# What a failed point of a `-m` sweep leaves in its folder (shrink/cli.py), for `shrink report`.
FAILED = "failed.json"
# Entries of `out` that are not a run's results: Hydra's, the lock of the run writing it, and an
# earlier failure's record (removed when a run starts there).
NOT_RESULTS = (*HYDRA_ENTRIES, LOCK_NAME, FAILED)


def read_progress(out: Path, digest: str, resume: bool) -> Optional[dict[str, Any]]:
    """The progress of this recipe's unfinished run in `out` (resume=true), or None for a
    fresh run in an empty or new `out`; anything else is refused (ShrinkError)."""
    check_writable(out)
    path = out / PROGRESS
    if not path.is_file():
        others = sorted(p.name for p in out.iterdir() if p.name not in NOT_RESULTS
                        and not p.name.endswith(".log")) if out.is_dir() else []
        if others:
            raise ShrinkError(f"out: {out} is not empty and holds no shrink run (found {others[0]}); "
                              f"choose a new or empty out")
        return None
    try:
        progress = json.loads(path.read_text())
    except ValueError:
        raise ShrinkError(f"out: {path} is damaged (not JSON); choose another out") from None
    if progress.get("finished"):
        hint = "; there is nothing to resume" if resume else ""
        raise ShrinkError(f"out: {out} already holds a finished run{hint}; choose another out")
    if not resume:
        raise ShrinkError(f"out: {out} holds an unfinished run; pass resume=true to go on, or choose another out")
    if progress.get("config_sha256") != digest:
        raise ShrinkError(f"resume: the settings differ from those of the run in {out}; cannot resume it")
    clean_interrupted(out, progress)
    return progress


def check_writable(out: Path) -> None:
    """out (or the folder it will be made in) must be a writable folder."""
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"out: {out} is a file, not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ShrinkError(f"out: {existing} is not writable")


def clean_interrupted(out: Path, progress: dict[str, Any]) -> None:
    """What a killed run left half-done: temp files and folders, and a model/ renamed into
    place just before the kill but not yet recorded (export runs again and rewrites it)."""
    for folder in (out, out / "checkpoints"):
        for path in remove_stale_temps(folder):
            log.info("removed %s (left by an interrupted run)", path)
    if (out / "model").exists() and not any(step.endswith("-export") for step in progress["done"]):
        shutil.rmtree(out / "model")


def write_progress(out: Path, progress: dict[str, Any]) -> None:
    atomic_write_json(out / PROGRESS, progress)


def save_checkpoint(state: Any, index: int, stage: str) -> str:
    """Save the model after stage `index` (GPTQ layout if quantized), atomically; returns
    its path relative to out, as progress.json records it."""
    relative = f"checkpoints/{index}-{stage}"
    with atomic_folder(state.out / relative, replace=True) as tmp:
        save_model_folder(state.model, state.tokenizer, tmp, state.quantization_config,
                          export_float_dtype(state.cfg.quant))
    return relative


def remove_checkpoints(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def inputs_digest(fingerprints: dict[str, Any]) -> str:
    """One hash of input_fingerprints(cfg): the input model's and data files' sha256."""
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()


def check_same_inputs(out: Path, progress: dict[str, Any], digest: str) -> None:
    """A resumed run must read the very input files the killed one read (recorded in
    progress.json by runs that know to; older runs are not checked)."""
    recorded = progress.setdefault("inputs_sha256", digest)
    if recorded != digest:
        raise ShrinkError(f"resume: the input model or data files differ from those of the run in {out} "
                          f"(sha256 changed); cannot resume it")


def layer_checkpoint(out: Path, step: str, progress: dict[str, Any]) -> LayerCheckpoint:
    """Where stage `step` (e.g. "2-quantize") checkpoints its finished layers, fingerprinted
    by the run's settings, its input files and the stage."""
    key = {k: progress.get(k) for k in ("config_sha256", "inputs_sha256", "checkpoint")}
    fingerprint = hashlib.sha256(json.dumps({**key, "step": step}, sort_keys=True).encode()).hexdigest()
    return LayerCheckpoint(out / "checkpoints" / f"{step}.layers", fingerprint)


class RunFolder:
    """A run's hold on `out` (module docstring): `with RunFolder(out):` around the whole run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.lock = FolderLock(out)
        self.made: Optional[Path] = None  # the outermost folder this run created (None: out existed)
        self.before: set[str] = set()  # out's entries before the run
        self.fresh = True  # out held no run before (nothing to keep but what this run makes)

    def __enter__(self) -> "RunFolder":
        try:
            check_writable(self.out)
            missing = [p for p in [self.out, *self.out.absolute().parents] if not p.exists()]
            self.made = missing[-1] if missing else None
            self.before = set(os.listdir(self.out)) if self.out.is_dir() else set()
            self.fresh = PROGRESS not in self.before
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            (self.out / FAILED).unlink(missing_ok=True)  # this run replaces the failed one
        except FolderBusy as exc:  # out is the other run's: nothing of it is ours to put back
            raise ShrinkError(f"out: {exc}; a second run must not write the same out (wait for it, "
                              f"or choose another out)") from None
        except OSError as exc:
            self._restore()
            raise ShrinkError(f"out: cannot create {self.out}: {exc.strerror or io_error_line(exc)}") from None
        return self

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> bool:
        kept = exc is not None and not (self.fresh and not resumable(self.out))
        if exc is not None and not kept:
            self._restore()
        self.lock.release()
        line = io_error_line(exc) if exc is not None and not isinstance(exc, ShrinkError) else None
        if line is not None:  # named by its file; a library that names none was writing the run's files
            where = "" if getattr(exc, "filename", None) else f"out: {self.out}: "
            hint = f"; {self.out} keeps the finished work (rerun with resume=true)" if kept else ""
            raise ShrinkError(f"{where}{line}{hint}") from None
        return False

    def _restore(self) -> None:
        """Put out back as it was: remove what this run added (all of out if it made it, and the
        folders it made above out that nothing else has entered since)."""
        try:
            if self.made is not None:
                shutil.rmtree(self.out, ignore_errors=True)
                # the folders made above out, while empty: a run started beside this one keeps its own
                for parent in self.out.absolute().parents:
                    if not parent.is_relative_to(self.made.absolute()) or any(parent.iterdir()):
                        break
                    parent.rmdir()
            elif self.out.is_dir():
                for name in set(os.listdir(self.out)) - self.before - {LOCK_NAME}:
                    path = self.out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        except OSError:  # out cannot even be looked at (a name too long): nothing of ours is there
            pass


def resumable(out: Path) -> bool:
    """Whether out holds work a resume would not redo: a finished stage (the baseline evaluation
    aside), a finished layer of a stage, or a training checkpoint."""
    try:
        progress = json.loads((out / PROGRESS).read_text())
    except (OSError, ValueError):
        progress = {}
    done = progress.get("done", []) if isinstance(progress, dict) else []
    if any(step != "baseline" for step in done):
        return True
    checkpoints = out / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith("layer-") or p.name == "trainer.json"
                                        for p in checkpoints.rglob("*"))
