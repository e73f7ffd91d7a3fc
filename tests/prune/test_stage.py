"""`shrink pipeline=prune` and `prune_quantize` end to end: exact sparsity that survives GPTQ."""
from __future__ import annotations

import pytest
import torch

from quant.export import load_quantized_model
from engine.errors import ShrinkError
from engine.metrics import decoder_weight_matrices
from tests.conftest import needs_shared, run_shrink, tiny_data_overrides


def nm_pattern_holds(W: torch.Tensor, n: int, m: int) -> bool:
    return bool(((W.reshape(W.shape[0], -1, m) == 0).sum(-1) >= n).all())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_linear_is_exactly_as_sparse_as_asked(tmp_path, tiny_model_dir, method, pattern) -> None:
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=prune", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                          f"prune.method={method}", f"prune.pattern='{pattern}'", "prune.sparsity=0.5",
                          "eval.baseline=false"], out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, W in decoder_weight_matrices(model).items():
        if pattern == "unstructured":
            assert int((W == 0).sum()) == W.numel() // 2, name
        else:
            n, m = map(int, pattern.split(":"))
            assert nm_pattern_holds(W, n, m), name
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "baseline_ppl" not in metrics  # not measured (eval.baseline=false), and the model changed


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_reconstruct_keeps_the_pattern_and_lowers_every_layer_error(tmp_path, tiny_model_dir, method) -> None:
    metrics = run_shrink(["pipeline=prune", f"model.path={tiny_model_dir('qwen2')}", *tiny_data_overrides(),
                          f"prune.method={method}", "prune.pattern='2:4'", "prune.reconstruct=true",
                          "eval.baseline=false"], tmp_path / "run")
    report = metrics["stages"]["prune"]
    assert report["pattern_ok"] and report["reconstruct"]
    for r in report["layers"]:
        assert r["reconstruct_error_after"] < r["reconstruct_error_before"], r
        assert r["reconstruct_residual"] < 1e-3, r
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_layer_sparsity_overrides(tmp_path, tiny_model_dir) -> None:
    metrics = run_shrink(["pipeline=prune", f"model.path={tiny_model_dir('opt')}", *tiny_data_overrides(),
                          "prune.sparsity=0.6", "+prune.layer_sparsity={0: 0.2}", "eval.baseline=false"],
                         tmp_path / "run")
    per = metrics["stages"]["prune"]["per_linear"]
    assert all(v == pytest.approx(0.2, abs=0.01) for k, v in per.items() if ".layers.0." in k)
    assert all(v == pytest.approx(0.6, abs=0.01) for k, v in per.items() if ".layers.1." in k)


@pytest.mark.parametrize("extra", [
    ["quant.group_size=32"],
    ["quant.act_order=true", "quant.group_size=32"],
    ["quant.act_order=true", "quant.static_groups=true", "quant.group_size=32", "quant.sym=true"],
    ["prune.joint_quant=true", "quant.group_size=32"],
])
def test_pruned_zeros_survive_quantization_in_the_exported_checkpoint(tmp_path, tiny_model_dir, extra) -> None:
    out = tmp_path / "run"
    run_shrink(["pipeline=prune_quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                "prune.pattern='2:4'", "quant.bits=4", "eval.baseline=false", *extra], out)
    model = load_quantized_model(out / "model")
    weights = decoder_weight_matrices(model)
    assert weights
    for name, W in weights.items():
        assert nm_pattern_holds(W, 2, 4), name


@pytest.mark.parametrize("override,key", [
    ("prune.sparsity=1.0", "prune.sparsity"), ("prune.sparsity=-0.1", "prune.sparsity"),
    ("prune.pattern='4:2'", "prune.pattern"), ("prune.pattern='2:5' prune.sparsity=0.4", "does not divide"),
    ("prune.pattern='2:4' prune.sparsity=0.7", "prunes exactly 0.5"),
    ("prune.pattern=dense", "prune.pattern"), ("prune.method=obc", "prune.method"),
    ("prune.reconstruct=true prune.joint_quant=true", "prune.reconstruct"),
])
def test_bad_settings_are_refused_and_nothing_is_written(tmp_path, tiny_model_dir, override, key) -> None:
    out = tmp_path / "run"
    with pytest.raises(ShrinkError, match=key):
        run_shrink(["pipeline=prune", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                    *override.split()], out)
    assert not out.exists()  # refused before anything was written, or put back as it was


@pytest.mark.slow
@needs_shared
def test_sparsegpt_beats_magnitude_by_far_on_the_shared_teacher(tmp_path) -> None:
    common = ["pipeline=prune", "model=llama_teacher", "data=docs_en", "data.calib.num_samples=32",
              "data.eval.max_windows=48", "eval.batch_size=8", "prune.sparsity=0.5"]
    mag = run_shrink(common + ["prune.method=magnitude"], tmp_path / "mag")
    sgpt = run_shrink(common + ["prune.method=sparsegpt", "eval.baseline=false"], tmp_path / "sgpt")
    dense = mag["baseline_ppl"]["docs-en-test"]
    mag_increase = mag["ppl"]["docs-en-test"] - dense
    sgpt_increase = sgpt["ppl"]["docs-en-test"] - dense
    assert sgpt_increase <= 0.6 * mag_increase, (dense, mag_increase, sgpt_increase)


def test_semi_structured_kernels_refuse_before_pruning(tmp_path, tiny_model_dir) -> None:
    """fp32 or no GPU: refused when the config is checked, before the prune stage spends its time."""
    common = ["pipeline=prune", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
              "prune.pattern='2:4'", "eval.sparse_kernels=true", "eval.baseline=false"]
    with pytest.raises(ShrinkError, match="eval.sparse_kernels.*float16/bfloat16.*float32"):
        run_shrink(common, tmp_path / "fp32")
    assert not (tmp_path / "fp32").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ShrinkError, match="eval.sparse_kernels.*CUDA"):
            run_shrink(common + ["model.dtype=float16", "model.device=auto"], tmp_path / "cpu")
        assert not (tmp_path / "cpu").exists()


def test_semi_structured_conversion_takes_only_what_the_kernels_accept() -> None:
    """2:4 pattern and a shape the picked backend takes (cuSPARSELt: multiples of 16 in fp16)."""
    from prune.baselines import has_nm_pattern
    from prune.semi_structured import kernel_accepts

    W = torch.randn(32, 64).half()
    W.view(32, 16, 4)[..., :2] = 0
    assert has_nm_pattern(W, 2, 4) and kernel_accepts(W)
    assert has_nm_pattern(W[:24], 2, 4) and not kernel_accepts(W[:24])  # 24 rows: not a multiple of 16
    assert not kernel_accepts(W.float())  # cuSPARSELt, the default backend, has no fp32 kernels
    W[0, 0] = W[0, 1] = W[0, 2] = 1.0
    assert not has_nm_pattern(W, 2, 4)
