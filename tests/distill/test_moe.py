"""Distillation with mixture-of-experts teachers and students (tiny random configs, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from distill.capture import QKVCapture
from distill.data import WindowSampler
from distill.losses import logit_kd_loss, qkv_relation_loss
from distill.moe import router_weight, sparse_layers
from distill.plan import check_distill_config, make_train_plan
from distill.student import skip_student
from distill.trainer import RunFiles, Trainer
from engine.errors import ShrinkError
from tests.conftest import MOE_FAMILIES, VOCAB, run_shrink, save_with_tokenizer, tiny_config, tiny_model
from tests.distill.helpers import random_stream, settings, tiny_distill, tiny_llama

CPU = torch.device("cpu")


def deep_moe(family: str, layers: int = 4) -> transformers.PreTrainedModel:
    """A 4-layer tiny teacher whose dense/MoE pattern is set per layer by its config:
    DeepSeek-V3 dense layers 0-1 (first_k_dense_replace=2), Qwen2-MoE dense layer 1 (mlp_only_layers)."""
    config = tiny_config(family)
    config.num_hidden_layers = layers
    if family == "deepseek_v3":
        config.first_k_dense_replace = 2
    if family == "qwen2_moe":
        config.mlp_only_layers = [1]
    if getattr(config, "layer_types", None):
        config.layer_types = (config.layer_types * layers)[:layers]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def layer_state(model: torch.nn.Module, i: int) -> dict[str, torch.Tensor]:
    return model.model.layers[i].state_dict()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_skip_student_keeps_the_moe_blocks_of_the_chosen_teacher_layers(family: str) -> None:
    teacher = deep_moe(family)
    keep = [1, 3]
    student = skip_student(teacher, keep)
    for s, t in enumerate(keep):
        mine, theirs = layer_state(student, s), layer_state(teacher, t)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(p.ndim == 3 for p in student.model.layers[1].parameters())  # teacher layer 3 is MoE everywhere
    whole = skip_student(teacher, list(range(4)))  # all layers kept: the very same function
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_dense_and_moe_layer_patterns_follow_the_kept_layers() -> None:
    deepseek = deep_moe("deepseek_v3")
    assert sparse_layers(deepseek.config) == [False, False, True, True]
    assert sparse_layers(skip_student(deepseek, [1, 2, 3]).config) == [False, True, True]
    with pytest.raises(ShrinkError, match="dense layer after an MoE one"):
        skip_student(deepseek, [3, 0])
    qwen = skip_student(deep_moe("qwen2_moe"), [0, 1, 3])
    assert sparse_layers(qwen.config) == [True, False, True]
    assert sparse_layers(tiny_config("mixtral")) is None  # every layer alike


def kd_losses(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """(AKT of student layer 0 against teacher layer 1, logit KD) on fixed ids."""
    with torch.no_grad(), QKVCapture(teacher, [1]) as t_cap, QKVCapture(student, [0]) as s_cap:
        t_logits, s_logits = teacher(input_ids=ids).logits, student(input_ids=ids).logits
        return qkv_relation_loss(t_cap.pop(1), s_cap.pop(0), 4).item(), logit_kd_loss(s_logits, t_logits).item()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_akt_and_logit_kd_from_an_moe_teacher_train_a_dense_student(family: str) -> None:
    teacher = tiny_model(family).requires_grad_(False)
    with torch.no_grad():  # sharper attention relations than a random init has
        for layer in teacher.model.layers:
            for r in "qkv":
                getattr(layer.self_attn, f"{r}_proj").weight.mul_(8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_llama(layers=1, hidden=32, heads=2, kv=2, seed=1)
    ids = random_stream(64, seed=5).view(4, 16)
    start = kd_losses(teacher, student, ids)
    distill = settings(loss="akt", steps=12, lr=1e-2, batch_size=4)
    plan = make_train_plan(distill, [(0, 1)], student)
    assert plan.phases[0].objective.router == 0.0  # a dense student has no router
    trainer = Trainer(student, teacher, CPU, WindowSampler(random_stream(), 16, 0), plan, distill, CPU)
    trainer.run(RunFiles())
    end = kd_losses(teacher, trainer.student, ids)
    assert end[0] < 0.95 * start[0] and end[1] < 0.95 * start[1]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_qkv_capture_on_an_moe_teacher_reads_its_attention_projections() -> None:
    teacher = tiny_model("qwen3_moe")
    seen = {}
    attn = teacher.model.layers[1].self_attn
    handles = [getattr(attn, f"{r}_proj").register_forward_hook(lambda m, i, o, r=r: seen.setdefault(r, o))
               for r in "qkv"]
    with torch.no_grad(), QKVCapture(teacher, [1]) as capture:
        teacher(input_ids=torch.randint(0, VOCAB, (1, 6)), use_cache=False)
        captured = capture.pop(1)
    for h in handles:
        h.remove()
    assert all(torch.equal(getattr(captured, r), seen[r]) for r in "qkv")


def test_router_aux_loss_is_weighted_as_configured_and_balances_the_router() -> None:
    teacher = tiny_model("mixtral").requires_grad_(False)
    with torch.no_grad():  # an unbalanced router: a direction every token shares picks expert 0
        c = torch.randn(teacher.config.hidden_size, generator=torch.Generator().manual_seed(1))
        teacher.model.embed_tokens.weight.add_(3 * c)
        teacher.model.layers[1].mlp.gate.weight[0] = c / c.norm()
    assert router_weight(settings(), skip_student(teacher, [1])) == teacher.config.router_aux_loss_coef
    with pytest.raises(ShrinkError, match="router_aux_weight"):
        router_weight(settings(router_aux_weight=0.1), tiny_llama(layers=1))
    with pytest.raises(ShrinkError, match="router_aux_weight"):
        check_distill_config(settings(router_aux_weight=-1.0))  # before any model is loaded
    finals = {}
    for weight in (0.0, 1.0):
        student = skip_student(teacher, [1])
        distill = settings(loss="logits", steps=10, lr=3e-2, batch_size=4, router_aux_weight=weight)
        plan = make_train_plan(distill, [(0, 1)], student)
        trainer = Trainer(student, teacher, CPU, WindowSampler(random_stream(), 16, 0), plan, distill, CPU)
        history = trainer.run(RunFiles()).history
        assert ("router" in history[0]) == (weight > 0)
        ids = random_stream(64, seed=3).view(4, 16)
        with torch.no_grad():
            finals[weight] = float(trainer.student(input_ids=ids, output_router_logits=True).aux_loss)
        if weight:
            assert history[-1]["router"] < history[0]["router"]
    assert finals[1.0] < finals[0.0]


def test_pipeline_distills_a_skip_moe_student_from_an_moe_teacher(tmp_path: Path, shipped_tokenizer: Path) -> None:
    teacher = save_with_tokenizer(deep_moe("qwen2_moe"), tmp_path / "teacher", shipped_tokenizer)
    m = run_shrink(tiny_distill(teacher, "distill.student.init=skip", "distill.student.layers=[1,3]",
                                "distill.router_aux_weight=0.01"), tmp_path / "out")
    report = m["stages"]["distill"]
    assert report["student"]["teacher_layers"] == [1, 3] and report["router_aux_weight"] == 0.01
    assert {"akt.0", "akt.1", "logit", "router"} <= set(report["final"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert sparse_layers(model.config) == [False, True]
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["mlp_only_layers"] == [0]


def test_deepseek_mla_teacher_distills_by_logits_and_akt_refuses_it_clearly() -> None:
    """Multi-head latent attention has no plain Q/K/V projections to hook."""
    teacher = tiny_model("deepseek_v3").requires_grad_(False)
    for loss in ("logits", "akt"):
        student = tiny_llama(layers=1, hidden=32, heads=2, kv=2, seed=1)
        distill = settings(loss=loss, steps=2, batch_size=2)
        plan = make_train_plan(distill, [(0, 1)], student)
        trainer = Trainer(student, teacher, CPU, WindowSampler(random_stream(), 16, 0), plan, distill, CPU)
        if loss == "logits":
            assert trainer.run(RunFiles()).history[-1]["logit"] > 0
        else:
            with pytest.raises(ShrinkError, match="no Q/K/V projections found in a deepseek_v3"):
                trainer.run(RunFiles())
