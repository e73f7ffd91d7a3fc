"""End-to-end GPTQ export -> reload on tiny random Llama and GPT-2 models (CPU, fast)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quant.export import (
    gptq_quantization_config,
    load_quantized_model,
    replace_with_quant_linears,
    save_gptq_model,
)
from quant.grid import fit_grid, quantize_codes
from quant.pack import pack_gptq
from quant.qlinear import QuantLinear

transformers = pytest.importorskip("transformers")


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool = False):
    """Simple per-group RTN with quant/grid.py. Returns (codes, scale, zero, g_idx, W_fake).

    Scales are rounded to fp16 first, because the checkpoint stores fp16 scales: the
    fake-quantized reference then equals exactly what a reader dequantizes. act_order
    permutes which columns share a group (as GPTQ act-order does) to exercise g_idx.
    """
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(1)) if act_order else torch.arange(in_f)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // gs).to(torch.int32)
    n_groups = (in_f + gs - 1) // gs
    codes = torch.empty(out_f, in_f, dtype=torch.int32)
    scale = torch.empty(n_groups, out_f)
    zero = torch.empty(n_groups, out_f)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        grid = fit_grid(W[:, cols], bits, sym)
        grid.scale = grid.scale.half().float()
        if not sym:
            grid.zero = grid.zero.clamp(min=1)  # v1 ("gptq") cannot store z = 0
        codes[:, cols] = quantize_codes(W[:, cols].float(), grid).to(torch.int32)
        scale[g] = grid.scale[:, 0]
        zero[g] = grid.zero[:, 0]
    gi = g_idx.long()
    W_fake = (codes.float() - zero[gi].T) * scale[gi].T
    return codes, scale, zero, g_idx, W_fake


def quantize_model(model: nn.Module, names: list[str], bits: int, group_size: int, sym: bool, act_order: bool):
    """Fake-quantize the float model in place and return the packed tensors per module."""
    packed = {}
    for name in names:
        mod = model.get_submodule(name)
        conv1d = not isinstance(mod, nn.Linear)
        W = mod.weight.data.T if conv1d else mod.weight.data  # nn.Linear orientation [out, in]
        codes, scale, zero, g_idx, W_fake = rtn_quantize(W, bits, group_size, sym, act_order)
        mod.weight.data.copy_(W_fake.T if conv1d else W_fake)
        packed[name] = pack_gptq(codes, scale, zero, g_idx, bits)
    return packed


def _tiny_llama(tie: bool = False, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _decoder_linears(model: nn.Module, block_prefix: str, types: tuple) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith(block_prefix) and isinstance(m, types)]


def _roundtrip(model, names, tmp_path: Path, bits, group_size, sym, act_order, input_ids):
    packed = quantize_model(model, names, bits, group_size, sym, act_order)
    with torch.no_grad():
        ref = model(input_ids).logits
    replace_with_quant_linears(model, packed, bits, group_size)
    with torch.no_grad():
        swapped = model(input_ids).logits
    qcfg = gptq_quantization_config(bits, group_size, sym, act_order, False, True, 0.01)
    out = save_gptq_model(model, tmp_path / "gptq", qcfg)
    loaded = load_quantized_model(out, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(input_ids).logits
    return out, loaded, ref, swapped, got


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,tie",
    [(4, 32, True, False, False), (4, 32, False, True, True), (3, -1, True, False, False), (8, 64, False, False, True),
     (4, 48, False, False, False)],  # 48 divides neither 64 nor 128: shorter last groups
)
def test_llama_export_reload_matches_fake_quant(tmp_path, bits, group_size, sym, act_order, tie) -> None:
    model = _tiny_llama(tie)
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    assert len(names) == 14
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    out, loaded, ref, swapped, got = _roundtrip(model, names, tmp_path, bits, group_size, sym, act_order, ids)
    diff_swap = (swapped - ref).abs().max().item()
    diff = (got - ref).abs().max().item()
    assert diff_swap < 1e-4 and diff < 1e-4, (diff_swap, diff)

    qnames = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert qnames == names
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    for key, val in [("quant_method", "gptq"), ("bits", bits), ("group_size", group_size), ("sym", sym),
                     ("desc_act", act_order), ("static_groups", False), ("true_sequential", True),
                     ("damp_percent", 0.01), ("format", "gptq"), ("checkpoint_format", "gptq")]:
        assert cfg[key] == val, key
    assert sorted(cfg["modules_in_block_to_quantize"][0]) == sorted(
        {n.split(".", 3)[3] for n in names})
    assert json.loads((out / "quantize_config.json").read_text()) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_fp16_load_runs(tmp_path) -> None:
    model = _tiny_llama()
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    ids = torch.randint(0, 128, (1, 8))
    out, _, ref, _, _ = _roundtrip(model, names, tmp_path, 4, 32, True, False, ids)
    loaded = load_quantized_model(out)  # default fp16
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    with torch.no_grad():
        got = loaded(ids).logits.float()
    diff = (got - ref).abs().max().item()
    assert diff < 5e-2, diff


def test_gpt2_conv1d_roundtrip(tmp_path) -> None:
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    names = _decoder_linears(model, "transformer.h.", (Conv1D,))
    assert len(names) == 8
    ids = torch.randint(0, 128, (2, 12))
    out, loaded, ref, swapped, got = _roundtrip(model, names, tmp_path, 4, 32, False, False, ids)
    diff = (got - ref).abs().max().item()
    diff_swap = (swapped - ref).abs().max().item()
    assert diff_swap < 1e-4 and diff < 1e-4, (diff_swap, diff)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, QuantLinear)
    assert loaded.transformer.h[0].attn.c_attn.bias is not None
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # GPT-2 ties embeddings


def test_save_failure_leaves_no_folder(tmp_path, monkeypatch) -> None:
    model = _tiny_llama()
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    replace_with_quant_linears(model, quantize_model(model, names, 4, 32, True, False), 4, 32)
    qcfg = gptq_quantization_config(4, 32, True, False, False, True, 0.01)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("quant.export.save_file", boom)
    with pytest.raises(RuntimeError):
        save_gptq_model(model, tmp_path / "out", qcfg)
    assert list(tmp_path.iterdir()) == []


def test_act_order_requires_desc_act(tmp_path) -> None:
    model = _tiny_llama()
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    replace_with_quant_linears(model, quantize_model(model, names, 4, 32, True, True), 4, 32)
    with pytest.raises(ValueError, match="desc_act"):
        save_gptq_model(model, tmp_path / "out", gptq_quantization_config(4, 32, True, False, False, True, 0.01))


def test_sharded_save_reload(tmp_path) -> None:
    model = _tiny_llama(tie=True)
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    replace_with_quant_linears(model, quantize_model(model, names, 4, 32, True, False), 4, 32)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
    qcfg = gptq_quantization_config(4, 32, True, False, False, True, 0.01)
    out = save_gptq_model(model, tmp_path / "sharded", qcfg, max_shard_size=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # tied: written once
    loaded = load_quantized_model(out, dtype=torch.float32)
    with torch.no_grad():
        assert (loaded(ids).logits - ref).abs().max().item() < 1e-4
    # overwrite goes through the same temp-and-rename path
    save_gptq_model(model, out, qcfg, overwrite=True)
    assert (out / "model.safetensors").exists() and not list(out.glob("model-*.safetensors"))
