"""benchmarks/families.py: a Llama in Phi-3's layout and a Mixtral in Qwen2-MoE's compute the same
function, and the converted models go through quantization with every quality option and reload."""
from __future__ import annotations

import pytest
import torch

from benchmarks.families import check_same_function, phi3, qwen2_moe
from tests.conftest import run_shrink, save_with_tokenizer, tiny_data_overrides, tiny_model


@pytest.mark.parametrize("family,convert", [("llama", phi3), ("mixtral", qwen2_moe)])
def test_a_converted_model_computes_its_source_function_and_quantizes(tmp_path, shipped_tokenizer, family,
                                                                       convert) -> None:
    source = tiny_model(family)
    target = convert(source)
    check_same_function(source, target, family)  # raises when they differ
    assert type(target).__name__ in ("Phi3ForCausalLM", "Qwen2MoeForCausalLM")
    folder = save_with_tokenizer(target, tmp_path / "model", shipped_tokenizer)
    common = [f"model.path={folder}", *tiny_data_overrides()]
    dense = run_shrink(["pipeline=eval", *common], tmp_path / "dense")
    quantized = run_shrink(["pipeline=quantize", *common, "quant.group_size=32", "quant.sym=true",
                            "quant.scale_search=mse", "quant.gptaq=true", "quant.refine_steps=4"], tmp_path / "q")
    reloaded = run_shrink(["pipeline=eval", f"model.path={tmp_path / 'q' / 'model'}", *tiny_data_overrides()],
                          tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(quantized["ppl"], rel=1e-5)
    assert dense["ppl"] != quantized["ppl"]
    names = [r["name"] for r in quantized["stages"]["quantize"]["layers"]]
    assert any("qkv_proj" in n for n in names) if family == "llama" else any("experts.3.down_proj" in n for n in names)


def test_the_check_refuses_a_different_function() -> None:
    source = tiny_model("llama")
    target = phi3(source)
    with torch.no_grad():
        target.model.layers[0].self_attn.qkv_proj.weight.mul_(1.5)
    with pytest.raises(SystemExit, match="does not compute its source's function"):
        check_same_function(source, target, "phi3")
