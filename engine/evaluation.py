"""Perplexity by the protocol of ../shared/README.md: exp(mean NLL) over every predicted
token of independent windows, the NLL computed in fp32 whatever the model's dtype; and on
the same windows bits per byte and per character, which compare across tokenizers:
NLL summed in nats / ln 2 / the UTF-8 bytes (characters) the predicted tokens cover."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.progress import Progress


def exp_nll(nll: float, tokens: int) -> float:
    """exp(mean NLL); inf for a model so bad that the mean is past exp's range, where math.exp
    would raise OverflowError, or not finite at all (NaN logits)."""
    mean = nll / tokens
    return math.exp(mean) if math.isfinite(mean) and mean <= math.log(sys.float_info.max) else float("inf")


@dataclass
class Measured:
    """Sums over the predicted tokens of some windows."""
    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0
    chars: int = 0

    @property
    def ppl(self) -> float:
        return exp_nll(self.nll, self.tokens)

    @property
    def bits_per_byte(self) -> Optional[float]:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    @property
    def bits_per_char(self) -> Optional[float]:
        return self.nll / math.log(2) / self.chars if self.chars else None


@torch.inference_mode()
def measure(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device: torch.device | str = "cpu",
            label: str = "eval", lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> Measured:
    """NLL of `model` on token windows [n, seq_len] (the model already on device); with
    `lengths` = (bytes, chars) per token id (engine.data.token_text_lengths), the bytes and
    characters the predicted tokens cover."""
    m = Measured()
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
        m.nll += float(loss)
        m.tokens += batch[:, 1:].numel()
        if lengths is not None:
            targets = batch[:, 1:].cpu()
            m.bytes += int(lengths[0][targets].sum())
            m.chars += int(lengths[1][targets].sum())
        progress.update(batch.shape[0], batch.numel(), extra=f"ppl so far {exp_nll(m.nll, m.tokens):.3f}")
    return m


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               device: torch.device | str = "cpu", label: str = "eval") -> float:
    """Perplexity of `model` on token windows [n, seq_len]; the model must already be on device."""
    return measure(model, windows, batch_size, device, label).ppl
