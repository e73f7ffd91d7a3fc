"""QuantLinear: a pure-torch Linear whose weight lives in GPTQ-packed form.

The buffers (qweight, qzeros, scales, g_idx, bias) have exactly the names, shapes and
dtypes of the GPTQ checkpoint format, so a QuantLinear's state_dict *is* the checkpoint
entry for that layer and can be written/read with safetensors without translation.

Forward dequantizes to a dense [out, in] weight and calls F.linear. Choice: by default the
dense weight is cached lazily, per (dtype, device), the first time forward runs. Why: this
module exists for portability and for checking exported checkpoints on CPU, not for speed;
caching makes repeated forwards (evaluation loops) as fast as nn.Linear at the cost of
holding one dense copy. Pass ``cache_weight=False`` to dequantize on every call instead
(memory stays at the packed size; each call pays an unpack). The cache is a plain
attribute, never a buffer, so it never enters state_dict, and it is keyed on the buffers'
identity and version counters so load_state_dict / in-place edits invalidate it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant.grid import check_bits
from quant.pack import dequantize_gptq, pack_gptq


class QuantLinear(nn.Module):
    """GPTQ-packed linear layer, weight in nn.Linear orientation [out, in] once dequantized."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        n_groups: int | None = None,
        cache_weight: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float16,
        checkpoint_format: str = "gptq",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if in_features % 32 or out_features % 32:
            raise ValueError(
                f"GPTQ packing needs in/out features divisible by 32, got {in_features}x{out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        # -1 means one group spanning all inputs (per-channel), as in GPTQ configs.
        self.group_size = group_size
        if n_groups is None:
            n_groups = 1 if group_size in (-1, 0) else math.ceil(in_features / group_size)
        self.cache_weight = cache_weight
        # "gptq" (v1: qzeros hold z-1) or "gptq_v2" (qzeros hold z); see quant/pack.py.
        self.checkpoint_format = checkpoint_format
        # Placeholder buffers of the exact checkpoint shapes: load_state_dict fills them, and
        # their shapes must already match for strict loading.
        kw: dict[str, Any] = {"device": device}
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, **kw))
        default_gidx = torch.arange(in_features, dtype=torch.int32, device=device)
        if group_size not in (-1, 0):
            default_gidx = default_gidx // group_size
        else:
            default_gidx = torch.zeros_like(default_gidx)
        self.register_buffer("g_idx", default_gidx)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw))
        else:
            self.bias = None
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_packed(
        cls,
        packed: dict[str, torch.Tensor],
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        cache_weight: bool = True,
        checkpoint_format: str = "gptq",
    ) -> "QuantLinear":
        """Build from pack_gptq's output ({"qweight","qzeros","scales","g_idx"})."""
        qweight = packed["qweight"]
        in_features = qweight.shape[0] * 32 // bits
        out_features = qweight.shape[1]
        n_groups = packed["scales"].shape[0]
        layer = cls(
            in_features, out_features, bits, group_size, bias=bias is not None,
            n_groups=n_groups, cache_weight=cache_weight, device=qweight.device,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
            checkpoint_format=checkpoint_format,
        )
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            src = packed[name]
            dst = getattr(layer, name)
            if src.shape != dst.shape:
                raise ValueError(f"{name}: got shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            setattr(layer, name, src.detach().clone().to(dst.dtype))
        if bias is not None:
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_result(
        cls,
        result: Any,
        bias: torch.Tensor | None = None,
        cache_weight: bool = True,
        checkpoint_format: str = "gptq",
    ) -> "QuantLinear":
        """Build from a QuantResult-like object (codes, scale, zero, g_idx, bits, group_size)."""
        packed = pack_gptq(result.codes, result.scale, result.zero, result.g_idx, result.bits, checkpoint_format)
        return cls.from_packed(
            packed, result.bits, result.group_size, bias=bias, cache_weight=cache_weight,
            checkpoint_format=checkpoint_format,
        )

    # ------------------------------------------------------------------ compute
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight [out, in] (fresh tensor, never the cache)."""
        return dequantize_gptq(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
            dtype=dtype, checkpoint_format=self.checkpoint_format,
        )

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        bufs = (self.qweight, self.qzeros, self.scales, self.g_idx)
        return (dtype, self.qweight.device) + tuple((id(b), b._version) for b in bufs)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        if not self.cache_weight:
            return self.dequantize(dtype)
        key = self._cache_key(dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dequantize(dtype))
        return self._cache[1]

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # .to()/.half()/.cuda() replace buffers; drop the cache so it is rebuilt for the new
        # device instead of keeping a stale copy alive.
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class QuantEmbedding(QuantLinear):
    """A GPTQ-packed input embedding, in gptqmodel 7.6's layout (its TorchQuantEmbeddings): the
    table [vocab, dim] is packed as a Linear with in_features = vocab and out_features = dim,
    so a group is group_size consecutive tokens of one embedding column. Looking ids up
    dequantizes that [dim, vocab] weight once (cached like QuantLinear's) and reads its columns."""

    def __init__(self, *args: Any, output_dtype: torch.dtype = torch.float16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_dtype = output_dtype  # the dtype the decoder layers expect (the float table's)

    @property
    def num_embeddings(self) -> int:
        return self.in_features

    @property
    def embedding_dim(self) -> int:
        return self.out_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.embedding(ids, self.weight_for(self.output_dtype).t())

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"
