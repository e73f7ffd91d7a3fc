"""`shrink plan`: memory per recipe stage from a config alone, and a balanced device_map."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from engine.errors import ShrinkError
from shrink.plan import run_plan
from shrink.plan.args import load_config, parse_plan_args, parse_target
from shrink.plan.compute import compute_plan
from shrink.plan.memory import build_meta_model, gptq_bytes, kv_geometry
from shrink.plan.placement import balance
from tests.conftest import ROOT, run_shrink, save_with_tokenizer, tiny_config, tiny_data_overrides

CONFIGS = ROOT / "tests" / "fixtures" / "configs"
LLAMA70 = CONFIGS / "llama-2-70b.json"


def plan_for(*args: str):
    return compute_plan(parse_plan_args(list(args)))


@pytest.mark.parametrize("name,billions", [("opt-175b", 175), ("bloom-176b", 176), ("llama-2-70b", 69)])
def test_published_configs_build_on_meta_with_their_parameter_counts(name: str, billions: float) -> None:
    model = build_meta_model(load_config(CONFIGS / f"{name}.json"))
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(billions * 1e9, rel=0.01)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_kv_cache_handles_gqa_mha_and_mqa() -> None:
    plan, _ = plan_for(f"model.path={LLAMA70}", "target=1xH100-80GB", "batch=4", "context=4096")
    assert plan["workload"]["kv_cache_bytes"] == 2 * 80 * 8 * 128 * 4096 * 4 * 2  # GQA: 8 KV heads
    assert kv_geometry(load_config(CONFIGS / "bloom-176b.json")) == (70, 112, 128)  # MHA
    assert kv_geometry(tiny_config("falcon")) == (2, 1, 16)  # multi_query: one KV head


def test_gptq_bytes_of_one_linear() -> None:
    qweight, qzeros, scales, g_idx = 4096 * 4096 // 2, 32 * 4096 // 2, 32 * 4096 * 2, 4096 * 4
    assert gptq_bytes(4096, 4096, 4, 128) == qweight + qzeros + scales + g_idx
    assert gptq_bytes(4096, 4096, 4, -1) == qweight + 4096 // 2 + 4096 * 2 + g_idx  # one group
    assert gptq_bytes(4096, 4096, 4, 128, awq=True) == qweight + qzeros + scales  # AWQ: no g_idx
    assert gptq_bytes(576, 64, 4, 128, awq=True) == 576 * 64 // 2 + 9 * (8 * 4 + 64 * 2)  # groups of gcd = 64


def test_stages_dense_2of4_and_gptq_are_priced_as_stored() -> None:
    plan, _ = plan_for(f"model.path={LLAMA70}", "target=4xA100-80GB", "pipeline=prune_quantize",
                       "prune.pattern=2:4", "quant.bits=4", "quant.group_size=128")
    dense, pruned, quant = plan["stages"]
    assert dense["weights_bytes"] == plan["model"]["params"] * 2  # bf16, untied head
    assert pruned["embeddings_bytes"] == dense["embeddings_bytes"]  # only layer Linears are sparse
    norms = 80 * 2 * 8192 * 2
    assert (pruned["layers_bytes"] - norms) / (dense["layers_bytes"] - norms) == pytest.approx(9 / 16)
    assert quant["head_bytes"] == dense["head_bytes"]  # lm_head stays fp16
    bits = (quant["layers_bytes"] - norms) * 8 / ((dense["layers_bytes"] - norms) / 2)
    assert bits == pytest.approx(4 + (16 + 4) / 128, abs=0.01)  # + fp16 scale and 4-bit zero per 128


def test_balance_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(30):
        sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 8))]
        parts = rng.randint(1, 4)
        bounds = balance(sizes, parts)
        got = max(sum(sizes[bounds[d]:bounds[d + 1]]) for d in range(parts))
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                   for cuts in itertools.combinations_with_replacement(range(len(sizes) + 1), parts - 1))
        assert got == best and bounds[0] == 0 and bounds[-1] == len(sizes)


def test_llama70b_gptq4_on_4_gpus_is_balanced_non_uniformly_and_covers_the_model() -> None:
    from accelerate.utils import check_device_map

    plan, dmap = plan_for(f"model.path={LLAMA70}", "target=4xA100-80GB", "pipeline=quantize", "quant.bits=4")
    assert plan["fits"] and plan["device_map_stage"] == "quantize"
    layers = [d["num_layers"] for d in plan["devices"]]
    assert sum(layers) == 80 and layers[0] < max(layers) and layers[-1] < max(layers)  # embeddings / head
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 3 and dmap["model.norm"] == 3
    assert sorted(dmap[f"model.layers.{i}"] for i in range(80)) == [d for d in range(4) for _ in range(layers[d])]
    totals = [d["total_bytes"] for d in plan["devices"]]
    assert max(totals) - min(totals) < 2 * (totals[1] / layers[1])  # within about a layer of each other
    check_device_map(build_meta_model(load_config(LLAMA70)), dmap)


def test_llama70b_fits_one_h100_only_after_quantization() -> None:
    plan, dmap = plan_for(f"model.path={LLAMA70}", "target=1xH100-80GB", "pipeline=quantize", "quant.bits=4")
    assert [s["fits"] for s in plan["stages"]] == [False, True]
    assert set(dmap.values()) == {0}


@pytest.mark.parametrize("family", ["llama", "opt", "bloom", "gpt2", "falcon", "gpt_neox", "mixtral", "deepseek_v3",
                                    "gpt_oss"])
def test_device_map_of_every_family_loads_in_transformers(tmp_path: Path, family: str) -> None:
    """Names must be the model's own modules: transformers loads with the map (GPUs -> cpu here)."""
    from accelerate.utils import check_device_map

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    model.save_pretrained(tmp_path / "m")
    run_plan([f"model.path={tmp_path / 'm'}", "target=2xT4-16GB", f"out={tmp_path / 'plan'}"])
    dmap = json.loads((tmp_path / "plan" / "device_map.json").read_text())
    assert set(dmap.values()) <= {0, 1}
    check_device_map(model, dmap)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map={k: "cpu" for k in dmap})
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family,group", [("llama", 32), ("mixtral", 32), ("llama-96", 128)])
def test_quantized_bytes_match_a_real_gptq_export(tmp_path: Path, tiny_model_dir, shipped_tokenizer, family: str,
                                                  group: int) -> None:
    """Per-expert GPTQ matrices and full-precision routers are priced as the export stores them;
    llama-96 (inputs of 96 and 256): AWQ's one group for the whole model is 32, down_proj's too."""
    if family == "llama-96":
        config = tiny_config("llama")
        config.hidden_size, config.intermediate_size = 96, 256
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 3, 1, 32
        torch.manual_seed(0)
        folder = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config).eval(), tmp_path / "m",
                                     shipped_tokenizer)
    else:
        folder = tiny_model_dir(family)
    run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.method=rtn",
                "quant.bits=4", f"quant.group_size={group}"], tmp_path / "run")
    plan, _ = plan_for(f"model.path={folder}", "target=1xT4-16GB", "dtype=float32", "pipeline=quantize",
                       "quant.bits=4", f"quant.group_size={group}")
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert plan["stages"][-1]["weights_bytes"] == stored


