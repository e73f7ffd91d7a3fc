"""The default `pipeline=quantize` export served by vLLM (its CPU build, in its own environment:
SHRINK_VLLM_PYTHON, or .venv-vllm made by `python -m benchmarks.serve --setup`), for a dense and an
MoE family the other tests do not run (Phi-3, OLMoE), at the run's perplexity on the same windows.
Skipped, with the reason, where no vLLM environment is there (CI)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
import transformers

from benchmarks.serve import derive, serve, vllm_python
from tests.conftest import VOCAB, compose_config, run_shrink, save_with_tokenizer, tiny_data_overrides

PYTHON = vllm_python(None)


def has_vllm() -> bool:
    if not PYTHON.is_file():
        return False
    return subprocess.run([str(PYTHON), "-c", "import vllm"], capture_output=True).returncode == 0


needs_vllm = pytest.mark.skipif(not has_vllm(), reason=f"no vLLM environment at {PYTHON} (SHRINK_VLLM_PYTHON, or "
                                                         "python -m benchmarks.serve --setup)")


def tiny(family: str) -> transformers.PreTrainedModel:
    """Two layers, head size 64 (vLLM's CPU attention takes 32 to 256), weights spread wide enough
    (initializer_range 0.1) that the logits are far from uniform, so a wrong layout shows."""
    common = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    configs = {"phi3": lambda: transformers.Phi3Config(intermediate_size=256, **common),
               # untied, as OLMoE ships: vLLM 0.32's OLMoE leaves a tied head unloaded (uniform logits)
               "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                                         **{**common, "tie_word_embeddings": False})}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("family", ["phi3", "olmoe"])
def test_the_default_export_serves_in_vllm_at_the_runs_perplexity(tmp_path, shipped_tokenizer, family) -> None:
    folder = save_with_tokenizer(tiny(family), tmp_path / family, shipped_tokenizer)
    overrides = [f"model.path={folder}", *tiny_data_overrides(seq_len=128, windows=4)]
    metrics = run_shrink(["pipeline=quantize", *overrides, "eval.baseline=false", "quant.group_size=32"],
                         tmp_path / "run")
    export = tmp_path / "run" / "model"
    assert json.loads((export / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    from engine.modeling import load_tokenizer
    from engine.state import RunState

    cfg = compose_config(overrides)
    windows, _ = RunState(cfg, tmp_path, None, load_tokenizer(folder)).eval_windows()
    served = serve(PYTHON, export, "bfloat16", windows, [windows[0, :16].tolist()])
    assert served["loaded"], served.get("error")
    assert any("AWQ" in method for method in served["methods"]), served["methods"]
    ppl = next(iter(metrics["ppl"].values()))
    assert served["ppl"] == pytest.approx(ppl, rel=5e-3), (served["ppl"], ppl)


def test_phi3_made_from_a_llama_computes_the_same(tmp_path, shipped_tokenizer) -> None:
    """The serve benchmark's Phi-3 is llama-teacher with fused projections: the same logits."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    llama = save_with_tokenizer(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "llama", shipped_tokenizer)
    phi3 = derive("phi3", llama, tmp_path / "phi3")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (transformers.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)(input_ids=ids).logits
                for f in (llama, phi3))
    assert (a - b).abs().max().item() < 1e-3 * a.abs().max().item()  # fused matmuls: fp32 rounding only
