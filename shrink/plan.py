"""`shrink plan`: will a model, compressed by a recipe, fit on N GPUs, and how to spread it.

Everything is computed from config.json alone: the model is built on the meta device
(shapes, no storage), so a 176B-parameter plan takes a second and no weights. For each
stage of the recipe (dense -> prune -> quantize) the bytes of every parameter are priced
by how that stage stores it:

- dense: numel x dtype bytes (tied weights counted once);
- pruned: the same dense storage, except N:M 2:4 where the pruned Linears are stored
  semi-structured (half the values + 2 bits of metadata per kept value: 9/16 of fp16);
- GPTQ b-bit, group g (the layout quant.export writes): qweight b/8 bytes per weight,
  qzeros b bits and scales fp16 per group and output column, g_idx int32 per input.
  Everything outside the decoder-layer Linears (embeddings, norms, lm_head) stays in dtype.

The KV cache is 2 x layers x kv_heads x head_dim x context x batch x dtype bytes, booked
on the GPU holding each layer. A target `NxNAME-XXGB` is N devices of XX GiB (what
nvidia-smi reports); `reserve` (default 10%) of each is kept free for activations, the CUDA
context and allocator fragmentation. The device_map splits the model into contiguous runs
(embeddings, layers..., final norm + lm_head) over the N GPUs minimizing the largest
per-GPU total, so the GPUs holding the embeddings and the head get fewer layers, the way
Yuan 2.0 balances its pipeline stages by memory rather than by layer count.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from shrink.errors import ShrinkError

log = logging.getLogger(__name__)

GIB = 1024**3
DEFAULT_RESERVE = 0.10
TARGET_RE = re.compile(r"^(?P<n>\d+)x(?P<name>[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*?)-(?P<gb>\d+(?:\.\d+)?)GB$", re.I)
PLAN_KEYS = {"model.path", "target", "batch", "context", "dtype", "reserve", "out", "recipe",
             "model.trust_remote_code"}
RECIPE_PREFIXES = ("pipeline", "quant.", "prune.")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# ---------------------------------------------------------------------------- inputs
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


def parse_target(spec: str, reserve: float = DEFAULT_RESERVE) -> Target:
    m = TARGET_RE.match(spec.strip())
    if not m or int(m["n"]) < 1 or float(m["gb"]) <= 0:
        raise ShrinkError(f"target: {spec!r} is not NxNAME-XXGB (e.g. 1xH100-80GB, 4xA100-80GB, 8xA100-40GB)")
    if not 0 <= reserve < 1:
        raise ShrinkError(f"reserve: {reserve} must be in [0, 1)")
    return Target(spec=spec, count=int(m["n"]), name=m["name"], gib=float(m["gb"]), reserve=reserve)


@dataclass
class PlanArgs:
    model_path: Path
    target: Target
    batch: int = 1
    context: int = 2048
    dtype: str = "bfloat16"
    out: Path = Path("plan")
    recipe: Optional[Path] = None
    trust_remote_code: bool = False
    overrides: list[str] = field(default_factory=list)


def _typed(key: str, value: str, kind: type) -> Any:
    try:
        result = kind(value)
    except ValueError:
        raise ShrinkError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is int and result < 1:
        raise ShrinkError(f"{key}: must be a positive integer, got {value!r}")
    return result


def parse_plan_args(argv: list[str]) -> PlanArgs:
    """key=value arguments; plan keys are read here, pipeline/quant/prune keys go to Hydra."""
    values: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ShrinkError(f"plan: argument {arg!r} is not key=value")
        if key in PLAN_KEYS:
            values[key] = value
        elif key.startswith(RECIPE_PREFIXES):
            overrides.append(arg)
        else:
            raise ShrinkError(f"plan: unknown key {key!r} (plan keys: {', '.join(sorted(PLAN_KEYS))}; "
                              "recipe keys: pipeline=..., quant.*, prune.*)")
    for key in ("model.path", "target"):
        if key not in values:
            raise ShrinkError(f"plan: {key}=... is required")
    dtype = values.get("dtype", "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ShrinkError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    reserve = _typed("reserve", values.get("reserve", str(DEFAULT_RESERVE)), float)
    return PlanArgs(
        model_path=Path(values["model.path"]).expanduser(),
        target=parse_target(values["target"], reserve),
        batch=_typed("batch", values.get("batch", "1"), int),
        context=_typed("context", values.get("context", "2048"), int),
        dtype=dtype,
        out=Path(values.get("out", "plan")),
        recipe=Path(values["recipe"]) if "recipe" in values else None,
        trust_remote_code=values.get("model.trust_remote_code", "false").lower() == "true",
        overrides=overrides,
    )


def load_config(path: Path, trust_remote_code: bool = False) -> Any:
    """A transformers config from a model folder or a config .json file (no weights read)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ShrinkError(f"model.path: {file} not found (give a model folder or a config .json)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ShrinkError(f"model.path: {file} is not valid JSON ({exc})") from None
    raw.pop("quantization_config", None)  # plan the architecture; the recipe says how it is stored
    model_type = raw.get("model_type")
    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    if trust_remote_code and path.is_dir():
        return AutoConfig.from_pretrained(path, trust_remote_code=True)
    raise ShrinkError(f"model.path: {file} has model_type {model_type!r}, unknown to transformers")


def load_recipe(args: PlanArgs) -> tuple[list[str], Any, Any]:
    """(stages, quant cfg, prune cfg) composed like a run: conf/config.yaml or a run's recipe.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from shrink.cli import register_resolvers
    from shrink.config import register_configs

    if args.recipe is not None and not args.recipe.is_file():
        raise ShrinkError(f"recipe: {args.recipe} not found (a run's recipe.yaml)")
    conf_dir = args.recipe.resolve().parent if args.recipe else Path(__file__).resolve().parent.parent / "conf"
    name = args.recipe.stem if args.recipe else "config"
    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=name, overrides=args.overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ShrinkError(f"plan: recipe: {str(exc).splitlines()[0]}") from None
    return list(cfg.pipeline.stages), cfg.quant, cfg.prune


# ---------------------------------------------------------------------------- skeleton
@dataclass
class Unit:
    """A contiguous piece the device map places whole: module names and their bytes."""
    label: str
    modules: list[str]
    weight_bytes: int = 0
    kv_bytes: int = 0

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
    from shrink.modeling import find_decoder_layers

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


def _owned_param_names(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]  # deduplicated: a tied weight once

    def owns(prefix: str) -> bool:
        return any(n == prefix or n.startswith(prefix + ".") for n in names)
    return owns


# ---------------------------------------------------------------------------- pricing
@dataclass(frozen=True)
class Storage:
    """How one stage stores the decoder-layer Linears."""
    name: str
    description: str
    semi_structured: bool = False  # 2:4 compressed values + metadata
    bits: Optional[int] = None  # GPTQ packed
    group_size: int = -1


def gptq_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of qweight + qzeros + scales + g_idx, int32-packed as quant.export writes them."""
    groups = math.ceil(in_features / (in_features if group_size == -1 else group_size))
    qweight = math.ceil(in_features * bits / 32) * out_features * 4
    qzeros = groups * math.ceil(out_features * bits / 32) * 4
    scales = groups * out_features * 2
    g_idx = in_features * 4
    return qweight + qzeros + scales + g_idx


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (weight stored [in, out])."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def price_module(module: nn.Module, prefix: str, storage: Storage, dtype_bytes: int,
                 linears: set[str], seen: set[int]) -> int:
    """Bytes of the parameters under `module` in this storage (shared tensors counted once)."""
    total = 0
    for name, sub in module.named_modules(prefix=prefix):
        for pname, p in sub.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if pname == "weight" and name in linears:
                total += _linear_weight_bytes(sub, p, storage, dtype_bytes)
            else:
                total += p.numel() * dtype_bytes
    return total


