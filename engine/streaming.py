"""Streaming a model from its safetensors shards (`model.lazy`): past one machine's RAM.

A lazy model is the model's skeleton built on the meta device (no weights allocated) plus a
`ShardReader` over its folder (the files memory-mapped by safetensors). A decoder layer's
tensors are read only when its turn comes (`LazyModel.load_layer`) and dropped back to the
meta device when it is done (`release`), so peak memory is one layer plus what the stage keeps
(Hessians, calibration activations), whatever the depth. The embeddings, final norm and
lm_head ("outer" tensors) stay materialized. Compressed layers are written at once by a
`ShardWriter` (standard HF sharding + model.safetensors.index.json) that keeps only one
tensor in memory: each shard's data goes to a side file and is copied behind its header when
the shard closes. `measure_lazy` evaluates layer by layer over all windows, with the very
kwargs and batches the model's own forward uses, so the figures equal the eager path's.

Every input check happens before anything is written: the headers (truncated shard, shard
missing from the index) by engine.weights.read_headers, and every tensor's presence, shape
and kind against the skeleton by engine.weights.check_load.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from torch import nn

from engine.calibration import capture_layer_calls, run_layer
from engine.errors import ShrinkError
from engine.experts import disk_names, split_experts, split_modules, to_disk_key, to_memory_key
from engine.evaluation import Measured, measure
from engine.lockstep import release_free_memory
from engine.modeling import find_decoder_layers
from engine.weights import (MODEL_DTYPE_HINT, SAFE_INDEX, SAFE_NAME, TensorHeader, check_load, narrow,
                            read_headers)

log = logging.getLogger(__name__)

# model.lazy=auto streams when the checkpoint's weight files take more than this share of the
# memory the kernel reports available (MemAvailable): the eager path needs the whole model plus
# a layer's worth of work and the activations next to it.
AUTO_RAM_SHARE = 0.5
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def available_ram_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); total physical memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_lazy(setting: Any, checkpoint_bytes: int, available: Optional[int] = None) -> bool:
    """model.lazy: true | false | auto (on when the checkpoint exceeds AUTO_RAM_SHARE of MemAvailable)."""
    value = str(setting).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    if value != "auto":
        raise ShrinkError(f"model.lazy: {setting!r} is not true, false or auto")
    available = available_ram_bytes() if available is None else available
    lazy = checkpoint_bytes > AUTO_RAM_SHARE * available
    if lazy:
        log.info("model.lazy=auto: the checkpoint (%.1f GiB) exceeds %.0f%% of available RAM (%.1f GiB): streaming "
                 "layers from the shards", checkpoint_bytes / 2**30, 100 * AUTO_RAM_SHARE, available / 2**30)
    return lazy


class ShardReader:
    """Tensors of a model folder by name, read from the memory-mapped shards on demand."""

    def __init__(self, folder: Path, key: str = "model.path") -> None:
        self.folder, self.key = Path(folder), key
        self.headers: dict[str, TensorHeader] = read_headers(self.folder, key)
        self._handles: dict[Path, Any] = {}

    def where(self) -> Path:
        index = self.folder / SAFE_INDEX
        return index if index.is_file() else self.folder

    def get(self, name: str) -> torch.Tensor:
        return self.read(name, self.headers)

    def read(self, name: str, headers: dict[str, TensorHeader]) -> torch.Tensor:
        """Tensor `name` as the files hold it (`headers`: the files' own headers)."""
        entry = headers.get(name)
        if entry is None:
            raise ShrinkError(f"{self.key}: {self.where()}: tensor {name!r} is missing")
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = safe_open(str(entry.file), framework="pt", device="cpu")
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # a file changed or damaged since its header was read
            raise ShrinkError(f"{self.key}: {entry.file}: cannot read tensor {name!r} ({exc})") from None

    def close(self) -> None:
        self._handles.clear()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Every later name of a shared parameter -> its first name (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def persistent_names(module: nn.Module) -> list[str]:
    """Names of the tensors a module's state_dict holds (parameters and persistent buffers)."""
    return list(module.state_dict(keep_vars=True).keys())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(model, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor
    if hasattr(owner, "clear_cache"):  # a packed Linear's dequantized weight belongs to the old buffers
        owner.clear_cache()


class LazyModel:
    """A model skeleton on the meta device and the shards its tensors come from."""

    def __init__(self, model: nn.Module, source: ShardReader, dtype: torch.dtype,
                 renames: Optional[list[tuple[str, str]]] = None, reader: Callable[..., ShardReader] = ShardReader
                 ) -> None:
        self.model, self.source, self.dtype = model, source, dtype
        # opens a folder's shards as the model holds its tensors (a quantized layout: quant's reader)
        self.reader = reader
        # split experts (engine/experts.py) are stored under the family's per-expert disk names
        self.renames = renames or []
        self.parent, self.layers = find_decoder_layers(model)
        self.aliases = tied_aliases(model)
        # the checkpoint that holds the model as it is now (an input folder, or a stage's written one)
        self.written: Optional[Path] = None

    # ------------------------------------------------------------------ names
    def layer_prefix(self, i: int) -> str:
        return f"{self.parent}.{i}."

    def outer_names(self) -> list[str]:
        prefix = f"{self.parent}."
        return [n for n in persistent_names(self.model) if not n.startswith(prefix) and n not in self.aliases]

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Every tensor the skeleton needs is in the files with its shape and kind, and no file
        tensor lacks a place: before any weight is read or anything written."""
        wanted = {self.disk(n): t for n, t in self.model.state_dict(keep_vars=True).items() if n not in self.aliases}
        headers = self.source.headers
        ignore = [re.compile(p) for p in (getattr(self.model, "_keys_to_ignore_on_load_unexpected", None) or [])]
        missing = [n for n in wanted if n not in headers]
        unexpected = [n for n in headers if n not in wanted and n not in self.aliases
                      and not any(p.search(n) for p in ignore)]
        mismatched = [(n, headers[n].shape, tuple(t.shape)) for n, t in wanted.items()
                      if n in headers and headers[n].shape != tuple(t.shape)]
        if self.renames:  # check_load's own pass reads the model's names
            headers = {to_memory_key(n, self.renames): h for n, h in headers.items()}
            missing, unexpected = [to_memory_key(n, self.renames) for n in missing], \
                [to_memory_key(n, self.renames) for n in unexpected]
            mismatched = [(to_memory_key(n, self.renames), *rest) for n, *rest in mismatched]
        check_load(self.source.folder, self.model, headers, missing, unexpected, mismatched, key=self.source.key)

    def disk(self, name: str) -> str:
        """A tensor's name in the files."""
        return to_disk_key(name, self.renames) if self.renames else name

    # ------------------------------------------------------------------ materialize / release
    def materialize(self, names: Iterable[str], module: Optional[nn.Module] = None, prefix: str = "") -> None:
        """Read `names` (relative to module, full name prefix + name in the files) from the source."""
        module = module if module is not None else self.model
        for name in names:
            tensor = self.source.get(self.disk(prefix + name))
            current = module.get_parameter(name) if _is_param(module, name) else module.get_buffer(name)
            if tensor.is_floating_point() and current.is_floating_point():
                tensor = narrow(tensor, current.dtype, self.disk(prefix + name), f"{self.source.key}: "
                                f"{self.source.headers[self.disk(prefix + name)].file}", MODEL_DTYPE_HINT)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ShrinkError(f"{self.source.key}: {self.source.headers[self.disk(prefix + name)].file}: tensor "
                                  f"{self.disk(prefix + name)!r} holds non-finite values (NaN or inf)")
            _assign(module, name, tensor)
        if module is self.model:
            for alias, first in self.aliases.items():
                owner, leaf = _owner(self.model, alias)
                owner._parameters[leaf] = self.model.get_parameter(first)

    def load_outer(self) -> None:
        self.materialize([n for n in self.outer_names() if _is_meta(self.model, n)])

    def load_layer(self, i: int) -> nn.Module:
        layer = self.layers[i]
        self.materialize([n for n in persistent_names(layer) if _is_meta(layer, n)], layer, self.layer_prefix(i))
        return layer

    def release(self, i: int) -> None:
        """Drop decoder layer i's tensors back to the meta device, and unmap the shards (their
        pages read so far would otherwise stay resident in this process)."""
        release(self.layers[i])
        self.source.close()
        # the layer's work was done in many short-lived buffers; glibc keeps freed heap pages in
        # the process unless asked, and over a deep model that reads as growth with depth
        release_free_memory()

    def use(self, folder: Path) -> None:
        """From now on tensors come from `folder` (a stage's written checkpoint); an earlier
        stage's temp folder, now superseded, is removed."""
        self.source.close()
        if self.written is not None and self.written != folder and self.written.name.startswith(".tmp-"):
            shutil.rmtree(self.written, ignore_errors=True)
        self.source = self.reader(folder, "model.path")
        self.written = folder


def _is_param(module: nn.Module, name: str) -> bool:
    owner, leaf = _owner(module, name)
    return leaf in owner._parameters


def _is_meta(module: nn.Module, name: str) -> bool:
    owner, leaf = _owner(module, name)
    tensor = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
    return tensor is not None and tensor.is_meta


def release(module: nn.Module) -> None:
    """Every parameter and persistent buffer of module back on the meta device (memory freed)."""
    for name in persistent_names(module):
        owner, leaf = _owner(module, name)
        if leaf in owner._parameters:
            p = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        else:
            owner._buffers[leaf] = torch.empty_like(owner._buffers[leaf], device="meta")
        if hasattr(owner, "clear_cache"):
            owner.clear_cache()


def build_skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False,
                   replace: Optional[Callable[[nn.Module], None]] = None,
                   reader: Callable[..., ShardReader] = ShardReader) -> LazyModel:
    """The model of folder/config.json on the meta device (non-persistent buffers such as rotary
    frequencies computed as usual), its tensors checked against the files' headers. `replace`
    may swap modules first (a GPTQ folder's packed Linears); `reader` opens a folder's shards
    (this one, and the ones stages write) as the model holds them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    open_reader, reader = reader, reader(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # `replace` installs the packed Linears itself
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_pretrained ties after loading; the skeleton must know its aliases now
    if replace is not None:
        replace(model)
    split_experts(model)  # (a GPTQ folder's `replace` has split them already)
    renames = disk_names(model)[1] if split_modules(model) else []
    lazy = LazyModel(model.eval(), reader, dtype, renames, open_reader)
    lazy.check()
    return lazy


# ---------------------------------------------------------------------------- writer
class ShardWriter:
    """safetensors shards written tensor by tensor, so only one tensor is ever held here.

    Each shard file starts with room for its header (1/256 of the shard size, at most 1 MiB),
    filled with the JSON header padded with spaces when the shard closes; a header that does
    not fit moves the data behind a header of its own size (a copy). Shards are cut as the
    eager export cuts them (a new shard when the next tensor would pass max_shard_bytes);
    names, metadata and index as transformers writes them."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.reserve = max(8, min(2**20, max_shard_bytes // 256) // 8 * 8)
        self.shards: list[tuple[Path, dict[str, Any]]] = []  # (finished data file, header)
        self._data: Optional[Any] = None
        self._header: dict[str, Any] = {}
        self._size = 0
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._header and self._size + nbytes > self.max_shard_bytes:
            self._close_shard()
        if tensor.dtype not in _ST_DTYPES:
            raise ShrinkError(f"export: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold")
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.shards):05d}", "wb")
            self._data.write(bytes(8 + self.reserve))
        self._header[name] = {"dtype": _ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._size, self._size + nbytes]}
        if nbytes:
            self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._size += nbytes
        self.total += nbytes

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def _close_shard(self) -> None:
        if self._data is None:
            return
        self._data.close()
        self.shards.append((Path(self._data.name), self._header))
        self._data, self._header, self._size = None, {}, 0

    def finish(self) -> dict[str, str]:
        """Name every shard (model.safetensors when one, else model-0000i-of-0000n + index); the
        weight map."""
        self._close_shard()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (data, header) in enumerate(self.shards, 1):
            name = SAFE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            self._seal(data, header, self.folder / name)
            weight_map.update({k: name for k in header})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        self.shards = []
        return weight_map

    def _seal(self, data: Path, header: dict[str, Any], target: Path) -> None:
        raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        if len(raw) <= self.reserve:  # the usual case: the header goes into its room
            with open(data, "r+b") as f:
                f.write(self.reserve.to_bytes(8, "little") + raw + b" " * (self.reserve - len(raw)))
            data.rename(target)
            return
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
        with open(target, "wb") as out, open(data, "rb") as src:
            out.write(len(raw).to_bytes(8, "little") + raw)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, out, 16 * 2**20)
        data.unlink()

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
        for path in self.folder.glob(".shard-*"):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- evaluation
