"""Bit-exactness and layout tests for quant/pack.py (GPTQ checkpoint packing)."""
from __future__ import annotations

import pytest
import torch

from quant.pack import dequantize_gptq, pack_gptq, pack_rows, unpack_gptq, unpack_rows
from quant.qlinear import QuantLinear

BITS = [2, 3, 4, 8]


def _random_quant(out_f: int, in_f: int, bits: int, group_size: int, act_order: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = 1 if group_size == -1 else (in_f + group_size - 1) // group_size
    codes = torch.randint(0, maxq + 1, (out_f, in_f), generator=gen, dtype=torch.int32)
    # v1 cannot hold z = 0, so draw zeros from [1, maxq].
    zero = torch.randint(1, maxq + 1, (n_groups, out_f), generator=gen).to(torch.float32)
    # fp16-representable scales so the fp16 `scales` tensor round-trips exactly.
    scale = (torch.rand(n_groups, out_f, generator=gen) * 0.1 + 1e-3).half().float()
    if group_size == -1:
        g_idx = torch.zeros(in_f, dtype=torch.int32)
    else:
        g_idx = (torch.arange(in_f) // group_size).to(torch.int32)
    if act_order:  # act-order: groups assigned in a permuted column order
        perm = torch.randperm(in_f, generator=gen)
        g_idx = g_idx[torch.argsort(perm)]
    return codes, scale, zero, g_idx


def _reference_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Slow reference of AutoGPTQ's QuantLinear.pack loop (3-bit split across 3 words)."""
    v = values.to(torch.int64)
    rows = []
    i = 0
    mask = 0xFFFFFFFF
    while i < v.shape[0]:
        if bits in (2, 4, 8):
            word = torch.zeros(v.shape[1], dtype=torch.int64)
            for k in range(32 // bits):
                word |= v[i + k] << (bits * k)
            rows.append(word & mask)
            i += 32 // bits
        else:  # 3 bits: 10 values, 2 bits of the 11th | 1 bit, 10 values, 1 bit | 2 bits, 10 values
            w0 = torch.zeros(v.shape[1], dtype=torch.int64)
            w1 = torch.zeros_like(w0)
            w2 = torch.zeros_like(w0)
            for k in range(10):
                w0 |= v[i + k] << (3 * k)
            w0 |= (v[i + 10] << 30) & mask
            w1 |= (v[i + 10] >> 2) & 1
            for k in range(10):
                w1 |= v[i + 11 + k] << (3 * k + 1)
            w1 |= (v[i + 21] << 31) & mask
            w2 |= (v[i + 21] >> 1) & 3
            for k in range(10):
                w2 |= v[i + 22 + k] << (3 * k + 2)
            rows += [w0 & mask, w1 & mask, w2 & mask]
            i += 32
    out = torch.stack(rows)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_matches_autogptq_reference(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 2**bits, (64, 5), generator=gen)
    assert torch.equal(pack_rows(vals, bits), _reference_pack_rows(vals, bits))
    assert torch.equal(unpack_rows(pack_rows(vals, bits), bits), vals.to(torch.int32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_roundtrip_bit_exact(bits: int, group_size: int, act_order: bool) -> None:
    out_f, in_f = 96, 128
    codes, scale, zero, g_idx = _random_quant(out_f, in_f, bits, group_size, act_order)
    packed = pack_gptq(codes, scale, zero, g_idx, bits)
    n_groups = scale.shape[0]
    assert packed["qweight"].dtype == torch.int32
    assert packed["qweight"].shape == (in_f * bits // 32, out_f)
    assert packed["qzeros"].dtype == torch.int32
    assert packed["qzeros"].shape == (n_groups, out_f * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (n_groups, out_f)
    assert packed["g_idx"].dtype == torch.int32 and torch.equal(packed["g_idx"], g_idx)

    codes2, zero2, scale2 = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(codes2, codes)
    assert torch.equal(zero2, zero)
    assert torch.equal(scale2, scale)

    g = g_idx.long()
    expected = (codes.float() - zero[g].T) * scale[g].T
    W = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(W, expected)


@pytest.mark.parametrize("bits", BITS)
def test_roundtrip_v2_allows_zero_point_zero(bits: int) -> None:
    codes, scale, zero, g_idx = _random_quant(32, 64, bits, 32, False)
    zero[0, :5] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_gptq(codes, scale, zero, g_idx, bits)
    packed = pack_gptq(codes, scale, zero, g_idx, bits, checkpoint_format="gptq_v2")
    c2, z2, _ = unpack_gptq(packed["qweight"], packed["qzeros"], packed["scales"], g_idx, bits, "gptq_v2")
    assert torch.equal(c2, codes) and torch.equal(z2, zero)


def test_symmetric_4bit_qzeros_are_0x77777777() -> None:
    out_f, in_f, gs = 64, 128, 32
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32)
    zero = torch.full((in_f // gs, out_f), 8.0)  # quant/grid.py symmetric zero for 4 bits
    scale = torch.ones(in_f // gs, out_f)
    g_idx = (torch.arange(in_f) // gs).to(torch.int32)
    qzeros = pack_gptq(codes, scale, zero, g_idx, 4)["qzeros"]
    assert (qzeros == 0x77777777).all()
    assert int(qzeros[0, 0]) == 2004318071


def test_hand_computed_bit_layout() -> None:
    # 4 bits: input rows 0..7 of one output column go low-nibble first into one word.
    vals = torch.arange(32, dtype=torch.int32).remainder(16).reshape(32, 1)
    q = pack_rows(vals, 4)
    assert q.shape == (4, 1)
    assert int(q[0, 0]) == 0x76543210
    assert int(q[1, 0]) & 0xFFFFFFFF == 0xFEDCBA98  # stored as negative int32
    assert int(q[1, 0]) == 0xFEDCBA98 - 2**32
    # 2 bits: 16 values per word, value k at bits [2k, 2k+2).
    vals2 = torch.tensor([1, 2, 3] + [0] * 29, dtype=torch.int32).reshape(32, 1)
    assert int(pack_rows(vals2, 2)[0, 0]) == 1 | (2 << 2) | (3 << 4)
    # 8 bits: 4 values per word.
    vals8 = torch.tensor([0x11, 0x22, 0x33, 0x44] + [0] * 28, dtype=torch.int32).reshape(32, 1)
    assert int(pack_rows(vals8, 8)[0, 0]) == 0x44332211
    # 3 bits: value 10 = 0b101 straddles words 0/1 (low 2 bits at 30-31, high bit at bit 0);
    # value 21 = 0b011 straddles words 1/2 (low bit at 31, high 2 bits at bits 0-1).
    vals3 = torch.zeros(32, 1, dtype=torch.int32)
    vals3[0], vals3[10], vals3[11], vals3[21], vals3[22] = 0b111, 0b101, 0b010, 0b011, 0b110
    w = [int(x) & 0xFFFFFFFF for x in pack_rows(vals3, 3)[:, 0]]
    assert w[0] == 0b111 | (0b01 << 30)
    assert w[1] == 0b1 | (0b010 << 1) | (0b1 << 31)
    assert w[2] == 0b01 | (0b110 << 2)


def test_pack_qzeros_layout_along_output_dim() -> None:
    # qzeros packs output columns: for 4 bits, outputs 0..7 of group 0 share word [0, 0].
    out_f, in_f = 32, 32
    zero = (torch.arange(out_f) % 15 + 1).float().reshape(1, out_f)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32)
    packed = pack_gptq(codes, torch.ones(1, out_f), zero, torch.zeros(in_f, dtype=torch.int32), 4)
    expected = sum(((k % 15 + 1) - 1) << (4 * k) for k in range(8))
    assert int(packed["qzeros"][0, 0]) & 0xFFFFFFFF == expected


def test_rejects_bad_inputs() -> None:
    codes, scale, zero, g_idx = _random_quant(32, 64, 4, 32, False)
    with pytest.raises(ValueError):
        pack_gptq(codes, scale, zero, g_idx, 5)
    with pytest.raises(ValueError):
        pack_gptq(codes + 16, scale, zero, g_idx, 4)
    with pytest.raises(ValueError):
        pack_gptq(codes[:, :48], scale, zero, g_idx[:48], 4)  # in not multiple of 32


@pytest.mark.parametrize("bits", [3, 4])
def test_quantlinear_forward_matches_dense(bits: int) -> None:
    codes, scale, zero, g_idx = _random_quant(64, 128, bits, 32, True, seed=3)
    packed = pack_gptq(codes, scale, zero, g_idx, bits)
    bias = torch.randn(64)
    layer = QuantLinear.from_packed(packed, bits, 32, bias=bias)
    g = g_idx.long()
    W = (codes.float() - zero[g].T) * scale[g].T
    x = torch.randn(3, 5, 128)
    ref = torch.nn.functional.linear(x, W, bias)
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x), ref)  # cached path
    nocache = QuantLinear.from_packed(packed, bits, 32, bias=bias, cache_weight=False)
    assert torch.equal(nocache(x), ref)
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    # in-place buffer edits invalidate the cache
    layer.scales.mul_(2)
    assert torch.allclose(layer(x) - bias, 2 * (ref - bias), atol=1e-4)


def test_awq_layout_round_trips_and_is_the_order_vllm_unpacks() -> None:
    """pack_awq is exact, z = 0 included, and its words read back the way vLLM's AWQ loader
    unpacks them (nibble k of a word -> column [0, 4, 1, 5, 2, 6, 3, 7][k] of its run of 8)."""
    from quant.pack import pack_awq, unpack_awq

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 96), generator=gen, dtype=torch.int32)
    zero = torch.randint(0, 16, (3, 64), generator=gen).float()
    zero[0, 0] = 0
    scale = (torch.rand(3, 64, generator=gen) + 1e-3).half().float()
    packed = pack_awq(codes, scale, zero)
    assert packed["qweight"].shape == (96, 8) and packed["qzeros"].shape == (3, 8)
    back = unpack_awq(**packed)
    assert torch.equal(back[0], codes) and torch.equal(back[1], zero) and torch.equal(back[2], scale)
    shifts = torch.arange(0, 32, 4)
    vllm_order = [0, 4, 1, 5, 2, 6, 3, 7]
    words = (packed["qweight"].unsqueeze(-1) >> shifts) & 15
    assert torch.equal(words[:, :, vllm_order].reshape(96, 64).t().int(), codes)
    zwords = (packed["qzeros"].unsqueeze(-1) >> shifts) & 15
    assert torch.equal(zwords[:, :, vllm_order].reshape(3, 64).float(), zero)


def test_uniform_groups_hold_shorter_last_groups_and_refuse_act_order() -> None:
    from quant.pack import uniform_groups

    codes, scale, zero, g_idx = _random_quant(32, 96, 4, 64, act_order=False)  # groups 64 + a last 32
    s16, z16 = uniform_groups(scale, zero, g_idx, 32)
    assert s16.shape == (3, 32)
    dense = dequantize_gptq(**pack_gptq(codes, scale, zero, g_idx, 4), bits=4)
    again = dequantize_gptq(**pack_gptq(codes, s16, z16, torch.arange(96, dtype=torch.int32) // 32, 4), bits=4)
    assert torch.equal(dense, again)
    with pytest.raises(ValueError, match="groups of 64"):
        uniform_groups(scale, zero, g_idx, 64)  # 96 is not a multiple of 64
    _, scale, zero, g_idx = _random_quant(32, 96, 4, 32, act_order=True)
    with pytest.raises(ValueError, match="act-order"):
        uniform_groups(scale, zero, g_idx, 32)
