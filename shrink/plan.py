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
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.errors import ShrinkError
from engine.modeling import linear_dims
from quant.config import check_quant_config

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
    from shrink.config import CONF_DIR, compose

    if args.recipe is not None and not args.recipe.is_file():
        raise ShrinkError(f"recipe: {args.recipe} not found (a run's recipe.yaml)")
    conf_dir = args.recipe.resolve().parent if args.recipe else CONF_DIR
    name = args.recipe.stem if args.recipe else "config"
    try:
        cfg = compose(args.overrides, conf_dir, name)
    except ShrinkError as exc:
        raise ShrinkError(f"plan: {exc}") from None
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
    for stage in stages:
        if stage == "prune":
            semi = prune.pattern == "2:4"
            what = f"{prune.method} {prune.pattern if prune.pattern != 'unstructured' else prune.sparsity}"
            how = "2:4 semi-structured storage" if semi else "dense storage"
            result.append(Storage("prune", f"{what} ({how})", semi_structured=semi))
        elif stage == "quantize":
            check_quant_config(quant)
            g = "per-channel" if quant.group_size == -1 else f"g{quant.group_size}"
            result.append(Storage("quantize", f"{quant.method} {quant.bits}-bit {g}", bits=quant.bits,
                                  group_size=quant.group_size))
        elif stage == "distill":
            log.warning("plan: the distill stage changes the architecture; plan the student's config instead")
    return result


def price_units(model: nn.Module, units: list[Unit], storage: Storage, dtype_bytes: int,
                linears: set[str]) -> list[Unit]:
    seen: set[int] = set()
    priced = []
    for unit in units:
        weight = sum(price_module(model.get_submodule(m), m, storage, dtype_bytes, linears, seen)
                     for m in unit.modules)
        priced.append(Unit(unit.label, unit.modules, weight, unit.kv_bytes))
    return priced


def merge(label: str, units: list[Unit]) -> Unit:
    return Unit(label, [m for u in units for m in u.modules], sum(u.weight_bytes for u in units),
                sum(u.kv_bytes for u in units))


