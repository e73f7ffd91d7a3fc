"""What only a CUDA GPU can check: the same pipelines on the GPU as on the CPU, the 2:4
semi-structured kernels, bf16 autocast. Skipped on machines without CUDA (CI); run on a lent
GPU machine with scripts/gpu_checks.sh. SHRINK_TEST_DEVICE=cpu runs the same code on the CPU
(the GPU-only halves skip), which is how the tests themselves are checked here.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_shrink, save_with_tokenizer, tiny_data_overrides
from tests.distill.helpers import tiny_distill, tiny_llama

DEVICE = os.environ.get("SHRINK_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ppl(metrics: dict) -> float:
    return next(iter(metrics["ppl"].values()))


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "sparsegpt+reconstruct", "best"])
def test_layerwise_compression_on_the_device_matches_the_cpu(tmp_path: Path, tiny_model_dir, method: str) -> None:
    """One calibration engine on both: same Hessians up to float reduction order, so the same
    perplexity to well under a percent, and a model folder that loads. quant=best (bfloat16
    autocast and refinement: its products round differently on each device) to 2%."""
    folder = tiny_model_dir("llama")
    stage = (["pipeline=quantize", "quant.method=gptq", "quant.bits=4", "quant.group_size=32"] if method == "gptq"
             else ["pipeline=quantize", "quant=best", "quant.bits=4", "quant.group_size=32", "quant.refine_steps=6"]
             if method == "best"
             else ["pipeline=prune", "prune.method=sparsegpt", "prune.sparsity=0.5",
                   f"prune.reconstruct={method.endswith('reconstruct')}"])
    common = [f"model.path={folder}", *tiny_data_overrides(), *stage, "eval.baseline=false"]
    cpu = run_shrink(common + ["model.device=cpu"], tmp_path / "cpu")
    dev = run_shrink(common + [f"model.device={DEVICE}"], tmp_path / "dev")
    tolerance = 2e-2 if method == "best" else 5e-3
    assert abs(ppl(dev) - ppl(cpu)) <= tolerance * ppl(cpu), (ppl(cpu), ppl(dev))
    assert abs(dev["sparsity"] - cpu["sparsity"]) < 1e-3
    AutoModelForCausalLM.from_pretrained(tmp_path / "dev" / "model")


@pytest.mark.skipif(not CUDA, reason="the semi-structured kernels are CUDA only")
def test_2of4_model_runs_on_semi_structured_kernels_with_the_dense_perplexity(tmp_path: Path, tiny_model_dir,
                                                                               caplog) -> None:
    common = [f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(), "pipeline=prune",
              "prune.method=sparsegpt", "prune.pattern='2:4'", "model.dtype=float16", f"model.device={DEVICE}",
              "eval.baseline=false"]
    dense = run_shrink(common, tmp_path / "dense")
    with caplog.at_level(logging.INFO, logger="prune.semi_structured"):
        sparse = run_shrink(common + ["eval.sparse_kernels=true"], tmp_path / "sparse")
    converted = [r.message for r in caplog.records if "semi-structured 2:4 kernels" in r.message]
    assert converted and int(converted[0].split()[0]) == 7 * 2  # every Linear of both layers
    assert abs(ppl(sparse) - ppl(dense)) <= 1e-2 * ppl(dense), (ppl(dense), ppl(sparse))


def test_distillation_on_the_device_trains_and_saves(tmp_path: Path, shipped_tokenizer: Path) -> None:
    """bf16 autocast on CUDA (precision=auto), fp32 master weights, finite losses that fall."""
    teacher = save_with_tokenizer(tiny_llama(layers=4), tmp_path / "teacher", shipped_tokenizer)
    m = run_shrink(tiny_distill(teacher, f"model.device={DEVICE}", "distill.steps=30", "distill.warmup=2",
                                "distill.lr=3e-3", "distill.log_every=1", "distill.loss=akt+logits+lm",
                                "eval.baseline=false"), tmp_path / "out")
    history = m["stages"]["distill"]["history"]
    losses = [h["loss"] for h in history]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5]), losses
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert next(student.parameters()).dtype == torch.float32  # the master weights, not the autocast copies
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["ppl"]
