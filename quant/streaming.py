"""The export of a lazy model (engine/streaming.py), written layer by layer by the stage that
compresses it.

`StreamedExport` is the calibration engine's layer stream: it reads decoder layer i from the
shards before its turn and, once the layer is compressed, swaps its quantized Linears (if
any: a pruned layer stays dense) for QuantLinears, writes its tensors into the output shards
and drops the layer. The folder is the one save_gptq_model (or, dense, save_pretrained)
writes: same tensor names, quantization_config and config files, assembled in a temp folder
that only becomes the output when complete. `streamed_export` wraps a stage's compress_model.
"""
from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from engine.experts import disk_names, split_modules, to_disk_key
from engine.files import TEMP_PREFIX
from engine.streaming import LazyModel, ShardWriter
from quant.export import (_BLOCK_RE, QuantLinear, _check_g_idx, _dedup_shared, cast_floats, export_config,
                          replace_with_quant_linears, round_float_tensors, write_export_configs)
from quant.layout import fit_layout, is_awq, memory_format, to_disk

log = logging.getLogger(__name__)


class StreamedExport:
    """load(i, layer) / done(i, layer) around each decoder layer of engine.calibration.compress_model."""

    def __init__(self, lazy: LazyModel, packed: dict[str, dict[str, torch.Tensor]], bits: int, group_size: int,
                 quant_config: Optional[dict[str, Any]], parent: Path, max_shard_bytes: int,
                 float_dtype: Optional[torch.dtype] = None) -> None:
        self.lazy, self.packed, self.bits, self.group_size = lazy, packed, bits, group_size
        # the layout's group size is fixed before the first layer is written (layout.fit_layout)
        self.quant_config = fit_layout(lazy.model, quant_config) if quant_config is not None else None
        # as save_gptq_model: a GPTQ export's floats outside the packed tensors in float_dtype
        self.float_dtype = float_dtype if quant_config is not None else None
        self.folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}model.lazy.", dir=parent))
        self.writer = ShardWriter(self.folder, max_shard_bytes)
        renames = disk_names(lazy.model)[1] if split_modules(lazy.model) else []
        self.rename = lambda key: to_disk_key(key, renames)  # noqa: E731
        self.qnames: list[str] = []
        self.present: dict[str, set[str]] = {}

    def start(self) -> None:
        """The outer tensors read (the capture runs the embeddings) and those that precede the
        decoder layers in the state dict written, as the eager export orders them; layer 0 read
        too, since the capture runs it once to learn what a layer returns."""
        self.lazy.load_outer()
        self.lazy.load_layer(0)
        self.writer.add_all(self._cast(self._outer(before_layers=True)))

    def load(self, i: int, layer: nn.Module) -> None:
        self.lazy.load_layer(i)

    def done(self, i: int, layer: nn.Module) -> None:
        prefix = self.lazy.layer_prefix(i)
        mine = {n: self.packed.pop(n) for n in [n for n in self.packed if n.startswith(prefix)]}
        if self.quant_config is not None:
            replace_with_quant_linears(self.lazy.model, mine, self.bits, self.group_size)
            _check_g_idx(layer, bool(self.quant_config.get("desc_act", False)) or is_awq(self.quant_config))
        formats: dict[str, str] = {}
        for name, module in layer.named_modules():
            if isinstance(module, (nn.Linear, QuantLinear)) and (block := _BLOCK_RE.match(self.rename(prefix + name))):
                self.present.setdefault(block["idx"], set()).add(block["rest"])
                if isinstance(module, QuantLinear):
                    self.qnames.append(self.rename(prefix + name))
                    formats[self.rename(prefix + name)] = module.checkpoint_format
        tensors = self._cast({self.rename(prefix + k): v for k, v in layer.state_dict().items()})
        self.writer.add_all(to_disk(tensors, self.quant_config, formats) if self.quant_config is not None else tensors)
        if self.quant_config is not None:  # read back from the written folder from now on, as its reader gives them
            for module in layer.modules():
                if isinstance(module, QuantLinear):
                    module.checkpoint_format = memory_format(self.quant_config)
        self.lazy.release(i)

    def finish(self) -> tuple[Path, Optional[dict[str, Any]]]:
        """Write the remaining tensors, the index and config files; (folder, quantization_config)."""
        self.writer.add_all(self._cast(self._outer(before_layers=False)))
        self.writer.finish()
        if self.quant_config is None:  # dense, as save_pretrained writes it
            write_export_configs(self.folder, self.lazy.model, copy.deepcopy(self.lazy.model.config), None)
            return self.folder, None
        if not self.qnames:
            raise ValueError("no Linear was quantized")
        config, qcfg, _ = export_config(self.lazy.model, self.quant_config, self.qnames, self.present, self.rename)
        if self.float_dtype is not None:
            config.dtype = self.float_dtype
        write_export_configs(self.folder, self.lazy.model, config, qcfg)
        return self.folder, qcfg

    def _cast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return cast_floats(tensors, self.float_dtype, self.qnames)

    def abort(self) -> None:
        self.writer.abort()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _outer(self, before_layers: bool) -> dict[str, torch.Tensor]:
        """The outer (non-decoder-layer) tensors on one side of the layers in state-dict order,
        tied weights once (transformers re-ties them on load)."""
        layers_prefix = f"{self.lazy.parent}."
        state = self.lazy.model.state_dict()
        keys = list(state)
        first_layer = next((k for k, name in enumerate(keys) if name.startswith(layers_prefix)), len(keys))
        chosen = keys[:first_layer] if before_layers else keys[first_layer:]
        outer = {self.rename(k): state[k] for k in chosen if not k.startswith(layers_prefix)}
        tied_names = set(self.lazy.aliases)
        return _dedup_shared({k: v for k, v in outer.items() if k not in tied_names}, False)[0]


@contextmanager
def streamed_export(state: Any, packed: dict[str, dict[str, torch.Tensor]], quant_config: Optional[dict[str, Any]],
                    bits: int = 4, group_size: int = 128,
                    float_dtype: Optional[torch.dtype] = None) -> Iterator[Optional[StreamedExport]]:
    """The layer stream of a stage's compress_model when the model is lazy (None otherwise): the
    output folder is complete when the block ends, and the model reads from it from then on
    (state.quantization_config set when quant_config is given); removed if the block fails."""
    if state.lazy is None:
        yield None
        return
    stream = StreamedExport(state.lazy, packed, bits, group_size, quant_config, state.out,
                            shard_bytes(state.cfg.export.max_shard_size), float_dtype)
    try:
        stream.start()
        yield stream
        folder, qcfg = stream.finish()
    except BaseException:
        stream.abort()
        raise
    state.lazy.use(folder)
    if qcfg is not None:
        state.quantization_config = qcfg
        if float_dtype is not None:  # the outer tensors stay in memory: hold what was written, as eager does
            round_float_tensors(state.lazy.model, float_dtype)


def shard_bytes(setting: Any) -> int:
    """export.max_shard_size as bytes: an integer, or a size such as "4GB" or "512MiB"."""
    from engine.errors import ShrinkError

    if isinstance(setting, int):
        value = setting
    else:
        text = str(setting).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        unit = next((u for u in units if text.endswith(u)), "")
        try:
            value = int(float(text[: len(text) - len(unit)]) * units.get(unit, 1))
        except ValueError:
            raise ShrinkError(f"export.max_shard_size: {setting!r} is not a size (e.g. 4GB, 512MiB)") from None
    if value <= 0:
        raise ShrinkError(f"export.max_shard_size: {setting!r} must be positive")
    return value