class _Inject(nn.Module):
    """Stands in for the decoder stack's first layer in the final pass: returns the last layer's
    (precomputed) outputs for the current batch, in the structure a layer returns."""

    def __init__(self, template: Any) -> None:
        super().__init__()
        self.template = template
        self.hidden: Optional[torch.Tensor] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = self.hidden
        return h if isinstance(self.template, torch.Tensor) else (h, *self.template[1:])


class _PassThrough(nn.Module):
    def __init__(self, template: Any) -> None:
        super().__init__()
        self.template = template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return h if isinstance(self.template, torch.Tensor) else (h, *self.template[1:])


@torch.no_grad()
def layer_outputs(lazy: LazyModel, windows: torch.Tensor, batch_size: int,
                  device: torch.device) -> tuple[list[torch.Tensor], Any]:
    """The last decoder layer's outputs for every batch of windows, one layer in memory at a
    time, and what a layer returns (tensor or tuple) for its stand-in."""
    lazy.load_outer()
    lazy.load_layer(0)
    calls = capture_layer_calls(lazy.model, windows, batch_size, device, device)
    hidden = [b.hidden() for b in calls[0]]
    template: Any = None
    for i, layer in enumerate(lazy.layers):
        lazy.load_layer(i).to(device)
        batches = [c.with_hidden(h) for c, h in zip(calls[i], hidden)]
        if template is None:  # the structure only; the values are recomputed below
            first = batches[0].to(device)
            template = layer(*first.args, **first.kwargs)
        hidden = run_layer(layer, batches, device, device)
        calls[i] = []
        layer.to("cpu")
        lazy.release(i)
        log.debug("lazy eval: layer %d/%d", i + 1, len(lazy.layers))
    return hidden, template


