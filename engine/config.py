"""Typed schemas of the engine's own config groups: model, data, eval and pipeline.

The stage groups (quant, prune, distill) keep their schemas next to their code; the
application (shrink/config.py) aggregates them all into one tree for Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.errors import ShrinkError

# Top-level keys of a run's config that say where and how it runs, not what it computes: the
# config digest (resume, recipe re-runs) and the report's setting columns leave them out.
VOLATILE = ("out", "resume", "log_level", "fingerprints")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: low/high bounds (None: unbounded), open or closed."""
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below and value == value  # NaN holds nowhere

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"{'<' if self.open_high else '<='} {self.high:g}"


POSITIVE, NON_NEGATIVE = Range(0, open_low=True), Range(0)
FRACTION, OPEN_FRACTION, FRACTION_BELOW_1 = Range(0, 1), Range(0, 1, True, True), Range(0, 1, open_high=True)


def check_ranges(node: Any, prefix: str, ranges: dict[str, Range]) -> None:
    """Refuse, in one line naming the key, a numeric setting outside its range: the one check of
    every numeric key (each config group keeps its table next to its schema). None passes: it
    means "the default" wherever a key may be None."""
    for key, allowed in ranges.items():
        value = node
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else getattr(value, part, None)
        if value is not None and not allowed.holds(value):
            raise ShrinkError(f"{prefix + '.' if prefix else ''}{key}: {value} must be {allowed}")


def without_volatile(plain: dict[str, Any]) -> dict[str, Any]:
    """A config as a plain dict, without its VOLATILE keys: the settings that change the result."""
    return {key: value for key, value in plain.items() if key not in VOLATILE}


@dataclass
class ModelConfig:
    path: str = "???"
    # A GGUF file (path, or "pkg:<python package>/<file>") imported once into `path`
    # as safetensors when `path` does not exist yet.
    gguf: Optional[str] = None
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "cpu"  # cpu | cuda | auto
    trust_remote_code: bool = False
    # Stream decoder layers from the safetensors shards instead of loading the model whole
    # (engine/streaming.py): true | false | auto (on when the weight files take more than half
    # of the RAM the kernel reports available, MemAvailable).
    lazy: str = "auto"


@dataclass
class CalibDataConfig:
    path: str = "???"
    num_samples: int = 128
    seq_len: int = 512
    # Precision the calibration computes in (the layer forwards over these windows, their Hessians
    # and the solves): auto (float64 on the CPU, where it makes the result the same on every
    # machine; the model's dtype on GPUs) | model | float32 | float64 | bfloat16-autocast (float32
    # with the forwards' matrix products in bfloat16, as AutoRound's AMP: fast on GPUs and on CPUs
    # with AMX or AVX512-BF16; the Hessians and solves stay float32). See engine/calibration.py.
    dtype: str = "auto"


AUTOCAST_SETTING = "bfloat16-autocast"  # data.calib.dtype's mixed-precision value (engine/calibration.py)
CALIB_DTYPES = ("auto", "model", "float32", "float64", AUTOCAST_SETTING)


def check_calib_dtype(value: str) -> None:
    if value not in CALIB_DTYPES:
        raise ShrinkError(f"data.calib.dtype: {value!r} is not one of {' | '.join(CALIB_DTYPES)}")


@dataclass
class EvalPreset:
    """A data preset's own eval file with the name and window cap that belong to that file:
    they apply only while `path` is this file, so an overridden path never inherits them."""
    path: Optional[str] = None
    name: Optional[str] = None
    max_windows: Optional[int] = None


@dataclass
class EvalDataConfig:
    """One eval set (`data.eval`); `data.eval` may also be a list or a {name: set} map of them."""
    path: str = "???"
    name: Optional[str] = None  # key in metrics.json; default: the file's stem
    seq_len: int = 512
    max_windows: Optional[int] = None  # evaluate only the first N windows (None: all)
    preset: EvalPreset = field(default_factory=EvalPreset)


@dataclass(frozen=True)
class EvalSet:
    """One eval set as it will be measured: its name, file, window length and cap."""
    name: str
    path: str
    seq_len: int
    max_windows: Optional[int]
    key: str  # config key it came from, for error messages ("data.eval", "data.eval[1]", ...)


