"""The one check of a model folder's weights, shared by every path that loads them.

Before a load, `read_headers` reads each .safetensors header (without the data) and
refuses a file that is not safetensors or is shorter than its header says (truncated).
After a load, `check_load` refuses any tensor the model needed but the files lack,
any the files hold but the model has no place for, any whose shape or kind (float,
integer, bool) disagrees, and any non-finite value: transformers would otherwise fill
the gaps with random values and the run would report numbers of a partly random model.
Every error is one line naming the file and the tensor.

`narrow` is the one cast of floats to a narrower dtype (a load in float16, an export's
float16 tensors, GPTQ's float16 scales): a finite value beyond the new dtype's range would
become inf there, so it is refused naming the tensor, before anything is written. And
`check_tied` holds a folder to its claim of tied embeddings: a file whose lm_head differs
from the embedding it says it is tied to describes two models at once.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from engine.errors import ShrinkError

SAFE_NAME = "model.safetensors"
# The way out of a value model.dtype cannot hold (bfloat16 has float32's range).
MODEL_DTYPE_HINT = "use a wider model.dtype (float32, or bfloat16: float32's range)"
SAFE_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    dtype: str  # safetensors' name, e.g. "F16", "I32"
    shape: tuple[int, ...]


def weight_files(folder: Path, key: str = "model.path") -> list[Path]:
    """The .safetensors files of a folder: those its index lists, else every one there."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ShrinkError(f"{key}: {index} is not a safetensors index ({type(exc).__name__})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ShrinkError(f"{key}: {folder / missing[0]} is listed in {SAFE_INDEX} but does not exist")
        return [folder / n for n in names]
    return sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors"))


def read_header(file: Path, key: str = "model.path") -> dict[str, TensorHeader]:
    """Tensor names, dtypes and shapes of one .safetensors file; refuses a damaged one."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ShrinkError(f"{key}: {file} is not a safetensors file (bad header length; truncated?)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ShrinkError(f"{key}: {file} has an unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ShrinkError(f"{key}: {file} has an unreadable safetensors header (not a JSON object)")
    tensors: dict[str, TensorHeader] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            numel = int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1
            ok = dtype in DTYPE_BYTES and stop - begin == numel * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ShrinkError(f"{key}: {file}: tensor {name!r} has a malformed header entry")
        tensors[name] = TensorHeader(file, dtype, shape)
        end = max(end, stop)
    if 8 + length + end > size:
        raise ShrinkError(f"{key}: {file} is truncated ({size} bytes, its header needs {8 + length + end})")
    return tensors


def read_headers(folder: Path, key: str = "model.path") -> dict[str, TensorHeader]:
    """Every tensor of a model folder by name (the first file holding it)."""
    files = weight_files(folder, key)
    if not files:
        raise ShrinkError(f"{key}: {folder} has no .safetensors weights")
    headers: dict[str, TensorHeader] = {}
    for file in files:
        for name, entry in read_header(file, key).items():
            headers.setdefault(name, entry)
    return headers


def kind(dtype: str | torch.dtype) -> str:
    """float | int | bool, for a safetensors dtype name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"
    return "bool" if dtype == "BOOL" else "float" if dtype.startswith(("F", "BF")) else "int"


def unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the first tensor of each storage view, every later name -> the first name of the same view).

    Tied weights are one tensor under two names; safetensors refuses to write both and a size
    must count it once. A view is its storage, offset, shape and dtype; empty tensors alias nothing.
    """
    first: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = ((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
               if tensor.numel() else None)
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        unique[name] = tensor
    return unique, aliases


def check_load(folder: Path, model: nn.Module, headers: dict[str, TensorHeader], missing: Iterable[str] = (),
               unexpected: Iterable[str] = (), mismatched: Sequence[tuple] = (), check_kinds: bool = True,
               key: str = "model.path") -> None:
    """Refuse a load that left a tensor missing, unexpected, of another shape or kind, or non-finite.

    missing/unexpected/mismatched are the loader's own report (transformers' loading info,
    or load_state_dict's), after its key renames and tied-weight handling.
    """
    where = folder / SAFE_INDEX if (folder / SAFE_INDEX).is_file() else folder
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted(mismatched, key=lambda entry: entry[0])
    if missing:
        raise ShrinkError(f"{key}: {where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all; "
                          f"does config.json match the weights?)")
    if unexpected:
        name = unexpected[0]
        file = headers[name].file if name in headers else where
        raise ShrinkError(f"{key}: {file}: tensor {name!r} is unexpected ({len(unexpected)} in all; "
                          f"the model built from config.json has no place for it)")
    if mismatched:
        name, found, wanted = mismatched[0][:3]
        file = headers[name].file if name in headers else where
        raise ShrinkError(f"{key}: {file}: tensor {name!r} has shape {list(found)} but config.json "
                          f"gives {list(wanted)} ({len(mismatched)} mismatched in all)")
    state = model.state_dict()
    _, aliases = unique_tensors({name: tensor for name, tensor in state.items() if not tensor.is_meta})
    for name, tensor in state.items():
        entry = headers.get(name)
        file = entry.file if entry else where
        if check_kinds and entry is not None and kind(entry.dtype) != kind(tensor.dtype):
            raise ShrinkError(f"{key}: {file}: tensor {name!r} is {entry.dtype} but the model holds "
                              f"{kind(tensor.dtype)} values there")
        if tensor.is_meta or not tensor.is_floating_point() or name in aliases:  # tied weights: checked once
            continue
        if not bool(torch.isfinite(tensor).all()):
            if entry is not None and DTYPE_BYTES.get(entry.dtype, 0) > tensor.element_size():
                narrow(read_tensor(entry.file, name), tensor.dtype, name, f"{key}: {file}", MODEL_DTYPE_HINT)
            raise ShrinkError(f"{key}: {file}: tensor {name!r} holds non-finite values (NaN or inf)")
    check_tied(folder, model, headers, key)


def read_tensor(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(name)


def overflows(tensor: torch.Tensor, dtype: torch.dtype) -> Optional[float]:
    """The largest finite magnitude of tensor when it becomes inf in dtype, else None."""
    if not (tensor.is_floating_point() and dtype.is_floating_point) or tensor.is_meta or not tensor.numel() \
            or torch.finfo(dtype).max >= torch.finfo(tensor.dtype).max:
        return None
    magnitude = tensor.detach().abs()
    peak = torch.where(torch.isfinite(magnitude), magnitude, torch.zeros((), dtype=tensor.dtype,
                                                                         device=tensor.device)).amax()
    return float(peak) if bool(torch.isinf(peak.to(dtype))) else None


def narrow(tensor: torch.Tensor, dtype: torch.dtype, name: str, key: str, hint: str) -> torch.Tensor:
    """tensor in dtype, refused (one line naming the tensor, `key` its setting or file and `hint`
    the way out) when a finite value of it lies beyond dtype's range."""
    peak = overflows(tensor, dtype)
    if peak is not None:
        limit = torch.finfo(dtype).max
        raise ShrinkError(f"{key}: tensor {name!r} holds {peak:.6g}, beyond the range of "
                          f"{str(dtype).removeprefix('torch.')} (±{limit:.6g}); {hint}")
    return tensor.to(dtype)


def check_narrowing(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, key: str, hint: str) -> None:
    """narrow's refusal for every tensor, without keeping the cast copies."""
    for name, tensor in tensors:
        if overflows(tensor, dtype) is not None:
            narrow(tensor, dtype, name, key, hint)


def tied_embeddings(model: nn.Module) -> bool:
    """config.json (its text config, for multimodal families) ties the output embedding to the input's."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return bool(getattr(text, "tie_word_embeddings", False))


def embedding_names(model: nn.Module) -> Optional[tuple[str, str]]:
    """(input embedding weight, output embedding weight) by state-dict name, None without both."""
    ends = [getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output")]
    weights = [getattr(end, "weight", None) for end in ends]
    if any(w is None for w in weights):
        return None
    names = [next((n for n, p in model.named_parameters(remove_duplicate=False) if p is w), None) for w in weights]
    return (names[0], names[1]) if all(names) else None


def check_tied(folder: Path, model: nn.Module, headers: Mapping[str, TensorHeader], key: str = "model.path") -> None:
    """A config that ties the embeddings, with weight files holding an lm_head of other values,
    is refused: transformers would load the two apart while the config (and an export of it)
    says they are one, so figures and export would describe two different models."""
    names = embedding_names(model) if tied_embeddings(model) else None
    if names is None or not all(n in headers for n in names):
        return
    embedding, head = (read_tensor(headers[n].file, n) for n in names)
    if embedding.shape != head.shape or not torch.equal(embedding, head):
        raise ShrinkError(f"{key}: {headers[names[1]].file}: tensor {names[1]!r} differs from {names[0]!r}, but "
                          f"config.json says tie_word_embeddings=true (they are one tensor); set it to false "
                          f"in config.json to keep both, or drop {names[1]!r} from the weights")
