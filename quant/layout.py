"""Checkpoint layouts of a quantized export: GPTQ (in memory, and on disk by default for every
grid) and AWQ's GEMM layout (on disk, for asymmetric 4-bit: the layout vLLM serves such grids in).

The model always holds GPTQ-packed QuantLinears; a layout only decides how their tensors are
written and read. AWQ holds the same codes, fp16 scales and integer zero points, packed along
the output dimension and without g_idx, so the conversion is exact both ways:

- written (`to_disk`): each QuantLinear's (qweight, qzeros, scales, g_idx) -> AWQ's (qweight,
  qzeros, scales) in groups of `group_size` consecutive inputs. A group size that does not
  divide every input size (SmolLM2's 576 with 128) is written as its largest divisor that does
  (64: each group of 128 is two of 64 with the same scale and zero), so the uniform groups AWQ
  needs hold the shorter last groups too; config.json says the group size written.
- read (`from_disk`, and `AwqReader` for model.lazy): AWQ's tensors -> GPTQ v2 tensors (zero
  points stored as they are, so z = 0 of a third-party checkpoint reads back too).

quantization_config for AWQ is what AutoAWQ, transformers (AwqConfig), gptqmodel and vLLM read:
quant_method awq, bits 4, group_size, zero_point true, version/format gemm, and every Linear
left in floating point under modules_to_not_convert (full names: vLLM matches them as
substrings of a module's name, transformers from the start, so each is checked not to be
part of a quantized module's name). How the codes were found (GPTQ or RTN, the calibrated
group size) is under "meta".
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, find_linears, linear_dims
from engine.streaming import ShardReader
from engine.weights import TensorHeader
from quant.pack import AWQ_BITS, pack_awq, pack_gptq, unpack_awq, unpack_gptq, uniform_groups
from quant.qlinear import QuantLinear

PACKED = ("qweight", "qzeros", "scales", "g_idx")


def is_awq(qcfg: dict[str, Any] | None) -> bool:
    return bool(qcfg) and qcfg.get("quant_method") == "awq"


def memory_format(qcfg: dict[str, Any]) -> str:
    """The zero-point convention of the QuantLinears a folder is read into (quant/pack.py)."""
    if is_awq(qcfg):
        return "gptq_v2"
    return qcfg.get("format") or qcfg.get("checkpoint_format") or "gptq"


def vllm_serves(qcfg: dict[str, Any]) -> bool:
    """Whether vLLM (0.32) loads the layout: AWQ 4-bit, or symmetric 4/8-bit GPTQ without a packed
    embedding (the only GPTQ types its config maps; its CPU kernels take 4-bit only)."""
    if is_awq(qcfg):
        return int(qcfg.get("bits", 0)) == AWQ_BITS
    return bool(qcfg.get("sym")) and int(qcfg.get("bits", 0)) in (4, 8) and not qcfg.get("dynamic")


def awq_quantization_config(group_size: int, method: str, damp_percent: float, true_sequential: bool,
                            quantizer: str = "shrink") -> dict[str, Any]:
    """quantization_config of an AWQ-layout export (group_size and modules_to_not_convert are set
    for the model by fit_layout / float_matrices)."""
    return {
        "quant_method": "awq", "bits": AWQ_BITS, "group_size": group_size, "zero_point": True,
        "version": "gemm", "format": "gemm", "modules_to_not_convert": None, "lm_head": False,
        "meta": {"quantizer": [quantizer], "method": method, "calibrated_group_size": group_size,
                 "damp_percent": damp_percent, "true_sequential": true_sequential},
    }


def fit_layout(model: nn.Module, qcfg: dict[str, Any]) -> dict[str, Any]:
    """qcfg with AWQ's group size set to the largest divisor of the calibrated one that divides
    the input size of every Linear a QuantLinear can hold in the decoder layers (the same set
    before and after quantizing, so a streamed export and an eager one agree). GPTQ: unchanged."""
    if not is_awq(qcfg):
        return qcfg
    _, layers = find_decoder_layers(model)
    packed = [m.in_features for m in layers.modules() if isinstance(m, QuantLinear)]
    floats = [linear_dims(m)[0] for m in find_linears(layers).values()]
    return {**qcfg, "group_size": awq_group_size(int(qcfg["group_size"]), packed, floats)}


def awq_group_size(group_size: int, packed: Iterable[int], float_inputs: Iterable[int]) -> int:
    """AWQ's one group size for a model (fit_layout, and `shrink plan` pricing it): the largest
    divisor of the calibrated group size that divides the input size of every packed Linear and
    of every float one a QuantLinear can hold (a multiple of 32 inputs)."""
    sizes = set(packed) | {s for s in float_inputs if s % 32 == 0}
    return math.gcd(group_size, *sizes) if sizes else group_size


def float_matrices(model: nn.Module, rename: Callable[[str], str], quantized: list[str]) -> list[str]:
    """The on-disk names of the modules that keep a floating-point weight matrix (skipped Linears,
    MoE routers, which transformers 5 holds as router modules and vLLM builds as Linears,
    lm_head), for modules_to_not_convert; ValueError when one is a substring of a quantized name."""
    names = sorted(rename(n) for n, m in model.named_modules()
                   if n and not isinstance(m, (nn.Embedding, QuantLinear))
                   and (w := m._parameters.get("weight")) is not None and w.ndim == 2)
    for name in names:
        clash = next((q for q in quantized if name in q), None)
        if clash is not None:
            raise ValueError(f"float Linear {name} is part of the name of quantized {clash}: AWQ readers match "
                             "modules_to_not_convert as substrings (use quant.export_format=gptq)")
    return names


# ---------------------------------------------------------------------------- tensors
def awq_tensors(tensors: dict[str, torch.Tensor], fmt: str, group_size: int) -> dict[str, torch.Tensor]:
    """One QuantLinear's GPTQ tensors (zero convention `fmt`) in the AWQ layout."""
    codes, zero, scale = unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                                     AWQ_BITS, fmt)
    scale, zero = uniform_groups(scale, zero, tensors["g_idx"], group_size)
    return pack_awq(codes, scale, zero)


