"""`shrink plan`'s arguments: key=value parsing, the target spec, and the two inputs read from
disk (the model's config.json and the recipe, composed like a run)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.errors import ShrinkError
from engine.modeling import read_config_file
from shrink.plan.memory import DTYPE_BYTES, Target

DEFAULT_RESERVE = 0.10
TARGET_RE = re.compile(r"^(?P<n>\d+)x(?P<name>[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*?)-(?P<gb>\d+(?:\.\d+)?)GB$", re.I)
PLAN_KEYS = {"model.path", "target", "batch", "context", "dtype", "reserve", "out", "recipe",
             "model.trust_remote_code"}
RECIPE_PREFIXES = ("pipeline", "quant.", "prune.")


def parse_target(spec: str, reserve: float = DEFAULT_RESERVE) -> Target:
    match = TARGET_RE.match(spec.strip())
    if not match or int(match["n"]) < 1 or float(match["gb"]) <= 0:
        raise ShrinkError(f"target: {spec!r} is not NxNAME-XXGB (e.g. 1xH100-80GB, 4xA100-80GB, 8xA100-40GB)")
    if not 0 <= reserve < 1:
        raise ShrinkError(f"reserve: {reserve} must be in [0, 1)")
    return Target(spec=spec, count=int(match["n"]), name=match["name"], gib=float(match["gb"]), reserve=reserve)


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
    raw = read_config_file(file)  # the run's own check of a config: JSON, model_type, every size given
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
