"""The model card README.md written beside every exported model.

It makes the exported folder a ready-to-push Hugging Face repo: YAML metadata the Hub
indexes (base_model, license, tags, quantization), the measured figures, how to load it,
and the recipe that made it. Nothing here guesses silently: a license that cannot be
found in the input's own card, config or GGUF header becomes `other` with a visible note.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml
from omegaconf import OmegaConf

from engine.experts import split_modules
from engine.gguf_import import import_dir

if TYPE_CHECKING:
    from engine.state import RunState

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_URL = re.compile(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$")
MIB = 1024**2


# ---------------------------------------------------------------------------- provenance
def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML block between leading '---' lines of a model card ({} when absent or broken)."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _input_card(folder: Path) -> dict[str, Any]:
    card = folder / "README.md"
    return read_front_matter(card.read_text(errors="replace")) if card.is_file() else {}


def _input_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _gguf_fields(spec: Optional[str]) -> dict[str, Any]:
    """general.* strings of the GGUF the model was imported from (license, source repo)."""
    if not spec:
        return {}
    try:
        import gguf

        from engine.gguf_import import resolve_gguf

        reader = gguf.GGUFReader(str(resolve_gguf(spec)))
        return {k: f.contents() for k, f in reader.fields.items()
                if k.startswith("general.") and isinstance(f.contents(), str)}
    except Exception as exc:  # provenance is best effort: a card must never fail an export
        log.debug("no GGUF metadata for the card: %s", exc)
        return {}


def base_model_id(model_path: str, config: dict[str, Any], gguf: dict[str, Any]) -> tuple[str, bool]:
    """(id, is_hub_id): a Hub id when one is known, else the local folder's name."""
    candidates = [model_path, str(config.get("_name_or_path", ""))]
    candidates += [gguf.get(k, "") for k in ("general.base_model.0.repo_url", "general.source.repo_url")]
    for c in candidates:
        url = HUB_URL.match(c)
        if url:
            return url.group(1), True
        if HUB_ID.match(c) and not Path(c).expanduser().exists():
            return c, True
    return Path(model_path).name or "unknown", False


def license_of(card: dict[str, Any], config: dict[str, Any], gguf: dict[str, Any]) -> dict[str, Any]:
    """license (+ license_name/link) from the input card, its config, or its GGUF header."""
    if card.get("license"):
        return {k: card[k] for k in ("license", "license_name", "license_link") if card.get(k)}
    for value in (config.get("license"), gguf.get("general.license")):
        if isinstance(value, str) and value:
            return {"license": value.lower()}
    return {"license": "other", "license_name": "unknown"}


# ---------------------------------------------------------------------------- figures
def measured(state: "RunState") -> dict[str, Any]:
    """params, weight bytes, bits/weight and sparsity of the model being exported.

    The card is written before the weights (export is atomic), so size is the bytes of the
    unique tensors that will be saved, which is the safetensors size up to its headers.
    """
    from engine.metrics import size_metrics, sparsity_report, state_bytes

    metrics = state.metrics
    if "size_bytes" in metrics and "params" in metrics:
        return {k: metrics.get(k) for k in ("params", "size_bytes", "bits_per_weight", "sparsity")}
    try:
        sparsity = sparsity_report(state.model)["overall"]
    except Exception as exc:  # an architecture without discoverable layers still gets a card
        log.debug("sparsity not measured for the card: %s", exc)
        sparsity = None
    from quant.export import export_float_dtype

    quantized = state.quantization_config is not None
    size = state_bytes(state.model, export_float_dtype(state.cfg.quant) if quantized else None)
    return {**size_metrics(state.model, size), "sparsity": sparsity}


# ---------------------------------------------------------------------------- card
def card_metadata(state: "RunState") -> dict[str, Any]:
    cfg = state.cfg
    folder = Path(str(cfg.model.path)).expanduser()
    # model.gguf is only the source when model.path is its import folder (as in the pipeline);
    # a preset's gguf left beside an overridden model.path says nothing about that model.
    spec = cfg.model.get("gguf")
    from_gguf = bool(spec) and folder == import_dir(spec)
    config, gguf = _input_config(folder), _gguf_fields(spec if from_gguf else None)
    base, _ = base_model_id(str(cfg.model.path), config, gguf)
    stages = list(cfg.pipeline.stages)
    tags = ["shrink"]
    meta: dict[str, Any] = {"base_model": base}
    quant_config = state.quantization_config
    if quant_config is not None:
        meta["base_model_relation"] = "quantized"
        tags += [quant_config.get("quant_method", "gptq"), f"{quant_config['bits']}-bit", "quantized"]
    if "prune" in stages:
        tags += ["pruned", str(cfg.prune.method)] + (["sparse-2of4"] if cfg.prune.pattern == "2:4" else [])
    if "distill" in stages:
        tags += ["distilled"]
    meta.update(license_of(_input_card(folder), config, gguf))
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags,
                 "quantized_by": "shrink"})
    if quant_config is not None:
        awq = quant_config.get("quant_method") == "awq"  # AWQ's config has no sym/desc_act: no g_idx, zero points
        meta["quantization"] = {"method": str(cfg.quant.method), "format": quant_config.get("format", "gptq"),
                                "layout": quant_config.get("quant_method", "gptq"),
                                "bits": quant_config["bits"], "group_size": quant_config["group_size"],
                                "sym": bool(cfg.quant.sym) if awq else quant_config["sym"],
                                "desc_act": False if awq else quant_config["desc_act"]}
    return meta


