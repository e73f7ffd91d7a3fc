"""Fused 3-D experts split into per-expert Linears, calibrated per expert, fused back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.calibration import compress_model, expert_summary
from engine.config import MoeConfig
from engine.coverage import coverage
from engine.errors import ShrinkError
from engine.experts import SplitExperts, disk_names, fuse_experts, split_experts
from engine.modeling import find_decoder_layers, find_linears
from tests.conftest import MOE_FAMILIES, tiny_model

CPU = torch.device("cpu")


def perturbed(family: str) -> nn.Module:
    """A tiny MoE whose every weight and bias is nonzero (gpt_oss initializes biases to 0)."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def windows(n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 8192, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_compute_what_the_fused_ones_do_and_fuse_back_exactly(family: str) -> None:
    model = perturbed(family)
    fused_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = windows(2)
    with torch.no_grad():
        ref = model(x).logits
        assert split_experts(model) > 0
        _, layers = find_decoder_layers(model)
        assert len(layers) == 2  # the expert list is not mistaken for the decoder stack
        split = model(x).logits
        assert fuse_experts(model) > 0
        back = model(x).logits
    torch.testing.assert_close(split, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(back, ref)
    state = model.state_dict()
    assert state.keys() == fused_state.keys()
    assert all(torch.equal(state[k], fused_state[k]) for k in state)


def test_split_experts_carry_the_on_disk_names_of_the_family() -> None:
    mixtral, qwen = tiny_model("mixtral"), tiny_model("qwen2_moe")
    assert disk_names(mixtral) == (("w1", "w3", "w2"), [(".block_sparse_moe.", ".mlp.")])
    assert disk_names(qwen)[0] == ("gate_proj", "up_proj", "down_proj")
    split_experts(mixtral)
    names = find_linears(find_decoder_layers(mixtral)[1][0])
    assert {"mlp.experts.3.w1", "mlp.experts.3.w3", "mlp.experts.3.w2"} <= set(names)
    # gpt_oss: transposed [E, H, 2I] with interleaved gate/up and biases, read from its declaration
    oss = perturbed("gpt_oss")
    fused = oss.model.layers[0].mlp.experts
    W, b = fused.gate_up_proj[1].detach().clone(), fused.gate_up_proj_bias[1].detach().clone()
    split_experts(oss)
    expert = oss.model.layers[0].mlp.experts[1]
    assert torch.equal(expert.gate_proj.weight, W[:, 0::2].t()) and torch.equal(expert.up_proj.bias, b[1::2])


class _Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 16, 8))
        self.down_proj = nn.Parameter(torch.zeros(4, 8, 8))


def test_an_undeclared_or_inconsistent_expert_layout_is_a_clear_error() -> None:
    model = tiny_model("mixtral")
    model.model.layers[0].mlp.experts = _Undeclared()
    with pytest.raises(ShrinkError, match="does not declare their layout"):
        split_experts(model)
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.is_transposed = True  # claims [E, H, 2I] while the tensors are [E, 2I, H]
    with pytest.raises(ShrinkError, match="do not match its declared layout"):
        split_experts(model)


