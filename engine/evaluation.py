"""Perplexity by the protocol of ../shared/README.md: exp(mean NLL) over every predicted
token of independent windows, the NLL computed in fp32 whatever the model's dtype."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.progress import Progress


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str = "cpu", label: str = "eval") -> float:
    """Perplexity of `model` on token windows [n, seq_len]; the model must already be on device."""
    nll = 0.0
    count = 0
    progress = Progress(label, windows.shape[0], unit="tok")
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # fp32 log-softmax: fp16 logits lose the tail of the distribution
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        progress.update(batch.shape[0], batch.numel(), extra=f"ppl so far {math.exp(nll / count):.3f}")
    if not math.isfinite(nll):
        return float("inf")
    return math.exp(nll / count)
