"""`shrink publish DIR --repo-id ORG/NAME`: check an exported folder, then push it to the Hub.

The folder must be a complete Hugging Face model repo: config.json that transformers
loads, safetensors weights (an index that names exactly the tensors its shards hold),
a tokenizer, generation_config.json when present, a README.md card whose YAML front
matter has base_model, license and tags, and for GPTQ a quantization_config in
config.json that agrees with quantize_config.json and with the packed tensors.
Everything is checked before the first network call, so a broken folder uploads nothing;
`--dry-run` prints the check per file and never touches the network.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.errors import ShrinkError
from engine.modeling import TOKENIZER_VOCABS

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
QUANT_CONFIG = "quantize_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CARD_KEYS = ("base_model", "license", "tags")
GPTQ_KEYS = ("bits", "group_size", "sym", "desc_act")
AWQ_KEYS = ("bits", "group_size", "zero_point", "version")  # the AWQ layout shrink writes (quant/layout.py)


@dataclass
class FolderCheck:
    """Per-file problems (file name -> messages) plus required files that are absent."""
    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    problems: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, name: str, message: str) -> None:
        self.problems.setdefault(name, []).append(message)

    def require(self, name: str, why: str) -> bool:
        if name in self.files:
            return True
        self.fail(name, f"missing ({why})")
        return False

    def read_json(self, name: str) -> Optional[dict[str, Any]]:
        try:
            value = json.loads((self.folder / name).read_text())
        except (OSError, ValueError) as exc:
            self.fail(name, f"not valid JSON ({str(exc).splitlines()[0]})")
            return None
        if not isinstance(value, dict):
            self.fail(name, "not a JSON object")
            return None
        return value

    def messages(self) -> list[str]:
        return [f"{name}: {msg}" for name, msgs in self.problems.items() for msg in msgs]


def list_files(folder: Path) -> dict[str, int]:
    """Files that would be uploaded: everything but hidden files and folders (.git, .cache)."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


# ---------------------------------------------------------------------------- checks
def check_model_config(check: FolderCheck) -> Optional[dict[str, Any]]:
    if not check.require("config.json", "the model config"):
        return None
    config = check.read_json("config.json")
    if config is None:
        return None
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(check.folder)
    except Exception as exc:  # any reason transformers refuses it is the user's problem to see
        check.fail("config.json", f"transformers cannot load it ({str(exc).splitlines()[0]})")
    return config


def safetensors_names(check: FolderCheck, name: str) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(check.folder / name), framework="pt") as f:
            return set(f.keys())
    except Exception as exc:  # a truncated or foreign file: say which one
        check.fail(name, f"not a readable safetensors file ({str(exc).splitlines()[0]})")
        return set()


