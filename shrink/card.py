"""The model card README.md written beside every exported model."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from shrink.pipeline import RunState


def model_card(state: "RunState") -> str:
    cfg = state.cfg
    tags = ["shrink"] + [s for s in cfg.pipeline.stages if s in ("distill", "prune", "quantize")]
    q = state.quantization_config
    if q is not None:
        tags += ["gptq", f"{q['bits']}-bit"]
    meta = ["---", f"base_model: {json.dumps(str(cfg.model.path))}", "library_name: transformers",
            "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines = [f"# {state.model.config.model_type} compressed with shrink", "",
             f"Pipeline: {' -> '.join(cfg.pipeline.stages)}", ""]
    if state.metrics.get("ppl") or state.metrics.get("baseline_ppl"):
        lines += ["| eval set | perplexity | baseline |", "|---|---|---|"]
        for name, ppl in state.metrics.get("ppl", {}).items():
            base = state.metrics.get("baseline_ppl", {}).get(name)
            lines.append(f"| {name} | {ppl:.3f} | {'' if base is None else f'{base:.3f}'} |")
        lines.append("")
    lines += ["## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", ""]
    if q is not None:
        lines += ["GPTQ checkpoints load in transformers with `optimum` and `gptqmodel` installed;",
                  "without them, `from quant.export import load_quantized_model` (pure PyTorch) loads it.", ""]
    lines += ["## Recipe", "", "```yaml", OmegaConf.to_yaml(cfg, resolve=True).rstrip(), "```", ""]
    return "\n".join(meta + lines)