def summary(state: "RunState") -> str:
    cfg, parts = state.cfg, []
    for stage in cfg.pipeline.stages:
        if stage == "distill":
            parts.append(f"distilled ({cfg.distill.loss} loss)")
        elif stage == "prune":
            how = cfg.prune.pattern if cfg.prune.pattern != "unstructured" else f"{cfg.prune.sparsity:.0%} unstructured"
            rec = ", kept weights re-solved" if cfg.prune.reconstruct else ""
            parts.append(f"pruned with {cfg.prune.method} ({how}{rec})")
        elif stage == "quantize":
            groups = "per-channel" if cfg.quant.group_size == -1 else f"group size {cfg.quant.group_size}"
            layout = (state.quantization_config or {}).get("quant_method", "gptq").upper()
            parts.append(f"quantized to {cfg.quant.bits} bits with {cfg.quant.method} ({groups}, {layout} layout)")
    return ", then ".join(parts) or "re-exported"


def results_section(state: "RunState") -> list[str]:
    lines = ["## Results", ""]
    ppl, base = state.metrics.get("ppl", {}), state.metrics.get("baseline_ppl", {})
    if ppl or base:
        bpb, base_bpb = state.metrics.get("bits_per_byte", {}), state.metrics.get("baseline_bits_per_byte", {})
        windows = state.metrics.get("eval_windows", {})
        lines += ["| eval set | perplexity | baseline | change | bits per byte | baseline | windows |",
                  "|---|---|---|---|---|---|---|"]
        for name in dict.fromkeys([*ppl, *base]):
            value, baseline = ppl.get(name), base.get(name)
            change = f"{(value / baseline - 1):+.1%}" if value is not None and baseline else ""
            counted_windows = windows.get(name)
            counted = f"{counted_windows['evaluated']} of {counted_windows['total']}" if counted_windows else ""
            lines.append(f"| {name} | {num(value, '.3f')} | {num(baseline, '.3f')} | {change} | "
                         f"{num(bpb.get(name), '.4f')} | "
                         f"{num(base_bpb.get(name), '.4f')} | {counted} |")
        lines += ["", "Perplexity: exp(mean NLL) over non-overlapping windows (GPTQ/SparseGPT protocol); bits per "
                  "byte: the same NLL / ln 2 / the UTF-8 bytes the predicted tokens cover (compares across "
                  "tokenizers); windows: evaluated of the file's total.", ""]
    lines += tasks_section(state.metrics)
    metrics = measured(state)
    fmt = {"params": lambda v: f"{v / 1e6:.1f}M", "size_bytes": lambda v: f"{v / MIB:.2f} MiB",
           "bits_per_weight": lambda v: f"{v:.2f}", "sparsity": lambda v: f"{v:.1%}"}
    cells = [fmt[k](metrics[k]) if metrics.get(k) is not None else "" for k in fmt]
    lines += ["| parameters | weights size | bits per weight | sparsity |", "|---|---|---|---|",
              "| " + " | ".join(cells) + " |", ""]
    return lines


