"""Measured figures of a model for metrics.json: size, sparsity, bits, peak memory."""
from __future__ import annotations

import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.modeling import count_parameters, find_decoder_layers, find_linears, is_packed_linear, weight_matrix
from engine.weights import DTYPE_BYTES, read_headers, unique_tensors


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process, and peak CUDA allocation if any."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    cuda = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0
    return {"cpu": int(cpu), "cuda": cuda}


def decoder_weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dense [out, in] weights of every Linear in the decoder layers (dequantized if needed)."""
    name, layers = find_decoder_layers(model)
    result = {}
    for i, layer in enumerate(layers):
        for lname, module in find_linears(layer).items():
            result[f"{name}.{i}.{lname}"] = weight_matrix(module)
        for lname, module in layer.named_modules():
            if is_packed_linear(module):
                result[f"{name}.{i}.{lname}"] = module.dequantize()
    return result


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Fraction of exact zeros per decoder-layer Linear and overall."""
    per_layer = {}
    zeros = total = 0
    for name, W in decoder_weight_matrices(model).items():
        z = int((W == 0).sum())
        per_layer[name] = z / W.numel()
        zeros += z
        total += W.numel()
    return {"overall": zeros / total if total else 0.0, "per_linear": per_layer}


def state_bytes(model: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's unique tensors: what safetensors writes, up to its headers;
    with float_dtype, floating tensors counted at its size (a GPTQ export that writes them so;
    packed layers' scales keep theirs)."""
    unique, _ = unique_tensors(model.state_dict())
    scales = {f"{n}.scales" for n, m in model.named_modules() if is_packed_linear(m)}

    def nbytes(k: str, t: torch.Tensor) -> int:
        cast = float_dtype is not None and t.is_floating_point() and k not in scales
        return t.numel() * (torch.empty((), dtype=float_dtype).element_size() if cast else t.element_size())

    return sum(nbytes(k, t) for k, t in unique.items())


def size_parts(model: nn.Module, folder: Path) -> dict[str, dict[str, Any]]:
    """params, bytes on disk and bits per weight of the decoder layers and of everything else
    (embeddings, an untied lm_head, final norm) of an exported folder: where the bits go."""
    name, layers = find_decoder_layers(model)
    inside = count_parameters(layers)
    sizes = {"decoder_layers": 0, "outside_layers": 0}
    for key, header in read_headers(folder).items():
        part = "decoder_layers" if key.startswith(f"{name}.") else "outside_layers"
        sizes[part] += math.prod(header.shape) * DTYPE_BYTES[header.dtype]
    params = {"decoder_layers": inside, "outside_layers": count_parameters(model) - inside}
    return {part: {"params": params[part], "bytes": sizes[part],
                   "bits_per_weight": 8.0 * sizes[part] / params[part] if params[part] else 0.0} for part in sizes}


def size_metrics(model: nn.Module, size_bytes: int) -> dict[str, Any]:
    """params, size and bits per weight (8 x bytes / params), as metrics.json and the card report them."""
    params = count_parameters(model)
    return {
        "params": params,
        "size_bytes": int(size_bytes),
        "bits_per_weight": 8.0 * size_bytes / params if params else 0.0,
    }