@dataclass
class DataConfig:
    calib: CalibDataConfig = field(default_factory=CalibDataConfig)
    # One EvalDataConfig, a list of them, or a {name: EvalDataConfig} map (checked by eval_sets;
    # typed Any so that a preset or `data.eval=null 'data.eval=[{path: A}, {path: B}]'` can pick the form).
    eval: Any = None
    text_field: str = "text"
    cache_dir: Optional[str] = None  # tokenization cache; default ~/.cache/shrink


@dataclass
class EvalConfig:
    baseline: bool = True  # also evaluate the input model (baseline_ppl)
    batch_size: int = 4
    # CUDA only: run 2:4-pruned Linears on semi-structured sparse kernels when evaluating.
    sparse_kernels: bool = False
    # lm-evaluation-harness tasks (the `eval` extra): names of lm-eval tasks, groups or tags;
    # the package's own offline tasks (shrink/assets/tasks) are always found.
    tasks: list[str] = field(default_factory=list)
    task_dir: Optional[str] = None  # a folder of local lm-eval task YAMLs (lm-eval's include_path)
    num_fewshot: Optional[int] = None  # None: each task's own default
    limit: Optional[float] = None  # items per task (>= 1) or a fraction of them (< 1); None: all


@dataclass
class ExportConfig:
    # Largest safetensors shard a streamed (model.lazy) export writes: bytes, or e.g. "4GB", "512MiB".
    max_shard_size: str = "4GB"
    # Also write out/model.gguf (quant/gguf_export.py: llama.cpp / Ollama) from the quantized model/.
    gguf: bool = False


@dataclass
class PipelineConfig:
    name: str = "eval"
    stages: list[str] = field(default_factory=lambda: ["eval"])


def eval_sets(node: Any) -> list[EvalSet]:
    """The eval sets of `data.eval` (one set, a list or a named map), typed and named, names unique."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if node is None:
        raise ShrinkError("data.eval: no eval set (give data.eval.path)")
    if isinstance(node, ListConfig) or isinstance(node, list):
        entries = [(f"data.eval[{i}]", None, item) for i, item in enumerate(node)]
    elif "path" in node or not all(isinstance(v, (dict, DictConfig)) for v in node.values()):
        entries = [("data.eval", None, node)]
    else:
        entries = [(f"data.eval.{name}", str(name), item) for name, item in node.items()]
    if not entries:
        raise ShrinkError("data.eval: the list of eval sets is empty")
    sets, seen = [], {}
    for key, map_name, item in entries:
        try:
            typed = OmegaConf.merge(OmegaConf.structured(EvalDataConfig), item)
            e = EvalDataConfig(**{k: typed[k] for k in ("path", "name", "seq_len", "max_windows")},
                               preset=EvalPreset(**OmegaConf.to_container(typed.preset, resolve=True)))
        except Exception as exc:  # OmegaConf's validation errors: wrong type, unknown key, missing path
            raise ShrinkError(f"{key}: {str(exc).splitlines()[0]}") from None
        sets.append(resolve_set(e, key, map_name))
        if sets[-1].name in seen:
            raise ShrinkError(f"{key}.name: two eval sets are named {sets[-1].name!r} "
                              f"({seen[sets[-1].name]} and {key}); give each its own data.eval name")
        seen[sets[-1].name] = key
    return sets


def resolve_set(e: EvalDataConfig, key: str, map_name: Optional[str]) -> EvalSet:
    """Name and cap: given ones first, then the preset's when the path is the preset's file,
    else the file's stem and every window."""
    same_file = e.preset.path is not None and same_path(e.path, e.preset.path)
    name = e.name or map_name or (e.preset.name if same_file else None) or Path(e.path).name.split(".")[0]
    cap = e.max_windows if e.max_windows is not None else (e.preset.max_windows if same_file else None)
    if cap is not None and cap <= 0:
        raise ShrinkError(f"{key}.max_windows must be positive, got {cap}")
    return EvalSet(name=name, path=e.path, seq_len=e.seq_len, max_windows=cap, key=key)


def same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


@dataclass
class MoeConfig:
    # Also run every calibration token through every expert, for that expert's statistics
    # only (the block's output keeps the true top-k routing), so rarely routed experts
    # are calibrated too.
    all_experts: bool = True
    # An expert whose statistics saw fewer tokens falls back to RTN (quantize) or
    # magnitude (prune), with a warning.
    min_tokens: int = 32


# Module-name patterns (fnmatch, on the name inside a decoder layer or its last part) kept in
# full precision by default: MoE routers, which are tiny and decide every token's experts.
ROUTER_PATTERNS = ["gate", "router", "shared_expert_gate"]
