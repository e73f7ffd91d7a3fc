"""Stage checkpoints and `progress.json`, so that `resume=true` skips finished stages.

After every stage the run folder's progress.json records what is done (stage reports,
seconds, metrics so far) together with the config digest; after a stage that changed
the model, the model is saved to `checkpoints/<i>-<stage>/` first. A resumed run with
the same settings loads the last checkpoint and goes on with the next stage; a failed
stage therefore never costs the stages before it. Checkpoints are deleted once the
whole pipeline has finished.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from engine.errors import ShrinkError
from shrink.model_folder import save_model_folder

PROGRESS = "progress.json"


def read_progress(out: Path, digest: str, resume: bool) -> Optional[dict[str, Any]]:
    """The progress of an earlier run in `out`, or None for a fresh run."""
    path = out / PROGRESS
    if not path.is_file():
        return None
    progress = json.loads(path.read_text())
    if not resume:
        if progress.get("finished"):
            raise ShrinkError(f"out: {out} already holds a finished run; choose another out")
        raise ShrinkError(f"out: {out} holds an unfinished run; pass resume=true to go on, or choose another out")
    if progress.get("config_sha256") != digest:
        raise ShrinkError(f"resume: the settings differ from those of the run in {out}; cannot resume it")
    return progress


def write_progress(out: Path, progress: dict[str, Any]) -> None:
    tmp = out / f".{PROGRESS}.tmp"
    tmp.write_text(json.dumps(progress, indent=2, sort_keys=True))
    tmp.replace(out / PROGRESS)


def save_checkpoint(state: Any, index: int, stage: str) -> Path:
    """Save the model after stage `index` (GPTQ layout if quantized), atomically."""
    root = state.out / "checkpoints"
    root.mkdir(exist_ok=True)
    target = root / f"{index}-{stage}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{index}-{stage}.", dir=root))
    try:
        save_model_folder(state.model, state.tokenizer, tmp, state.quantization_config)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_checkpoints(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