@pytest.mark.parametrize("args,match", [
    (["target=4xA100"], "target"),
    (["target=0xA100-80GB"], "target"),
    (["target=1xA100-80GB", "batch=two"], "batch"),
    (["target=1xA100-80GB", "quant.bits=four"], "quant.bits"),
    (["target=1xA100-80GB", "colour=red"], "colour"),
    (["target=1xA100-80GB", "dtype=int3"], "dtype"),
])
def test_bad_arguments_name_the_key(args: list[str], match: str) -> None:
    with pytest.raises(ShrinkError, match=match):
        plan_for(f"model.path={LLAMA70}", *args)


def test_missing_config_and_target_that_fits_nothing_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(ShrinkError, match="model.path"):
        run_plan([f"model.path={tmp_path / 'none.json'}", "target=1xA100-80GB", f"out={tmp_path / 'a'}"])
    with pytest.raises(ShrinkError, match="embeddings alone needs"):
        run_plan([f"model.path={CONFIGS / 'bloom-176b.json'}", "target=8xT4-4GB", f"out={tmp_path / 'b'}"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_target_parsing() -> None:
    t = parse_target("8xA100-40GB", reserve=0.2)
    assert (t.count, t.name, t.gib) == (8, "A100", 40.0)
    assert t.usable_bytes == int(40 * 1024**3 * 0.8)
    assert parse_target("2xRTX-4090-24GB").name == "RTX-4090"


@pytest.mark.slow
def test_cli_writes_plan_and_device_map(tmp_path: Path) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "shrink.cli", "plan", f"model.path={LLAMA70}", "target=4xA100-80GB",
           "pipeline=quantize", f"out={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| GPU | layers |" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["target"]["count"] == 4 and (tmp_path / "device_map.json").is_file()
    bad = subprocess.run(cmd[:-2] + ["pipeline=eval", "target=1xA100-1GB", f"out={tmp_path / 'x'}"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("shrink: error: target:")


MOE = {"mixtral-8x22b": (141, 39), "qwen3-235b-a22b": (235, 22), "deepseek-v3": (671, 37)}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_configs_price_weights_at_total_and_compute_at_active_params(name: str) -> None:
    total, active = MOE[name]
    plan, _ = plan_for(f"model.path={CONFIGS / name}.json", "target=8xH100-80GB")
    assert plan["model"]["params"] == pytest.approx(total * 1e9, rel=0.01)
    assert plan["model"]["active_params"] == pytest.approx(active * 1e9, rel=0.02)
    assert plan["stages"][0]["weights_bytes"] == plan["model"]["params"] * 2  # every expert is stored (bf16)


def test_mixtral_flops_per_token_count_only_the_routed_experts() -> None:
    plan, _ = plan_for(f"model.path={CONFIGS / 'mixtral-8x22b.json'}", "target=4xH100-80GB", "context=4096")
    h, inter, layers, vocab, heads, kv = 6144, 16384, 56, 32000, 48, 8
    per_layer = 2 * h * h + 2 * h * (kv * 128) + 8 * h + 2 * 3 * h * inter  # attention, router, 2 of 8 experts
    matmul = layers * per_layer + vocab * h  # + lm_head; the input embedding is a lookup
    assert plan["workload"]["flops_per_token"] == 2 * matmul + 2 * layers * heads * 4096 * (128 + 128)


def test_deepseek_v3_caches_the_mla_latent_and_its_dense_layers_are_not_experts() -> None:
    plan, _ = plan_for(f"model.path={CONFIGS / 'deepseek-v3.json'}", "target=8xH100-80GB", "batch=2", "context=4096")
    assert plan["model"]["kv_values_per_token_per_layer"] == 512 + 64
    assert plan["workload"]["kv_cache_bytes"] == 61 * (512 + 64) * 4096 * 2 * 2
    moe = plan["moe"]
    assert (moe["experts_blocks"], moe["experts_per_block"], moe["experts_per_token"]) == (58, 256, 8)  # 3 dense
    placement = moe["expert_parallel"]["placement"]
    assert "model.layers.2.mlp.experts" not in placement and "model.layers.3.mlp.experts" in placement


def test_gptq_prices_each_expert_as_a_matrix_and_keeps_routers() -> None:
    plan, _ = plan_for(f"model.path={CONFIGS / 'mixtral-8x22b.json'}", "target=2xH100-80GB", "pipeline=quantize",
                       "quant.bits=4", "quant.group_size=128")
    dense, quant = plan["stages"]
    h, inter, layers = 6144, 16384, 56
    # the default (asymmetric 4-bit) is written in AWQ's layout: no g_idx
    expert = 2 * gptq_bytes(h, inter, 4, 128, awq=True) + gptq_bytes(inter, h, 4, 128, awq=True)  # w1, w3, w2
    assert plan["moe"]["expert_bytes"] == layers * 8 * expert
    attn = 2 * gptq_bytes(h, h, 4, 128, awq=True) + 2 * gptq_bytes(h, 1024, 4, 128, awq=True)
    router_and_norms = 8 * h * 2 + 2 * h * 2
    assert quant["layers_bytes"] == layers * (8 * expert + attn + router_and_norms)
    assert [dense["fits"], quant["fits"]] == [False, True]  # 141B: 2 x 80 GB only after 4-bit


def test_experts_are_spread_over_the_gpus_and_plans_fit_or_refuse() -> None:
    plan, dmap = plan_for(f"model.path={CONFIGS / 'deepseek-v3.json'}", "target=8xH200-141GB", "pipeline=quantize",
                          "quant.bits=4")
    ep = plan["moe"]["expert_parallel"]
    assert [s["fits"] for s in plan["stages"]] == [False, True] and plan["fits"] and ep["fits"]
    assert {d["experts_per_block"] for d in ep["devices"]} == {32}
    for ranges in ep["placement"].values():  # contiguous, disjoint, all 256 experts
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and ranges[0][0] == 0 and ranges[-1][1] == 256
    assert sorted(set(dmap.values())) == list(range(8))  # the pipeline device_map uses every GPU too
    dense, _ = plan_for(f"model.path={CONFIGS / 'deepseek-v3.json'}", "target=8xH200-141GB", "pipeline=eval")
    assert not dense["fits"] and dense["offloaded_to_cpu"] and not dense["moe"]["expert_parallel"]["fits"]
    uneven, _ = plan_for(f"model.path={CONFIGS / 'qwen3-235b-a22b.json'}", "target=3xH100-80GB", "pipeline=quantize")
    assert [d["experts_per_block"] for d in uneven["moe"]["expert_parallel"]["devices"]] == [42, 43, 43]
    with pytest.raises(ShrinkError, match="alone needs"):  # one bf16 DeepSeek-V3 layer is larger than 16 GB
        plan_for(f"model.path={CONFIGS / 'deepseek-v3.json'}", "target=8xT4-16GB", "pipeline=eval")


def test_moe_plan_is_written_and_printed_with_its_expert_layout(tmp_path: Path, capsys) -> None:
    run_plan([f"model.path={CONFIGS / 'qwen3-235b-a22b.json'}", "target=4xH100-80GB", "pipeline=quantize",
              f"out={tmp_path}"])
    printed = capsys.readouterr().out
    assert "experts: 94 blocks x 128 experts, 8 per token" in printed and "| GPU | experts per block |" in printed
    assert "22.19B active params" in printed and "K and V: 2 x 4 KV heads x 128" in printed
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["moe"]["expert_parallel"]["placement"]["model.layers.0.mlp.experts"] == [[0, 32], [32, 64], [64, 96],
                                                                                         [96, 128]]
