"""`shrink plan`'s memory arithmetic: the model skeleton from config.json alone (on the meta
device), its contiguous units, and the bytes of every unit as each recipe stage stores it.

- dense: numel x dtype bytes (tied weights counted once);
- pruned: the same dense storage, except N:M 2:4 where the pruned Linears are stored
  semi-structured (half the values + 2 bits of metadata per kept value: 9/16 of fp16);
- GPTQ b-bit, group g (the layout quant.export writes): qweight b/8 bytes per weight,
  qzeros b bits and scales fp16 per group and output column, g_idx int32 per input; in AWQ's
  layout (quant.export_format, asymmetric 4-bit by default) the same without g_idx, in one group
  size for the whole model: the largest divisor of g that divides every decoder-layer input size
  (quant/layout.py's fit_layout; SmolLM2's 576 makes g128 groups of 64 everywhere).
  Everything outside the decoder-layer Linears (embeddings, norms, lm_head) stays in floating
  point: quant.export_dtype where the config has it, else dtype.
- fused mixture-of-experts tensors ([E, out, in], or transposed as their class declares) are
  E experts of gate, up and down matrices, each priced like the Linear the export writes; names matching the stage's `skip`
  patterns (MoE routers by default) stay in dtype, as the stages leave them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.coverage import is_skipped
from engine.errors import ShrinkError
from engine.experts import ExpertLayout
from engine.modeling import linear_dims
from quant.config import check_quant_config, export_format
from quant.layout import awq_group_size

log = logging.getLogger(__name__)

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class Target:
    spec: str
    count: int
    name: str
    gib: float
    reserve: float

    @property
    def device_bytes(self) -> int:
        return int(self.gib * GIB)

    @property
    def usable_bytes(self) -> int:
        return int(self.device_bytes * (1 - self.reserve))


@dataclass
class Unit:
    """A contiguous piece the device map places whole: module names and their bytes."""
    label: str
    modules: list[str]
    weight_bytes: int = 0
    kv_bytes: int = 0
    expert_bytes: dict[str, int] = field(default_factory=dict)  # routed-experts module -> bytes (in weight_bytes)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


def build_meta_model(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ShrinkError(f"model.path: not a causal LM config ({exc})") from None


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim), handling GQA (num_key_value_heads) and MQA flags."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if getattr(text, "new_decoder_architecture", False):  # Falcon-40B style grouped KV
        kv = text.num_kv_heads
    elif getattr(text, "multi_query", False):  # Falcon-7B, GPT-BigCode: one KV head
        kv = 1
    else:
        kv = getattr(text, "num_key_value_heads", None) or heads
    return text.num_hidden_layers, kv, head_dim


def split_units(model: nn.Module) -> tuple[list[Unit], list[Unit], list[Unit], str]:
    """(head units, layer units, tail units, layer list name) from the module tree.

    Walking from the root to the decoder ModuleList, siblings registered before it are the
    head (embeddings), after it the tail (final norm, lm_head). Registration order is not
    execution order everywhere (OPT registers final_layer_norm before its layers), hence the
    name rule; modules owning no parameters (rotary tables, a tied lm_head) ride with the
    embeddings, which also keeps a tied head on the embedding's device.
    """
    from engine.modeling import find_decoder_layers

    layers_name, layers = find_decoder_layers(model)
    owned = _owned_param_names(model)
    head, tail = [], []
    path = layers_name.split(".")
    for depth in range(len(path)):
        parent = model.get_submodule(".".join(path[:depth])) if depth else model
        after = False
        for child, _ in parent.named_children():
            if child == path[depth]:
                after = True
                continue
            full = ".".join(path[:depth] + [child])
            unit = Unit(full, [full])
            to_tail = (after or "final" in child or child == "project_out") and owned(full)
            (tail if to_tail else head).append(unit)
    units = [Unit(f"{layers_name}.{i}", [f"{layers_name}.{i}"]) for i in range(len(layers))]
    return head, units, tail, layers_name


def _owned_param_names(model: nn.Module) -> Callable[[str], bool]:
    names = [n for n, _ in model.named_parameters()]  # deduplicated: a tied weight once

    def owns(prefix: str) -> bool:
        return any(n == prefix or n.startswith(prefix + ".") for n in names)
    return owns


@dataclass(frozen=True)
class Storage:
    """How one stage stores the decoder-layer Linears."""
    name: str
    description: str
    semi_structured: bool = False  # 2:4 compressed values + metadata
    bits: Optional[int] = None  # GPTQ packed
    group_size: int = -1
    skip: tuple[str, ...] = ()  # module name patterns the stage leaves in full precision
    float_bytes: Optional[int] = None  # bytes of the tensors it keeps in floating point (None: the dtype's)
    awq: bool = False  # AWQ's layout: no g_idx, groups that divide the input size


def gptq_bytes(in_features: int, out_features: int, bits: int, group_size: int, awq: bool = False) -> int:
    """Bytes of qweight + qzeros + scales + g_idx, int32-packed as quant.export writes them
    (awq: no g_idx, groups of gcd(group_size, in_features))."""
    size = in_features if group_size == -1 else (math.gcd(group_size, in_features) if awq else group_size)
    groups = math.ceil(in_features / size)
    qweight = math.ceil(in_features * bits / 32) * out_features * 4
    qzeros = groups * math.ceil(out_features * bits / 32) * 4
    scales = groups * out_features * 2
    g_idx = 0 if awq else in_features * 4
    return qweight + qzeros + scales + g_idx


def price_module(module: nn.Module, prefix: str, storage: Storage, dtype_bytes: int, linears: set[str],
                 experts: dict[str, ExpertLayout], seen: set[int], expert_bytes: dict[str, int]) -> int:
    """Bytes of the parameters under `module` in this storage (shared tensors counted once);
    the bytes of routed-experts modules (`experts`: name -> layout) also go to expert_bytes."""
    total = 0
    for name, sub in module.named_modules(prefix=prefix):
        for pname, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            compress = not is_skipped(name, storage.skip)
            if pname == "weight" and name in linears and compress:
                n = _matrix_bytes(*linear_dims(sub), storage, dtype_bytes)
            elif name in experts and p.ndim == 3 and compress:
                n = p.shape[0] * sum(_matrix_bytes(*dims, storage, dtype_bytes)
                                     for dims in _expert_matrices(pname, experts[name]))
            else:
                n = p.numel() * dtype_bytes
            total += n
            if name in experts:
                expert_bytes[name] = expert_bytes.get(name, 0) + n
    return total


def _expert_matrices(pname: str, layout: ExpertLayout) -> list[tuple[int, int]]:
    """(in, out) of the matrices one expert's slice of `pname` holds: down [H, I], or up
    [I, H] and, when gated, gate [I, H] as well (stored and exported as separate Linears)."""
    if pname == "down_proj":
        return [(layout.intermediate, layout.hidden)]
    return [(layout.hidden, layout.intermediate)] * (2 if layout.gate else 1)


def _matrix_bytes(in_features: int, out_features: int, storage: Storage, dtype_bytes: int) -> int:
    numel = in_features * out_features
    if storage.bits is not None:
        return gptq_bytes(in_features, out_features, storage.bits, storage.group_size, storage.awq)
    if storage.semi_structured:
        return numel * dtype_bytes // 2 + numel // 8  # kept half + 2 bits per kept value
    return numel * dtype_bytes


def recipe_storages(stages: list[str], quant: Any, prune: Any, dtype: str) -> list[Storage]:
    """dense, then one Storage per model-changing stage of the recipe, cumulative."""
    result = [Storage("dense", f"{dtype} dense")]
    for stage in stages:
        if stage == "prune":
            semi = prune.pattern == "2:4"
            what = f"{prune.method} {prune.pattern if prune.pattern != 'unstructured' else prune.sparsity}"
            how = "2:4 semi-structured storage" if semi else "dense storage"
            result.append(Storage("prune", f"{what} ({how})", semi_structured=semi, skip=tuple(prune.skip)))
        elif stage == "quantize":
            check_quant_config(quant)
            groups = "per-channel" if quant.group_size == -1 else f"g{quant.group_size}"
            result.append(Storage("quantize", f"{quant.method} {quant.bits}-bit {groups}", bits=quant.bits,
                                  group_size=quant.group_size, skip=tuple(quant.skip),
                                  float_bytes=DTYPE_BYTES.get(getattr(quant, "export_dtype", None) or dtype),
                                  awq=export_format(quant) == "awq"))
        elif stage == "distill":
            log.warning("plan: the distill stage changes the architecture; plan the student's config instead")
    return result


def price_units(model: nn.Module, units: list[Unit], storage: Storage, dtype_bytes: int,
                linears: set[str], experts: dict[str, ExpertLayout]) -> list[Unit]:
    seen: set[int] = set()
    priced = []
    dtype_bytes = storage.float_bytes or dtype_bytes
    if storage.awq:  # one group for the whole model, as the export writes it (experts' matrices included)
        inputs = [linear_dims(model.get_submodule(n))[0] for n in linears]
        inputs += [d for layout in experts.values() for d in (layout.hidden, layout.intermediate)]
        storage = replace(storage, group_size=awq_group_size(storage.group_size, (), inputs))
    for unit in units:
        expert_bytes: dict[str, int] = {}
        weight = sum(price_module(model.get_submodule(m), m, storage, dtype_bytes, linears, experts, seen,
                                  expert_bytes) for m in unit.modules)
        priced.append(Unit(unit.label, unit.modules, weight, unit.kv_bytes, expert_bytes))
    return priced


def merge(label: str, units: list[Unit]) -> Unit:
    return Unit(label, [m for u in units for m in u.modules], sum(u.weight_bytes for u in units),
                sum(u.kv_bytes for u in units), {k: v for u in units for k, v in u.expert_bytes.items()})