def gptq_tensors(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Inverse of awq_tensors, into GPTQ v2 tensors (g_idx = i // group_size)."""
    codes, zero, scale = unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
    g_idx = torch.arange(codes.shape[1], dtype=torch.int32) // group_size
    return pack_gptq(codes, scale, zero, g_idx, AWQ_BITS, "gptq_v2")


def to_disk(state: dict[str, torch.Tensor], qcfg: dict[str, Any], formats: dict[str, str]) -> dict[str, torch.Tensor]:
    """A state dict (on-disk names) with the packed Linears `formats` (name -> zero convention) in
    qcfg's layout; GPTQ: as it is."""
    if not is_awq(qcfg):
        return state
    out = dict(state)
    for name, fmt in formats.items():
        tensors = {s: out.pop(f"{name}.{s}") for s in PACKED}
        try:
            converted = awq_tensors(tensors, fmt, int(qcfg["group_size"]))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}; use quant.export_format=gptq") from None
        out.update({f"{name}.{s}": t for s, t in converted.items()})
    return out


def from_disk(state: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A folder's tensors with every AWQ Linear as GPTQ v2 tensors; GPTQ: as they are."""
    if not is_awq(qcfg):
        return state
    out, size = dict(state), int(qcfg["group_size"])
    for name in [k[: -len(".qweight")] for k in state if k.endswith(".qweight")]:
        tensors = {s: state.get(f"{name}.{s}") for s in PACKED[:3]}
        if awq_shapes_agree(tensors, size):  # else left as read: the loader's shape check names the tensor
            out.update({f"{name}.{s}": t for s, t in gptq_tensors(tensors, size).items()})
    return out


def awq_shapes_agree(tensors: dict[str, torch.Tensor | None], group_size: int) -> bool:
    """qweight [in, out / 8], qzeros [in / group_size, out / 8], scales [in / group_size, out]."""
    qweight, qzeros, scales = (tensors[s] for s in PACKED[:3])
    if qweight is None or qzeros is None or scales is None or qweight.ndim != 2 or group_size <= 0:
        return False
    in_f, words = qweight.shape
    groups = in_f // group_size
    return (in_f % group_size == 0 and words % 4 == 0 and tuple(qzeros.shape) == (groups, words)
            and tuple(scales.shape) == (groups, words * 8))


class AwqReader(ShardReader):
    """An AWQ folder's shards as the GPTQ v2 tensors they hold (for model.lazy): the headers show
    GPTQ names and shapes, and a packed Linear's tensors are converted when first read."""

    def __init__(self, folder: Path, key: str = "model.path", group_size: int = 128) -> None:
        super().__init__(folder, key)
        self.group_size = group_size
        self.raw = self.headers
        self.awq = {k[: -len(".qweight")] for k in self.raw if k.endswith(".qweight")}
        absent = sorted(f"{n}.{s}" for n in self.awq for s in PACKED[1:3] if f"{n}.{s}" not in self.raw)
        if absent:
            raise ShrinkError(f"{key}: {folder}: {absent[0]} is missing (an AWQ qweight needs its qzeros and scales)")
        virtual = {k: h for k, h in self.raw.items()
                   if not (k.rpartition(".")[0] in self.awq and k.rpartition(".")[2] in PACKED)}
        for name in self.awq:
            qweight, scales = self.raw[f"{name}.qweight"], self.raw[f"{name}.scales"]
            in_f, out_f, groups = qweight.shape[0], qweight.shape[1] * 32 // AWQ_BITS, scales.shape[0]
            shapes = {"qweight": ("I32", (in_f * AWQ_BITS // 32, out_f)), "qzeros": ("I32", (groups, qweight.shape[1])),
                      "scales": (scales.dtype, (groups, out_f)), "g_idx": ("I32", (in_f,))}
            virtual.update({f"{name}.{s}": TensorHeader(qweight.file, d, shape) for s, (d, shape) in shapes.items()})
        self.headers = virtual
        self._converted: tuple[str, dict[str, torch.Tensor]] | None = None

    def get(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module not in self.awq or leaf not in PACKED:
            return super().get(name)
        if self._converted is None or self._converted[0] != module:
            raw = {s: self.read(f"{module}.{s}", self.raw) for s in PACKED[:3]}
            self._converted = (module, gptq_tensors(raw, self.group_size))
        return self._converted[1][leaf]


def checkpoint_reader(folder: Path, key: str = "model.path") -> ShardReader:
    """The reader of a model folder's tensors as the model holds them (engine.streaming's hook)."""
    config = Path(folder) / "config.json"
    qcfg = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if is_awq(qcfg):
        return AwqReader(folder, key, int(qcfg["group_size"]))
    return ShardReader(folder, key)