def check_weights(check: FolderCheck) -> set[str]:
    """Tensor names across the weights; an index must map exactly what each shard holds."""
    for name in check.files:
        if name.endswith(PICKLE_SUFFIXES):
            check.fail(name, "pickle weights are not published (safetensors only); remove it")
    shards = [n for n in check.files if n.endswith(".safetensors")]
    if INDEX not in check.files:
        if len(shards) > 1:
            check.fail(INDEX, f"missing ({len(shards)} safetensors shards need an index)")
        elif check.require(shards[0] if shards else "model.safetensors", "no safetensors weights"):
            return safetensors_names(check, shards[0])
        return set()
    index = check.read_json(INDEX)
    weight_map = (index or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        if index is not None:
            check.fail(INDEX, "has no weight_map")
        return set()
    names: set[str] = set()
    for shard in sorted(set(weight_map.values())):
        if not check.require(shard, f"listed in {INDEX}"):
            continue
        held = safetensors_names(check, shard)
        mapped = {k for k, v in weight_map.items() if v == shard}
        if held != mapped:
            extra, absent = sorted(held - mapped), sorted(mapped - held)
            parts = [f"{label} {names_[:3]}{' ...' if len(names_) > 3 else ''}"
                     for label, names_ in (("not in the index:", extra), ("missing from the shard:", absent)) if names_]
            check.fail(shard, f"tensors differ from {INDEX}: " + "; ".join(parts))
        names |= held
    for shard in set(shards) - set(weight_map.values()):
        check.fail(shard, f"not listed in {INDEX}")
    return names


def check_tokenizer(check: FolderCheck) -> None:
    if not check.require("tokenizer_config.json", "the tokenizer"):
        return
    if not any(v in check.files for v in TOKENIZER_VOCABS):
        check.fail("tokenizer.json", f"missing (no vocabulary file: one of {', '.join(TOKENIZER_VOCABS)})")
        return
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(check.folder)
    except Exception as exc:  # what a user of the repo would hit first
        check.fail("tokenizer_config.json", f"transformers cannot load the tokenizer ({str(exc).splitlines()[0]})")


def check_card(check: FolderCheck) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from shrink.card import read_front_matter

    if not check.require("README.md", "the model card"):
        return
    meta = read_front_matter((check.folder / "README.md").read_text(errors="replace"))
    if not meta:
        check.fail("README.md", "no YAML front matter (--- ... --- at the top)")
        return
    for key in CARD_KEYS:
        if not meta.get(key):
            check.fail("README.md", f"front matter has no {key}")
    if meta.get("tags") and not isinstance(meta["tags"], list):
        check.fail("README.md", "front matter tags must be a list")
    bases = meta.get("base_model") or []
    for base in bases if isinstance(bases, list) else [bases]:
        try:
            validate_repo_id(str(base))
        except HFValidationError:
            check.fail("README.md", f"base_model {base!r} is not a Hub model id")


def check_generation_config(check: FolderCheck) -> None:
    if "generation_config.json" not in check.files:
        return
    raw = check.read_json("generation_config.json")
    if raw is None:
        return
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_dict(raw)
    except Exception as exc:  # invalid values are reported by transformers' own validation
        check.fail("generation_config.json", f"transformers refuses it ({str(exc).splitlines()[0]})")


def check_quantized(check: FolderCheck, config: Optional[dict[str, Any]], names: set[str]) -> None:
    qcfg = (config or {}).get("quantization_config")
    if qcfg is None:
        if QUANT_CONFIG in check.files:
            check.fail(QUANT_CONFIG, "present but config.json has no quantization_config")
        return
    method = qcfg.get("quant_method")
    if method not in ("gptq", "awq"):
        return  # other quantizers (bitsandbytes, ...) carry their own files; not ours to judge
    if check.require(QUANT_CONFIG, "required by quantization_config in config.json"):
        other = check.read_json(QUANT_CONFIG) or {}
        for key in GPTQ_KEYS if method == "gptq" else AWQ_KEYS:
            if other.get(key) != qcfg.get(key):
                check.fail(QUANT_CONFIG, f"{key}={other.get(key)!r} but config.json quantization_config "
                                         f"has {key}={qcfg.get(key)!r}")
    packed = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
    if names and not packed:
        check.fail("config.json", f"quantization_config says {method} but the weights hold no .qweight tensors")
    for prefix in sorted(packed):
        absent = [s for s in ("qzeros", "scales") if f"{prefix}.{s}" not in names]
        if absent:
            weights = INDEX if INDEX in check.files else "model.safetensors"
            check.fail(weights, f"{prefix}: qweight without {', '.join(absent)}")
            break


def check_loads(check: FolderCheck) -> None:
    """The rules of a run's own input (engine.modeling.check_model_folder, engine.weights.check_load):
    no link out of the folder, whole safetensors, every size in config.json, every tensor present,
    of its shape and kind, finite, and tied embeddings that are one tensor. The folder is loaded
    as shrink loads a model, once the per-file checks found nothing."""
    from engine.config import ModelConfig
    from shrink.model_folder import load_model

    try:
        load_model(ModelConfig(path=str(check.folder)))
    except ShrinkError as exc:
        check.fail("weights", str(exc).removeprefix("model.path: "))


def check_folder(folder: Path) -> FolderCheck:
    if not folder.is_dir():
        raise ShrinkError(f"publish: {folder} is not a folder")
    check = FolderCheck(folder, list_files(folder))
    config = check_model_config(check)
    names = check_weights(check)
    check_tokenizer(check)
    check_card(check)
    check_generation_config(check)
    check_quantized(check, config, names)
    if not check.problems:
        check_loads(check)
    return check


# ---------------------------------------------------------------------------- report + upload
def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_check(check: FolderCheck) -> str:
    width = max([len(n) for n in [*check.files, *check.problems]] + [10])
    lines = []
    for name in sorted(set(check.files) | set(check.problems)):
        size = human(check.files[name]) if name in check.files else "-"
        status = "; ".join(check.problems.get(name, [])) or "ok"
        lines.append(f"  {name:<{width}}  {size:>10}  {status}")
    total = human(sum(check.files.values()))
    return "\n".join([f"{check.folder}: {len(check.files)} files, {total}", *lines])


def publish(folder: Path, repo_id: str, dry_run: bool = False, private: bool = False,
            token: Optional[str] = None) -> Optional[str]:
    """Validate, then create the repo (exist_ok) and upload; returns the commit URL (None if dry run)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ShrinkError(f"--repo-id: {str(exc).splitlines()[0]}") from None
    check = check_folder(folder)
    if dry_run:
        print(format_check(check))
    problems = check.messages()
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ShrinkError(f"publish: {folder}/{problems[0]}{more}")
    if dry_run:
        print(f"dry run: {len(check.files)} files would be uploaded to {repo_id}"
              f"{' (private)' if private else ''}; nothing was sent")
        return None
    return upload(check, repo_id, private, token)


def upload(check: FolderCheck, repo_id: str, private: bool, token: Optional[str]) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # Exactly the files that were checked: hidden folders never leave the machine.
        info = api.upload_folder(repo_id=repo_id, folder_path=str(check.folder), repo_type="model",
                                 allow_patterns=list(check.files), commit_message="Upload model compressed with shrink")
    except Exception as exc:  # network, auth, quota: one line naming the repo
        raise ShrinkError(f"publish: upload to {repo_id} failed: {str(exc).splitlines()[0]}") from None
    url = getattr(info, "commit_url", None) or str(info)
    print(f"uploaded {len(check.files)} files to {repo_id}: {url}")
    return url