@contextmanager
def lazy_forward(lazy: LazyModel, windows: torch.Tensor, batch_size: int,
                 device: torch.device) -> Iterator[Callable[..., Any]]:
    """The model's forward over `windows`, batch after batch of `batch_size` (call it in that
    order): the decoder layers have run one at a time over all windows first, and the model's
    own forward (embeddings, final norm, lm_head) runs with the stack replaced by their outputs."""
    hidden, template = layer_outputs(lazy, windows, batch_size, device)
    model = lazy.model
    parent = model.get_submodule(lazy.parent.rsplit(".", 1)[0]) if "." in lazy.parent else model
    attr = lazy.parent.rsplit(".", 1)[-1]
    inject = _Inject(template)
    setattr(parent, attr, nn.ModuleList([inject, *[_PassThrough(template) for _ in lazy.layers[1:]]]))
    batches = iter(hidden)

    def forward(input_ids: torch.Tensor, use_cache: bool = False) -> Any:
        inject.hidden = next(batches)
        return model(input_ids=input_ids, use_cache=use_cache)

    try:
        model.to(device)
        yield forward
    finally:
        model.to("cpu")
        setattr(parent, attr, lazy.layers)


@torch.no_grad()
def measure_lazy(lazy: LazyModel, windows: torch.Tensor, batch_size: int, device: torch.device, label: str,
                 lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Measured:
    """engine.evaluation.measure of a lazy model (lazy_forward): batch for batch the eager
    forward's numbers, one decoder layer in memory at a time."""
    with lazy_forward(lazy, windows, batch_size, device) as forward:
        return measure(forward, windows, batch_size, device, label, lengths)  # type: ignore[arg-type]


def zero_fraction_lazy(lazy: LazyModel, matrices: Callable[[nn.Module], dict[str, torch.Tensor]]) -> float:
    """Share of exact zeros over the decoder layers' weight matrices, one layer in memory at a time."""
    zeros = total = 0
    for i in range(len(lazy.layers)):
        for W in matrices(lazy.load_layer(i)).values():
            zeros += int((W == 0).sum())
            total += W.numel()
        lazy.release(i)
    return zeros / total if total else 0.0

