"""Interop: transformers.from_pretrained (optimum + gptqmodel) reads our GPTQ folders.

Skipped unless gptqmodel and optimum are installed. Verified on CPU with torch 2.13.0,
transformers 5.23.0, optimum 2.3.0, gptqmodel 7.6.0.

Expected numeric gaps (not layout errors; pack layout is checked bit-exactly elsewhere):
- gptqmodel's TorchLinear dequantizes as fp16 scale * fp16 (code - z), we in fp32:
  ~1e-4 on logits of magnitude ~0.6.
- For 4 bits on CPU gptqmodel auto-selects TorchAtenLinear, which runs activations and
  scales in bf16 (aten._weight_int4pack_mm_for_cpu): ~2e-3 on the same logits.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")
transformers = pytest.importorskip("transformers")

from quant.export import (  # noqa: E402
    gptq_quantization_config,
    load_quantized_model,
    replace_with_quant_linears,
    save_gptq_model,
)
from tests.quant.test_export import _decoder_linears, _tiny_llama, quantize_model  # noqa: E402


def _export(tmp_path, model, names, bits, gs, sym, act):
    replace_with_quant_linears(model, quantize_model(model, names, bits, gs, sym, act), bits, gs)
    return save_gptq_model(model, tmp_path / "gptq", gptq_quantization_config(bits, gs, sym, act, False, True, 0.01))


def _hf_load(folder, bits: int, backend: str | None):
    kw = {}
    if backend is not None:  # loading attribute override; the rest comes from config.json
        kw["quantization_config"] = transformers.GPTQConfig(bits=bits, backend=backend)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, device_map="cpu", **kw
    ).eval()


@pytest.mark.parametrize(
    "bits,sym,act,backend,tol,tie,gs",
    [
        (4, True, False, None, 1e-2, False, 32),  # auto -> TorchAtenLinear (bf16 int4 mm)
        (4, False, True, "torch", 1e-3, True, 32),
        (3, False, True, None, 1e-3, False, 32),
        (2, False, False, None, 1e-3, True, 32),
        (8, True, True, None, 1e-3, False, 32),
        # hidden 160, MLP 320, group 128: every input dimension ends with a shorter group
        (4, False, False, "torch", 1e-3, False, 128),
    ],
)
def test_from_pretrained_matches_our_loader(tmp_path, bits, sym, act, backend, tol, tie, gs) -> None:
    model = _tiny_llama(tie, hidden=160, heads=5, kv_heads=1) if gs == 128 else _tiny_llama(tie)
    names = _decoder_linears(model, "model.layers.", (nn.Linear,))
    folder = _export(tmp_path, model, names, bits, gs, sym, act)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = load_quantized_model(folder, dtype=torch.float32)
    hf = _hf_load(folder, bits, backend)
    layer = hf.get_submodule(names[0])
    assert type(layer).__module__.startswith("gptqmodel"), type(layer)  # really quantized
    assert isinstance(hf.get_submodule("lm_head"), nn.Linear)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < tol, (type(layer).__name__, diff)


def _gpt2_folder(tmp_path):
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    names = _decoder_linears(model, "transformer.h.", (Conv1D,))
    return _export(tmp_path, model, names, 4, 32, False, False)


def test_from_pretrained_gpt2_conv1d_plain_hits_the_known_upstream_bug(tmp_path) -> None:
    """transformers 5.23 GPT2PreTrainedModel._init_weights calls init.normal_(c_proj.weight); on a
    gptqmodel 7.6 quant layer .weight is a _LinearWeightMetadata, so any GPTQ GPT-2 fails to load.
    When an upgrade fixes it this fails: drop the workaround in the test below and the README's note."""
    with pytest.raises(AttributeError, match="_LinearWeightMetadata.*normal_"):
        _hf_load(_gpt2_folder(tmp_path), 4, "torch")


def test_from_pretrained_gpt2_conv1d(tmp_path, monkeypatch) -> None:
    # Work around the upstream bug above: every weight comes from the checkpoint, so
    # GPT-2's random re-init is not needed to compare layouts.
    monkeypatch.setattr(transformers.GPT2PreTrainedModel, "_init_weights", lambda self, module: None)
    folder = _gpt2_folder(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_quantized_model(folder, dtype=torch.float32)
    hf = _hf_load(folder, 4, "torch")
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_from_pretrained_does_not_load_per_expert_gptq_keys_into_fused_experts(tmp_path, tiny_model_dir) -> None:
    """The known limitation the README states: transformers' GPTQ path (optimum + gptqmodel)
    swaps nn.Linear modules only, so the fused experts module stays a float one, the per-expert
    qweight keys are left unused and the fused tensors uninitialized. If this starts to load
    them, the README's mixture-of-experts section must change (and this test with it)."""
    from tests.conftest import run_shrink, tiny_data_overrides

    out = tmp_path / "run"
    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('mixtral')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.method=rtn", "quant.group_size=32", "quant.export_format=gptq"], out)
    folder = out / "model"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                               output_loading_info=True)
    experts = hf.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, nn.Parameter)  # still the float fused tensor
    assert type(hf.get_submodule("model.layers.0.self_attn.q_proj")).__module__.startswith("gptqmodel")
    assert any("experts.0.w1.qweight" in k for k in info["unexpected_keys"]), info
    assert any("gate_up_proj" in k for k in info["missing_keys"]), info
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    ours = load_quantized_model(folder, dtype=torch.float32)
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max().item() > 1e-2


def test_gptqmodel_loads_a_packed_embedding_and_head(tmp_path, tiny_model_dir) -> None:
    """quant.embed_bits + quant.lm_head: gptqmodel's own loader builds its TorchQuantEmbeddings and
    a quantized lm_head from our folder and computes our logits (it refuses asymmetric v1 folders
    that gptqmodel did not write, hence sym); transformers + optimum read neither end."""
    from gptqmodel import BACKEND, GPTQModel

    from tests.conftest import run_shrink, tiny_data_overrides

    out = tmp_path / "run"
    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.lm_head=true", "quant.embed_bits=8", "quant.sym=true"], out)
    folder = out / "model"
    theirs = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    assert type(theirs.model.get_input_embeddings()).__name__ == "TorchQuantEmbeddings"
    assert type(theirs.model.get_output_embeddings()).__name__ == "TorchLinear"
    ours = load_quantized_model(folder, dtype=torch.float16)
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs.model(ids).logits.float(), ours(ids).logits.float()
    assert (a - b).abs().max() <= 2e-3 * b.abs().max() + 1e-3
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cpu",
                                                                 output_loading_info=True)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(info["missing_keys"])  # what the card says


def test_from_pretrained_reads_the_awq_layout(tmp_path) -> None:
    """The default asymmetric 4-bit export's layout (AWQ GEMM) through transformers' AWQ path
    (gptqmodel's kernels): the logits of shrink's loader, to the bf16 int4 kernel's precision."""
    from quant.layout import awq_quantization_config
    from tests.quant.test_layout import _quantized

    folder = save_gptq_model(_quantized(32), tmp_path / "awq", awq_quantization_config(32, "rtn", 0.01, True))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = load_quantized_model(folder, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cpu").eval()
    layer = hf.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer).__module__.startswith("gptqmodel") and "Awq" in type(layer).__name__, type(layer)
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits.float()).abs().max().item()
    assert diff < 1e-2, diff