@pytest.mark.parametrize("all_experts", [False, True])
def test_each_expert_is_calibrated_on_its_routed_tokens_or_on_all(all_experts: bool) -> None:
    model, x = perturbed("mixtral"), windows()
    jobs = {}
    report = compress_model(model, x, lambda job: jobs.setdefault(job.name, job) and {}, CPU,
                            skip=["gate"], moe=MoeConfig(all_experts=all_experts, min_tokens=1))
    summary = expert_summary(report)
    counts = summary["tokens_per_expert"]["model.layers.0.mlp.experts"]
    assert sum(counts) == x.numel() * 2 and summary["fallbacks"] == []  # top-2: each token twice
    for e, routed in enumerate(counts):
        n = jobs[f"mlp.experts.{e}.w1"].hessian.n
        assert n == (x.numel() if all_experts else routed)
        assert jobs[f"mlp.experts.{e}.w3"].hessian is jobs[f"mlp.experts.{e}.w1"].hessian
    # every expert Linear and attention Linear was handed over; only the routers were not
    cov = coverage(model, [r["full_name"] for r in report])
    assert cov["fraction"] > 0.99 and cov["not_compressed"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_routed_only_statistics_match_a_forward_hook_on_the_routed_tokens() -> None:
    """An expert's Hessian is 2/n X^T X over exactly the tokens its router sent to it."""
    model, x = perturbed("mixtral"), windows()
    split_experts(model)
    seen = []
    target = model.model.layers[1].mlp.experts[2].w2
    handle = target.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    handle.remove()
    X = torch.cat(seen)
    got = {}
    compress_model(model, x, lambda job: got.update({job.name: job.hessian.H.clone()}) or {}, CPU,
                   batch_size=4, moe=MoeConfig(all_experts=False, min_tokens=1), true_sequential=False)
    torch.testing.assert_close(got["mlp.experts.2.w2"], 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)


def test_experts_with_too_few_tokens_fall_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = perturbed("qwen3_moe")
    seen = []
    report = compress_model(model, windows(), lambda job: seen.append(job) or {}, CPU,
                            moe=MoeConfig(all_experts=False, min_tokens=10**6))
    experts = [j for j in seen if ".experts." in j.name]
    assert experts and all(j.fallback and j.hessian is None for j in experts)
    assert all(not j.fallback and j.hessian is not None for j in seen if ".experts." not in j.name)
    assert len(expert_summary(report)["fallbacks"]) == len(experts)
    assert "calibration-free fallback" in caplog.text


def test_a_stage_under_min_coverage_fails_before_changing_any_weight() -> None:
    model = perturbed("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShrinkError, match=r"min_coverage: .* only \d+\.\d% .*experts"):
        compress_model(model, None, lambda job: {}, CPU, skip=["mlp.*"], min_coverage=0.9)
    fuse_experts(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SplitExperts) for m in model.modules())


def test_stored_expert_names_follow_the_files_keys() -> None:
    from engine.experts import stored_names

    mixtral = ("w1", "w3", "w2")
    keys = [f"model.layers.0.mlp.experts.{e}.{n}.qweight" for e in range(2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert stored_names(keys, "qweight", mixtral) == ("gate_proj", "up_proj", "down_proj")
    assert stored_names([k.replace("gate_proj", "w1") for k in keys if "up" not in k and "down" not in k], "qweight",
                        ("gate_proj", "up_proj", "down_proj")) == ("w1", "up_proj", "down_proj")
    assert stored_names(["model.layers.0.self_attn.q_proj.qweight"], "qweight", mixtral) == mixtral  # no experts
    with pytest.raises(ShrinkError, match=r"experts stored as \['fc1', 'fc2'\]: no single gate/up/down role for 'fc1'"):
        stored_names(["m.experts.0.fc1.qweight", "m.experts.0.fc2.qweight"], "qweight", mixtral)


def test_a_gptq_moe_export_under_other_expert_names_loads_to_the_same_model(tmp_path, tiny_model_dir) -> None:
    """AutoRound and gptqmodel write Mixtral's experts as gate_proj/up_proj/down_proj, not w1/w3/w2."""
    from safetensors.torch import load_file, save_file

    from quant.export import load_quantized_model
    from tests.conftest import run_shrink, tiny_data_overrides

    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('mixtral')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.method=rtn", "quant.group_size=32", "quant.sym=true"], tmp_path / "run")
    ours = tmp_path / "run" / "model"
    other = tmp_path / "other"
    other.mkdir()
    tensors = load_file(str(ours / "model.safetensors"))
    renamed = {k.replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj."): v
               for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()  # the export does use Mixtral's names
    save_file(renamed, str(other / "model.safetensors"), metadata={"format": "pt"})
    for f in ours.iterdir():
        if f.suffix != ".safetensors":
            (other / f.name).write_bytes(f.read_bytes())
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (load_quantized_model(f, dtype=torch.float32)(input_ids=ids).logits for f in (ours, other))
    assert torch.equal(a, b)