# ---------------------------------------------------------------------------- placement
def balance(sizes: list[int], parts: int) -> list[int]:
    """Cut points of the contiguous split of `sizes` into `parts` runs (runs may be empty)
    that minimizes the largest run sum: exact DP, O(parts x n^2), trivial for n ~ 100."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best = [[math.inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append(i)
        i = cut[k][i]
    return [0] + bounds[::-1]  # runs are sizes[bounds[d]:bounds[d + 1]]


def place(units: list[Unit], target: Target) -> tuple[list[list[Unit]], list[Unit]]:
    """(units per GPU, units offloaded to CPU). Balanced when everything fits; otherwise
    GPUs are filled in order and the rest goes to the CPU (accelerate's offload)."""
    usable = target.usable_bytes
    too_big = [u for u in units if u.total > usable]
    if too_big:
        u = too_big[0]
        raise ShrinkError(f"target: {u.label} alone needs {gib(u.total)} but one {target.name} has "
                          f"{gib(usable)} usable ({target.gib:g} GiB, {target.reserve:.0%} reserve); "
                          "nothing can be placed")
    bounds = balance([u.total for u in units], target.count)
    runs = [units[bounds[d]:bounds[d + 1]] for d in range(target.count)]
    if max(sum(u.total for u in run) for run in runs) <= usable:
        return runs, []
    runs, rest = [[] for _ in range(target.count)], list(units)
    for d in range(target.count):
        used = 0
        while rest and used + rest[0].total <= usable:
            used += rest[0].total
            runs[d].append(rest.pop(0))
    return runs, rest


def device_map(runs: list[list[Unit]], offloaded: list[Unit]) -> dict[str, Any]:
    """transformers' device_map: module name -> GPU index (or "cpu")."""
    result: dict[str, Any] = {}
    for d, run in enumerate(runs):
        result.update({m: d for u in run for m in u.modules})
    result.update({m: "cpu" for u in offloaded for m in u.modules})
    return result


# ---------------------------------------------------------------------------- the plan
def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def make_plan(args: PlanArgs) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan, device_map) for the last stage of the recipe; raises before anything is written."""
    from engine.modeling import find_linears

    config = load_config(args.model_path, args.trust_remote_code)
    stages, quant, prune = load_recipe(args)
    model = build_meta_model(config)
    layers, kv_heads, head_dim = kv_geometry(config)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    kv_per_layer = 2 * kv_heads * head_dim * args.context * args.batch * dtype_bytes
    head, body, tail, layers_name = split_units(model)
    for unit in body:
        unit.kv_bytes = kv_per_layer
    linears = {f"{u.label}.{name}" for u in body for name in find_linears(model.get_submodule(u.label))}
    params = sum(p.numel() for p in model.parameters())
    stage_reports, final_units = [], []
    for storage in recipe_storages(stages, quant, prune, args.dtype):
        units = price_units(model, head + body + tail, storage, dtype_bytes, linears)
        units = [merge("embeddings", units[:len(head)]), *units[len(head):len(units) - len(tail)],
                 merge("final norm + lm_head", units[len(units) - len(tail):])]
        stage_reports.append(stage_report(storage, units, args.target))
        final_units = units
    runs, offloaded = place(final_units, args.target)
    dmap = device_map(runs, offloaded)
    plan = {
        "model": {"path": str(args.model_path), "model_type": config.model_type,
                  "architecture": type(model).__name__, "params": params, "layers": layers,
                  "layers_module": layers_name, "kv_heads": kv_heads, "head_dim": head_dim,
                  "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False))},
        "target": {**asdict(args.target), "device_bytes": args.target.device_bytes,
                   "usable_bytes": args.target.usable_bytes},
        "workload": {"batch": args.batch, "context": args.context, "dtype": args.dtype,
                     "kv_cache_bytes": kv_per_layer * layers, "kv_cache_bytes_per_layer": kv_per_layer},
        "recipe": {"stages": stages, "source": str(args.recipe) if args.recipe else "conf/config.yaml",
                   "overrides": args.overrides},
        "stages": stage_reports,
        "device_map_stage": stage_reports[-1]["name"],
        "fits": not offloaded,
        "devices": [device_report(d, run) for d, run in enumerate(runs)],
        "offloaded_to_cpu": [m for u in offloaded for m in u.modules],
    }
    return plan, dmap


def stage_report(storage: Storage, units: list[Unit], target: Target) -> dict[str, Any]:
    weights = sum(u.weight_bytes for u in units)
    kv = sum(u.kv_bytes for u in units)
    bounds = balance([u.total for u in units], target.count)
    per_device = [sum(u.total for u in units[bounds[d]:bounds[d + 1]]) for d in range(target.count)]
    return {"name": storage.name, "description": storage.description, "weights_bytes": weights,
            "embeddings_bytes": units[0].weight_bytes, "layers_bytes": weights - units[0].weight_bytes
            - units[-1].weight_bytes, "head_bytes": units[-1].weight_bytes, "kv_cache_bytes": kv,
            "total_bytes": weights + kv, "balanced_per_device_bytes": per_device,
            "fits": max(per_device) <= target.usable_bytes}


def device_report(d: int, run: list[Unit]) -> dict[str, Any]:
    layer_ids = [int(u.label.rsplit(".", 1)[1]) for u in run if u.label.rsplit(".", 1)[-1].isdigit()]
    return {"device": d, "layers": f"{layer_ids[0]}-{layer_ids[-1]}" if layer_ids else "",
            "num_layers": len(layer_ids), "units": [u.label for u in run],
            "weights_bytes": sum(u.weight_bytes for u in run), "kv_bytes": sum(u.kv_bytes for u in run),
            "total_bytes": sum(u.total for u in run)}


def format_plan(plan: dict[str, Any]) -> str:
    m, t, w = plan["model"], plan["target"], plan["workload"]
    lines = [f"{m['architecture']} ({m['params'] / 1e9:.2f}B params, {m['layers']} layers, "
             f"{m['kv_heads']} KV heads x {m['head_dim']}) on {t['spec']}: "
             f"{gib(t['usable_bytes'])} usable per GPU ({t['reserve']:.0%} reserve)",
             f"KV cache: batch {w['batch']} x context {w['context']} ({w['dtype']}) = {gib(w['kv_cache_bytes'])}",
             "", f"| stage | weights | KV cache | total | largest GPU | fits {t['spec']} |", "|---|---|---|---|---|---|"]
    for s in plan["stages"]:
        lines.append(f"| {s['description']} | {gib(s['weights_bytes'])} | {gib(s['kv_cache_bytes'])} | "
                     f"{gib(s['total_bytes'])} | {gib(max(s['balanced_per_device_bytes']))} | "
                     f"{'yes' if s['fits'] else 'no'} |")
    lines += ["", f"device map ({plan['device_map_stage']}):", "", "| GPU | layers | holds | weights | KV | total |",
              "|---|---|---|---|---|---|"]
    for d in plan["devices"]:
        extra = [u for u in d["units"] if not u.rsplit(".", 1)[-1].isdigit()]
        lines.append(f"| {d['device']} | {d['layers'] or '-'} ({d['num_layers']}) | {', '.join(extra) or '-'} | "
                     f"{gib(d['weights_bytes'])} | {gib(d['kv_bytes'])} | {gib(d['total_bytes'])} |")
    if plan["offloaded_to_cpu"]:
        lines += ["", f"does NOT fit: {len(plan['offloaded_to_cpu'])} modules offloaded to cpu"]
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def run_plan(argv: list[str]) -> dict[str, Any]:
    """`shrink plan key=value...`: compute, then write plan.json + device_map.json into out."""
    args = parse_plan_args(argv)
    plan, dmap = make_plan(args)
    plan["device_map_file"] = "device_map.json"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "device_map.json", dmap)
    write_json_atomic(args.out / "plan.json", plan)
    print(format_plan(plan))
    print(f"\nwrote {args.out / 'plan.json'} and {args.out / 'device_map.json'}")
    return plan
