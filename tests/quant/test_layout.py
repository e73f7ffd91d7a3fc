"""The AWQ layout of an export (quant/layout.py): exact both ways, the group size it can write,
what it refuses, and which layout quant.export_format=auto picks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.errors import ShrinkError
from quant.config import QuantConfig, check_quant_config, export_format
from quant.export import load_quantized_model, replace_with_quant_linears, save_gptq_model
from quant.layout import awq_quantization_config, checkpoint_reader, vllm_serves
from tests.quant.test_export import _decoder_linears, _tiny_llama, quantize_model


def _quantized(group_size: int, sym: bool = False, act_order: bool = False, tie: bool = False):
    model = _tiny_llama(tie)
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    replace_with_quant_linears(model, quantize_model(model, names, 4, group_size, sym, act_order), 4, group_size)
    return model


@pytest.mark.parametrize("group_size,written", [(32, 32), (48, 16)])  # 48 divides neither 64 nor 128
def test_awq_export_reloads_to_the_same_logits(tmp_path, group_size, written) -> None:
    model = _quantized(group_size, tie=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    out = save_gptq_model(model, tmp_path / "awq", awq_quantization_config(group_size, "rtn", 0.01, True))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["group_size"] == written and qcfg["zero_point"] is True
    assert qcfg["meta"]["calibrated_group_size"] == group_size and qcfg["modules_to_not_convert"] == ["lm_head"]
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    tensors = load_file(out / "model.safetensors")
    assert not any(k.endswith(".g_idx") for k in tensors)
    down = "model.layers.0.mlp.down_proj"  # 128 -> 64
    assert tensors[f"{down}.qweight"].shape == (128, 8) and tensors[f"{down}.scales"].shape == (128 // written, 64)
    loaded = load_quantized_model(out, dtype=torch.float32)
    with torch.no_grad():
        assert (loaded(ids).logits - ref).abs().max().item() < 1e-4
    assert loaded.get_submodule(down).checkpoint_format == "gptq_v2"
    # written again from the reloaded model: the very same tensors (a resumed run's export)
    again = save_gptq_model(loaded.half(), tmp_path / "again", qcfg)
    retensors = load_file(again / "model.safetensors")
    assert all(torch.equal(retensors[k], tensors[k]) for k in tensors if ".q" in k or k.endswith(".scales"))


def test_lazy_reader_shows_an_awq_folder_as_gptq_tensors(tmp_path) -> None:
    model = _quantized(32)
    out = save_gptq_model(model, tmp_path / "awq", awq_quantization_config(32, "rtn", 0.01, True))
    reader = checkpoint_reader(out)
    name = "model.layers.1.self_attn.o_proj"
    mine = model.get_submodule(name)
    assert reader.headers[f"{name}.qweight"].shape == tuple(mine.qweight.shape)
    assert reader.headers[f"{name}.g_idx"].shape == (64,)
    loaded = load_quantized_model(out, dtype=torch.float32).get_submodule(name)
    for leaf in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(reader.get(f"{name}.{leaf}"), getattr(loaded, leaf)), leaf
    assert torch.equal(loaded.dequantize(), mine.dequantize())


def test_awq_refuses_act_order_groups_naming_the_module(tmp_path) -> None:
    model = _quantized(32, act_order=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*act-order.*export_format=gptq"):
        save_gptq_model(model, tmp_path / "awq", awq_quantization_config(32, "gptq", 0.01, True))
    assert list(tmp_path.iterdir()) == []


def test_a_float_module_named_inside_a_quantized_one_is_refused(tmp_path) -> None:
    """vLLM skips modules_to_not_convert entries that are substrings of a module's name."""
    model = _quantized(32)
    float_gate = nn.Linear(64, 4, bias=False)
    model.model.layers[0].mlp.gate = float_gate  # "...mlp.gate" is part of "...mlp.gate_proj"
    with pytest.raises(ValueError, match="substrings"):
        save_gptq_model(model, tmp_path / "awq", awq_quantization_config(32, "gptq", 0.01, True))


@pytest.mark.parametrize("settings,layout", [
    ({}, "awq"),  # the defaults: GPTQ 4-bit g128 asymmetric
    ({"sym": True}, "gptq"), ({"bits": 3}, "gptq"), ({"bits": 8}, "gptq"), ({"group_size": -1}, "gptq"),
    ({"act_order": True}, "gptq"), ({"act_order": True, "static_groups": True}, "awq"),
    ({"method": "rtn", "act_order": True}, "awq"), ({"lm_head": True}, "gptq"), ({"embed_bits": 8}, "gptq"),
    ({"export_format": "gptq"}, "gptq"), ({"export_format": "awq", "sym": True}, "awq"),
])
def test_auto_picks_awq_where_it_holds_the_grids_and_vllm_reads_nothing_else(settings, layout) -> None:
    quant = QuantConfig(**settings)
    check_quant_config(quant)
    assert export_format(quant) == layout


@pytest.mark.parametrize("settings,message", [
    ({"export_format": "marlin"}, "not one of"), ({"export_format": "awq", "bits": 3}, "4-bit"),
    ({"export_format": "awq", "group_size": -1}, "groups"), ({"export_format": "awq", "act_order": True}, "g_idx"),
    ({"export_format": "awq", "lm_head": True}, "packed ends"),
])
def test_bad_export_formats_are_refused_in_one_line(settings, message) -> None:
    with pytest.raises(ShrinkError, match=f"quant.export_format: .*{message}"):
        check_quant_config(QuantConfig(**settings))


def test_what_vllm_serves() -> None:
    assert vllm_serves({"quant_method": "awq", "bits": 4})
    assert vllm_serves({"quant_method": "gptq", "bits": 4, "sym": True})
    assert not vllm_serves({"quant_method": "gptq", "bits": 4, "sym": False})
    assert not vllm_serves({"quant_method": "gptq", "bits": 3, "sym": True})
    assert not vllm_serves({"quant_method": "gptq", "bits": 8, "sym": True, "dynamic": {"embed": {}}})


def test_a_streamed_awq_folder_without_scales_is_one_line(tmp_path) -> None:
    from safetensors.torch import save_file

    from engine.errors import ShrinkError
    from quant.layout import AwqReader

    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(64, 8, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 8, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ShrinkError, match=r"model.path: .*up_proj.scales is missing"):
        AwqReader(tmp_path, "model.path", 64)