def num(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def tasks_section(metrics: dict[str, Any]) -> list[str]:
    """lm-eval task accuracy ± stderr, before (baseline) and after."""
    tasks, base = metrics.get("tasks") or {}, metrics.get("baseline_tasks") or {}
    if not tasks and not base:
        return []
    lines = ["| task | metric | this model | baseline | items |", "|---|---|---|---|---|"]
    for name in dict.fromkeys([*tasks, *base]):
        figures, before = tasks.get(name) or {}, base.get(name) or {}
        for key in [k for k in ("acc", "acc_norm") if k in figures or k in before]:
            cells = [f"{f[key]:.3f} ± {f.get(key + '_stderr', 0.0):.3f}" if key in f else "" for f in (figures, before)]
            lines.append(f"| {name} | {key} | {cells[0]} | {cells[1]} | {figures.get('samples', before.get('samples', ''))} |")
    return lines + ["", "Tasks: lm-evaluation-harness, accuracy ± its standard error.", ""]


def load_section(quant_config: Optional[dict[str, Any]], experts: bool) -> list[str]:
    """How to serve and load the folder, by what reads it: vLLM where it serves the layout;
    transformers (+ optimum + gptqmodel) reads neither per-expert packed tensors nor packed ends
    (it would leave them uninitialised)."""
    from quant.layout import vllm_serves

    ends = bool(quant_config and (quant_config.get("lm_head") or quant_config.get("dynamic")))
    ours = ["```python", "from quant.export import load_quantized_model", "",
            'model = load_quantized_model("PATH")', "```", ""]
    lines = ["## How to load", ""]
    if quant_config is None or vllm_serves(quant_config):
        lines += ["Serve it with vLLM (`--tensor-parallel-size N` over N GPUs):", "", "```bash",
                  "vllm serve REPO_ID_OR_PATH", "```", ""]
    layout = (quant_config or {}).get("quant_method", "gptq").upper()
    if quant_config is not None and (experts or ends):
        what = f"its per-expert {layout} tensors" if experts else "its packed input embedding / output head"
        also = " gptqmodel (`GPTQModel.load`) reads it too." if ends and not experts and quant_config.get("sym") else ""
        return lines + [f"transformers + optimum do not read {what} (nor does transformers' AWQ path): load it "
                        f"with shrink's pure-PyTorch loader.{also}", "", *ours]
    lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("REPO_ID_OR_PATH")',
              'tokenizer = AutoTokenizer.from_pretrained("REPO_ID_OR_PATH")', "```", ""]
    if quant_config is not None and layout == "AWQ":
        lines += ["This is a GPTQ-calibrated model in AWQ's GEMM layout (`quantization_config` in config.json:",
                  "asymmetric 4-bit groups with zero points): transformers loads it with `pip install gptqmodel`.",
                  "Without it, shrink's pure-PyTorch loader reads it anywhere:", "", *ours]
    elif quant_config is not None:
        lines += ["This is a standard GPTQ checkpoint (`quantization_config` in config.json, `quantize_config.json`):",
                  "transformers loads it with `pip install optimum gptqmodel`. Without them, shrink's pure-PyTorch",
                  "loader reads it anywhere:", "", *ours]
    return lines


def _arg(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_section(state: "RunState") -> list[str]:
    cfg = state.cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("out", "resume", "fingerprints"):
        plain.pop(key, None)
    keys = [f"pipeline={cfg.pipeline.name}", f"model.path={cfg.model.path}"]
    if "quantize" in cfg.pipeline.stages:
        keys += [f"quant.{k}={_arg(cfg.quant[k])}" for k in ("method", "bits", "group_size", "sym", "act_order")]
        keys += ["quant.lm_head=true"] if cfg.quant.lm_head else []
        keys += [f"quant.{k}={cfg.quant[k]}" for k in ("embed_bits", "embed_group_size")] \
            if cfg.quant.embed_bits is not None else []
    if "prune" in cfg.pipeline.stages:
        keys += [f"prune.{k}={_arg(cfg.prune[k])}" for k in ("method", "sparsity", "pattern")]
        keys += ["prune.reconstruct=true"] if cfg.prune.reconstruct else []
    return ["## Recipe", "", "Made with shrink by:", "", "```bash",
            "shrink " + " ".join(keys), "```", "",
            "The full resolved configuration (the run's `recipe.yaml` also records input hashes and versions):",
            "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(plain)).rstrip(), "```", ""]


def model_card(state: "RunState") -> str:
    """README.md for the exported folder: YAML front matter, results, loading, recipe."""
    meta = card_metadata(state)
    title = f"{meta['base_model']}, compressed with shrink"
    lines = [f"# {title}", "", f"`{meta['base_model']}` {summary(state)}.", ""]
    experts = bool(split_modules(state.model)) if state.model is not None else False
    lines += results_section(state) + load_section(state.quantization_config, experts) + recipe_section(state)
    lines += ["## License", ""]
    if meta["license"] == "other" and meta.get("license_name") == "unknown":
        lines += ["The base model's license could not be determined from its model card, config or GGUF "
                  "header: set `license` in the metadata above to the base model's license before publishing.", ""]
    else:
        lines += [f"Same license as the base model: `{meta['license']}`.", ""]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines)