def _linear_weight_bytes(module: nn.Module, p: torch.Tensor, storage: Storage, dtype_bytes: int) -> int:
    if storage.bits is not None:
        return gptq_bytes(*linear_dims(module), storage.bits, storage.group_size)
    if storage.semi_structured:
        return p.numel() * dtype_bytes // 2 + p.numel() // 8  # kept half + 2 bits per kept value
    return p.numel() * dtype_bytes


def recipe_storages(stages: list[str], quant: Any, prune: Any, dtype: str) -> list[Storage]:
    """dense, then one Storage per model-changing stage of the recipe, cumulative."""
    result = [Storage("dense", f"{dtype} dense")]
    semi = False
    for stage in stages:
        if stage == "prune":
            semi = prune.pattern == "2:4"
            what = f"{prune.method} {prune.pattern if prune.pattern != 'unstructured' else prune.sparsity}"
            how = "2:4 semi-structured storage" if semi else "dense storage"
            result.append(Storage("prune", f"{what} ({how})", semi_structured=semi))
        elif stage == "quantize":
            if quant.bits not in (2, 3, 4, 8):
                raise ShrinkError(f"quant.bits: {quant.bits} is not supported (2 | 3 | 4 | 8)")
            g = "per-channel" if quant.group_size == -1 else f"g{quant.group_size}"
            result.append(Storage("quantize", f"{quant.method} {quant.bits}-bit {g}", bits=quant.bits,
                                  group_size=quant.group_size))
        elif stage == "distill":
            log.warning("plan: the distill stage changes the architecture; plan the student's config instead")
    return result
