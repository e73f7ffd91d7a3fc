"""Kernel: pack / unpack integer GPTQ codes into the standard GPTQ checkpoint tensors.

Layout (the one AutoGPTQ, gptqmodel, optimum, exllama, vLLM, ... all read):

* ``qweight`` int32 ``[in * bits / 32, out]``: packed along the INPUT dim. Every run of 32
  consecutive input rows (of the transposed [in, out] code matrix) becomes ``bits`` int32
  rows. Within a run, value ``j`` (0..31) occupies bit offset ``bits * j`` of a
  little-endian ``32 * bits``-bit stream spread over the ``bits`` words, i.e. low bits
  first. For 2/4/8 bits that is simply "32/bits values per word, value k of the word at
  bits ``[bits*k, bits*(k+1))``". For 3 bits (AutoGPTQ's layout) 32 values fill exactly 3
  words and values 10 and 21 straddle word boundaries: value 10 puts its low 2 bits at
  bits 30-31 of word 0 and its high bit at bit 0 of word 1; value 21 puts its low bit at
  bit 31 of word 1 and its high 2 bits at bits 0-1 of word 2. The bitstream view below
  reproduces that exactly (see AutoGPTQ ``QuantLinear.pack``), so one code path serves
  every width.
  Packing along the input dim is what GPU kernels want: a thread walking one output
  column reads one word and gets 32/bits consecutive reduction-dim weights.
* ``qzeros`` int32 ``[n_groups, out * bits / 32]``: the same bitstream packing but along
  the OUTPUT dim (one row per group). checkpoint_format "gptq" (v1, the default and what
  every reader accepts) stores ``z - 1``: a historical AutoGPTQ quirk whose kernels add 1
  back. So symmetric 4-bit (z = 8) stores 7 everywhere, i.e. qzeros words read 0x77777777.
  Consequence: v1 cannot represent z = 0 (it would store -1). AutoGPTQ's unpack turns that
  into z = 2**bits and gptqmodel's v1->v2 conversion (a packed-word add of 0x11111111)
  carries into the neighbouring zero, so both corrupt the layer. We therefore refuse
  z = 0 in v1 rather than write a checkpoint that other readers misread; asymmetric
  results with z = 0 must be written as checkpoint_format "gptq_v2" (stores z itself,
  read by gptqmodel) or quantized with zeros clamped to >= 1.
* ``scales`` fp16 ``[n_groups, out]`` and ``g_idx`` int32 ``[in]`` (group of each input
  column, in the original column order; act-order just makes it non-monotone).

Dequantization: ``W[o, i] = scales[g_idx[i], o] * (code[o, i] - z[g_idx[i], o])``.

All work is vectorized over the matrix; the only Python loops run over the 32 positions
of a packing run. Imports only torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quant.grid import check_bits

if TYPE_CHECKING:
    from quant.gptq import QuantResult

_MASK32 = (1 << 32) - 1


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 with the same bit pattern (two's complement).

    Done explicitly rather than relying on an overflowing cast, whose behaviour is not
    specified by torch.
    """
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` [n, m] (ints in [0, 2**bits)) along dim 0 into int32 [n*bits/32, m].

    Each run of 32 rows is one little-endian bitstream of ``bits`` words; value j sits at
    stream offset bits*j (low bits first). Values straddling a word boundary (only
    possible for 3 bits) are split: low part in word w, high part at bit 0 of word w+1.
    """
    check_bits(bits)
    n, m = values.shape
    if n % 32 != 0:
        raise ValueError(f"packed dimension must be a multiple of 32, got {n}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    v = v.reshape(n // 32, 32, m)  # [runs, position in run, m]
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=values.device)
    for j in range(32):
        offset = bits * j
        w, shift = divmod(offset, 32)
        words[:, w] |= (v[:, j] << shift) & _MASK32
        if shift + bits > 32:  # straddles into the next word: its high bits go to bit 0
            words[:, w + 1] |= v[:, j] >> (32 - shift)
    return _to_int32(words.reshape(n // 32 * bits, m))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_rows`: int32 [n*bits/32, m] -> int32 [n, m]."""
    check_bits(bits)
    rows, m = packed.shape
    if rows % bits != 0:
        raise ValueError(f"packed rows {rows} not a multiple of bits={bits}")
    words = (packed.to(torch.int64) & _MASK32).reshape(rows // bits, bits, m)
    maxq = (1 << bits) - 1
    out = torch.empty(rows // bits, 32, m, dtype=torch.int64, device=packed.device)
    for j in range(32):
        w, shift = divmod(bits * j, 32)
        val = words[:, w] >> shift
        if shift + bits > 32:
            val = val | (words[:, w + 1] << (32 - shift))
        out[:, j] = val & maxq
    return out.reshape(rows // bits * 32, m).to(torch.int32)


def _zero_offset(checkpoint_format: str) -> int:
    """How much is subtracted from z before storing it (see module docstring)."""
    if checkpoint_format == "gptq":
        return 1
    if checkpoint_format == "gptq_v2":
        return 0
    raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")


def pack_gptq(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Pack one Linear's quantization into GPTQ checkpoint tensors (v1 zero convention).

    codes: int [out, in] in [0, 2**bits - 1], original column order.
    scale: float [n_groups, out]. zero: integer-valued float/int [n_groups, out] (real z).
    g_idx: int [in], group index of each input column.
    Returns {"qweight", "qzeros", "scales", "g_idx"} on codes' device.
    """
    check_bits(bits)
    out_f, in_f = codes.shape
    n_groups = scale.shape[0]
    if scale.shape != (n_groups, out_f) or zero.shape != (n_groups, out_f):
        raise ValueError(
            f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} must be [n_groups, {out_f}]"
        )
    if g_idx.shape != (in_f,):
        raise ValueError(f"g_idx must have shape [{in_f}], got {tuple(g_idx.shape)}")
    if out_f % 32 != 0:
        raise ValueError(f"out_features must be a multiple of 32 for qzeros, got {out_f}")
    maxq = (1 << bits) - 1
    z = torch.round(zero.to(torch.float64)).to(torch.int64)
    offset = _zero_offset(checkpoint_format)
    if int(z.min()) < offset or int(z.max()) > maxq:
        hint = " (v1 'gptq' cannot store z=0; use checkpoint_format='gptq_v2')" if offset else ""
        raise ValueError(f"zero points must lie in [{offset}, {maxq}]{hint}")
    # qweight: transpose to [in, out] so the input dim is the packed (row) dim.
    qweight = pack_rows(codes.t().contiguous(), bits)
    # qzeros: v1 stores z - 1, v2 stores z; packed along out, so pack the transpose
    # [out, n_groups] along rows and transpose back to [n_groups, out*bits/32].
    stored = z - offset
    qzeros = pack_rows(stored.t().contiguous(), bits).t().contiguous()
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scale.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gptq`.

    Returns (codes int32 [out, in], zero fp32 [n_groups, out] (the real z), scale fp32
    [n_groups, out]). g_idx is only validated here; it is needed by dequantization.
    """
    codes = unpack_rows(qweight, bits).t().contiguous()
    stored = unpack_rows(qzeros.t().contiguous(), bits).t()
    # No masking after the +1: a v1 stored 2**bits-1 really means z = 2**bits to every
    # v1 reader, and we must agree with them.
    zero = (stored.to(torch.int64) + _zero_offset(checkpoint_format)).to(torch.float32)
    if g_idx.shape != (codes.shape[1],):
        raise ValueError(f"g_idx shape {tuple(g_idx.shape)} does not match in={codes.shape[1]}")
    return codes, zero.contiguous(), scales.to(torch.float32)


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """Dense weight [out, in] in nn.Linear orientation, computed in fp32 then cast to dtype.

    Uses the fp16-rounded scales exactly as stored, so the result equals what any
    GPTQ reader computes from the same checkpoint (up to its own accumulation order).
    """
    codes, zero, scale = unpack_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    g = g_idx.to(torch.long)
    # zero/scale are [n_groups, out]; index rows by g_idx -> [in, out], transpose to [out, in].
    W = (codes.to(torch.float32) - zero[g].t()) * scale[g].t()
    return W.to(dtype)


def pack_result(result: "QuantResult", module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A quantized Linear's GPTQ tensors (qweight, qzeros, scales, g_idx, fp16 bias)."""
    from engine.weights import narrow  # the format's float16 scales and bias hold every value, or refuse

    hint = "the GPTQ format stores scales and biases in float16"
    scale = narrow(result.scale.cpu(), torch.float16, "scales", "quant", hint)
    tensors = pack_gptq(result.codes.cpu(), scale, result.zero.cpu(), result.g_idx.cpu(), result.bits)
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = narrow(module.bias.data.detach().cpu(), torch.float16, "bias", "quant", hint)
    return tensors


# ---------------------------------------------------------------------------- AWQ GEMM layout
# AutoAWQ's GEMM layout, which vLLM (CPU and GPU), transformers + gptqmodel and AutoAWQ read, and
# which holds asymmetric 4-bit grids (vLLM reads GPTQ only symmetric). Same dequantization,
# W[o, i] = scales[g, o] * (code[o, i] - z[g, o]) with g = i // group_size (uniform groups, no
# g_idx), but packed along the OUTPUT dim: qweight int32 [in, out / 8], qzeros int32
# [n_groups, out / 8] storing z itself (z = 0 is fine), scales fp16 [n_groups, out]. Within a
# word, nibble k (bits 4k..4k+3) holds column AWQ_ORDER[k] of its run of 8 output columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_BITS = 4


def _awq_rows(n: int, device: torch.device) -> torch.Tensor:
    """Row p of the AWQ bitstream (over an output dim of n) holds output column _awq_rows[p]."""
    if n % 32:
        raise ValueError(f"AWQ packing needs out_features divisible by 32, got {n}")
    order = torch.tensor(AWQ_ORDER, device=device)
    return (torch.arange(0, n, 8, device=device).repeat_interleave(8) + order.repeat(n // 8)).long()


def pack_awq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """4-bit codes [out, in] with uniform groups (scale/zero [n_groups, out], z integer in [0, 15])
    -> {"qweight", "qzeros", "scales"} in AWQ's GEMM layout."""
    out_f, _ = codes.shape
    rows = _awq_rows(out_f, codes.device)
    z = torch.round(zero.to(torch.float64)).to(torch.int64)
    if int(z.min()) < 0 or int(z.max()) > 2**AWQ_BITS - 1:
        raise ValueError(f"zero points must lie in [0, {2**AWQ_BITS - 1}]")
    return {
        "qweight": pack_rows(codes[rows], AWQ_BITS).t().contiguous(),
        "qzeros": pack_rows(z.t()[rows].contiguous(), AWQ_BITS).t().contiguous(),
        "scales": scale.to(torch.float16).contiguous(),
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_awq`: (codes int32 [out, in], zero fp32 [n_groups, out], scale fp32)."""
    out_f = qweight.shape[1] * 32 // AWQ_BITS
    rows = _awq_rows(out_f, qweight.device)
    codes = torch.empty(out_f, qweight.shape[0], dtype=torch.int32, device=qweight.device)
    codes[rows] = unpack_rows(qweight.t().contiguous(), AWQ_BITS)
    zero = torch.empty(out_f, qzeros.shape[0], dtype=torch.int32, device=qzeros.device)
    zero[rows] = unpack_rows(qzeros.t().contiguous(), AWQ_BITS)
    return codes, zero.t().to(torch.float32).contiguous(), scales.to(torch.float32)


def uniform_groups(scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization as groups of `size` consecutive input columns: (scale, zero)
    [in / size, out], exactly, where every such block lies in one of g_idx's groups (groups of a
    multiple of `size`, a shorter last group included). Layouts without g_idx (AWQ, GGUF blocks)
    then hold it as is; a block spanning two groups (act-order g_idx) raises ValueError."""
    in_f = g_idx.shape[0]
    if size <= 0 or in_f % size:
        raise ValueError(f"{in_f} input columns do not split into groups of {size}")
    blocks = g_idx.to(torch.long).reshape(in_f // size, size)
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError(f"columns of one block of {size} belong to different groups (act-order g_idx)")
    first = blocks[:, 0]
    return scale[first].contiguous(), zero[first].contiguous()
