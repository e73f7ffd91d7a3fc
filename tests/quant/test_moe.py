"""Mixture-of-experts models through quantize, prune and prune_quantize: every expert reached,
exported under the family's per-expert names, reloaded to the same perplexity."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from engine.errors import ShrinkError
from tests.conftest import MOE_FAMILIES, run_shrink, tiny_data_overrides


def keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def layer_bytes(folder) -> int:
    """Bytes of the decoder layers' tensors in a saved model (embeddings and head left out)."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys() if ".layers." in k]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_reaches_every_expert_and_its_export_reloads_exactly(tmp_path, tiny_model_dir, family) -> None:
    folder = tiny_model_dir(family)
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(),
                          "eval.baseline=false"], out)
    cov = metrics["coverage"]
    assert cov["fraction"] >= 0.9
    assert all(n.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate") for n in cov["not_compressed"])
    stage = metrics["stages"]["quantize"]
    tokens = stage["moe"]["tokens_per_expert"]
    assert tokens and all(sum(t) == 8 * 32 * 2 for t in tokens.values())  # 8 windows of 32, top-2
    saved = keys(out / "model")
    expert = "block_sparse_moe.experts.1.w2" if family == "mixtral" else "mlp.experts.1.down_proj"
    layer = "model.layers.1."
    # the default (asymmetric 4-bit) in AWQ's layout: no g_idx, the routers listed as float
    assert {f"{layer}{expert}.{s}" for s in ("qweight", "qzeros", "scales")} <= saved
    assert not any(k.endswith(".g_idx") for k in saved) and not any("gate_up_proj" in k for k in saved)
    q = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "awq" and q["zero_point"] is True
    floats = [n for n in q["modules_to_not_convert"] if n.startswith("model.layers.")]  # disk names
    assert sorted(n.rsplit(".", 1)[-1] for n in floats) == sorted(n.rsplit(".", 1)[-1] for n in cov["not_compressed"])
    assert not any(f in k for f in q["modules_to_not_convert"] for k in saved if k.endswith(".qweight"))
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)
    assert reloaded["params"] == metrics["params"]
    # the decoder layers (experts included) shrink from 32 to ~4 bits per weight (+ routers, norms)
    assert layer_bytes(out / "model") < 0.2 * layer_bytes(folder)
    assert_float16_outside_packed(out / "model")
    parts = metrics["size_parts"]
    assert sum(p["params"] for p in parts.values()) == metrics["params"]
    assert sum(p["bytes"] for p in parts.values()) == pytest.approx(metrics["size_bytes"], rel=0.02)  # + headers
    assert metrics["bits_per_weight"] == pytest.approx(8 * metrics["size_bytes"] / metrics["params"])


def assert_float16_outside_packed(folder) -> None:
    """What gptqmodel/AutoGPTQ write: every float tensor outside the packed layers (embeddings,
    norms, routers, biases) and the scales in float16, and config.json says so."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    floats = {k: d for k, d in dtypes.items() if d.startswith(("F", "BF"))}
    assert floats and set(floats.values()) == {"F16"}, {d for d in floats.values()}
    assert any(k.endswith("embed_tokens.weight") for k in floats)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"


def test_export_dtype_float32_keeps_the_model_dtype_and_a_bad_one_is_refused(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("mixtral")
    args = ["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false",
            "quant.method=rtn"]
    wide = run_shrink(args + ["quant.export_dtype=float32"], tmp_path / "f32")
    half = run_shrink(args, tmp_path / "f16")
    with safe_open(str(tmp_path / "f32" / "model" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    # the same packed layers; the float16 export is smaller by half the float tensors' bytes
    outside = wide["size_parts"]["outside_layers"]
    assert half["size_parts"]["outside_layers"]["bytes"] == outside["bytes"] // 2
    assert half["params"] == wide["params"] and half["size_bytes"] < wide["size_bytes"]
    assert half["ppl"] != wide["ppl"] and half["ppl"] == pytest.approx(wide["ppl"], rel=1e-3)
    with pytest.raises(ShrinkError, match=r"^quant\.export_dtype: 'int8'"):
        run_shrink(args + ["quant.export_dtype=int8"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family,extra", [("mixtral", []), ("qwen2_moe", ["prune.method=wanda"]),
                                          ("deepseek_v3", ["prune.pattern=2:4"]),
                                          ("gpt_oss", ["prune.method=magnitude"])])
def test_pruned_moe_saves_as_a_plain_transformers_model(tmp_path, tiny_model_dir, family, extra) -> None:
    import transformers

    folder = tiny_model_dir(family)
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=prune", f"model.path={folder}", *tiny_data_overrides(),
                          "eval.baseline=false", *extra], out)
    assert metrics["coverage"]["fraction"] >= 0.9
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts
    for m in experts:
        for p in (m.gate_up_proj, m.down_proj):
            assert (p == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"], rel=1e-4)


def test_prune_quantize_on_moe_reloads_exactly(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("mixtral")
    out = tmp_path / "run"
    metrics = run_shrink(["pipeline=prune_quantize", f"model.path={folder}", *tiny_data_overrides(),
                          "eval.baseline=false", "prune.joint_quant=true"], out)
    assert metrics["coverage"]["fraction"] >= 0.9
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02)
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)


def test_under_min_coverage_the_run_stops_with_one_line_naming_the_modules(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("qwen3_moe")
    out = tmp_path / "run"
    with pytest.raises(ShrinkError, match=r"min_coverage: .*model\.layers\.0\.mlp\.experts\.0\.down_proj"):
        run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.skip=[mlp.experts.*]"],
                   out)
    assert not (out / "model").exists()
    lowered = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false",
                          "quant.skip=[mlp.experts.*,gate]", "min_coverage=0"], tmp_path / "low")
    assert lowered["coverage"]["fraction"] < 0.5
    assert any(".experts.0.up_proj" in n for n in lowered["coverage"]["not_compressed"])
    assert lowered["ppl"] and all(torch.isfinite(torch.tensor(v)) for v in lowered["ppl"].values())
