"""Model folders as the application reads and writes them: dense or GPTQ, one way each.

The engine loads dense folders and knows no quantization format; here a GPTQ folder is
handed to quant's loader, and a quantized model is written in the GPTQ layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.config import ModelConfig
from engine.experts import fuse_experts, split_experts
from engine.modeling import load_model as load_dense_or_quantized
from quant.export import load_quantized_model, save_gptq_model


def load_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer from cfg.path, GPTQ folders through the project's own loader."""
    return load_dense_or_quantized(cfg, quantized_loader=load_quantized_model)


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path,
                      quantization_config: Optional[dict[str, Any]], float_dtype: Optional[torch.dtype] = None) -> None:
    """Weights (safetensors; the GPTQ layout when quantized, its float tensors in float_dtype)
    and tokenizer into an empty folder."""
    if quantization_config is not None:
        save_gptq_model(model, folder, quantization_config, overwrite=True, float_dtype=float_dtype)
    else:
        # split experts go back to transformers' fused layout, which it writes under the
        # family's on-disk per-expert names; the model in memory stays split
        if fuse_experts(model):
            try:
                model.save_pretrained(folder, safe_serialization=True)
            finally:
                split_experts(model)
        else:
            model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
