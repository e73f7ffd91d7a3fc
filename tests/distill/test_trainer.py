"""The training engine on tiny models: exact resume, the progressive schedule, the top-k
cache, the frozen teacher, TensorBoard."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.capture import QKVCapture
from distill.data import WindowSampler, sample_start
from distill.losses import qkv_relation_loss
from distill.plan import make_train_plan
from distill.student import skip_student
from distill.teacher import TopKCache, prepare_teacher, top_logits
from distill.trainer import RunFiles, Trainer
from engine.config import ModelConfig
from engine.errors import ShrinkError
from tests.distill.helpers import random_stream, settings, tiny_llama

CPU = torch.device("cpu")
PAIRS = [(0, 1), (1, 3)]


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(layers=4).requires_grad_(False)


def trainer(teacher, distill, topk=None, student=None) -> Trainer:
    student = student or skip_student(teacher, [1, 3])
    plan = make_train_plan(distill, PAIRS, student)
    sampler = WindowSampler(random_stream(), distill.seq_len, 0)
    return Trainer(student, teacher, CPU, sampler, plan, distill, CPU, topk=topk)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("schedule", ["joint", "progressive"])
def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(teacher, tmp_path: Path, schedule: str) -> None:
    distill = settings(loss="akt+logits+lm", steps=5, grad_accum=2, schedule=schedule, progressive_steps=2)
    full = trainer(teacher, distill)
    result = full.run(RunFiles(checkpoint=tmp_path / "a"))
    assert result.steps == (5 if schedule == "joint" else 9)
    stopped = trainer(teacher, distill)
    files = RunFiles(checkpoint=tmp_path / "b", settings_digest="same")
    partial = stopped.run(files, stop_at=3)
    assert partial.stopped_at == 3 and (tmp_path / "b" / "trainer.json").is_file()
    resumed = trainer(teacher, distill)  # a fresh process: fresh student, optimizer, RNG
    torch.manual_seed(1234)
    final = resumed.run(RunFiles(checkpoint=tmp_path / "b", resume=True, settings_digest="same"))
    assert final.resumed_from == 3 and final.steps == result.steps
    a, b = weights(full.student), weights(resumed.student)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert final.history == result.history
    # a kill between the two renames of a checkpoint swap leaves only the previous one
    (tmp_path / "b").rename(tmp_path / ".b.old")
    again = trainer(teacher, distill)
    assert again.run(RunFiles(checkpoint=tmp_path / "b", resume=True, settings_digest="same")).resumed_from == 3
    with pytest.raises(ShrinkError, match="other distill settings"):
        trainer(teacher, distill).run(RunFiles(checkpoint=tmp_path / "b", resume=True, settings_digest="changed"))


def test_progressive_phases_train_one_layer_pair_at_a_time(teacher) -> None:
    distill = settings(loss="akt", steps=2, schedule="progressive", progressive_steps=2)
    t = trainer(teacher, distill)
    assert [(p.name, p.steps) for p in t.plan.phases] == [("layer0", 2), ("layer1", 2), ("joint", 2)]
    assert list(t.plan.phases[0].objective.akt) == [0] and not t.plan.phases[0].objective.logit
    assert t.plan.phases[2].objective.logit == 1.0 and set(t.plan.phases[2].objective.akt) == {0, 1}
    second = t.plan.phases[1].trainable
    assert "model.layers.0.mlp.down_proj.weight" in second and "model.layers.1.self_attn.q_proj.weight" in second
    assert "model.layers.0.self_attn.q_proj.weight" not in second and "model.embed_tokens.weight" not in second
    first = t.plan.phases[0].trainable  # what can move layer 0's Q/K/V, nothing after it
    assert {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.v_proj.weight"} <= first
    assert not {"model.norm.weight", "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.mlp.up_proj.weight"} & first
    before = weights(t.student)
    t.run(RunFiles(), stop_at=2)  # the first phase only: embeddings and layer 0
    after = weights(t.student)
    assert all(torch.equal(before[k], after[k]) for k in before
               if k.startswith(("model.layers.1.", "model.layers.0.mlp.", "model.norm.")))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    assert all(p.requires_grad for p in t.student.parameters())  # unfrozen afterwards


def akt_on(teacher, student, ids: torch.Tensor) -> list[float]:
    """The AKT loss of each pair on a fixed batch."""
    with torch.no_grad(), QKVCapture(student, [0, 1]) as s_cap, QKVCapture(teacher, [1, 3]) as t_cap:
        student(input_ids=ids, use_cache=False)
        teacher(input_ids=ids, use_cache=False)
        return [qkv_relation_loss(t_cap.pop(t), s_cap.pop(s), 4).item() for s, t in PAIRS]


def test_akt_training_lowers_the_relation_loss_and_leaves_the_teacher_alone() -> None:
    teacher = tiny_llama(layers=4).requires_grad_(False)
    with torch.no_grad():  # sharper attention relations than a random init has
        for layer in teacher.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.mul_(8)
    before = weights(teacher)
    student = tiny_llama(layers=2, hidden=32, heads=2, kv=1, seed=1)  # narrower, other head counts
    ids = random_stream(64, seed=5).view(4, 16)
    start = akt_on(teacher, student, ids)
    distill = settings(loss="akt", steps=12, lr=1e-2, batch_size=4)
    t = trainer(teacher, distill, student=student)
    result = t.run(RunFiles())
    end = akt_on(teacher, t.student, ids)
    assert end[0] < 0.95 * start[0] and end[1] < 0.95 * start[1]
    assert result.tokens == 12 * 4 * 16 and result.tokens_per_s > 0 and len(result.history) == 12
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_v_relations_alone_leave_the_mapped_layers_queries_and_keys_untouched(teacher) -> None:
    """distill.relations=v: the AKT term reaches V and what feeds it, never the Q/K projections
    of the last mapped layer (student layer 1; layer 0's Q/K shape the input of layer 1's V)."""
    grads = {}
    for relations in ("qkv", "v"):
        t = trainer(teacher, settings(loss="akt", relations=relations, weights={"logit": 0.0}))
        ids = t.sampler.samples(0, 2)
        with t.captures() as (s_cap, t_cap):
            total, terms = t.micro_loss(ids, 0, t.plan.phases[0].objective, s_cap, t_cap)
        total.backward()
        grads[relations] = {n: p.grad for n, p in t.student.named_parameters()}
    size = {r: {n: 0.0 if g is None else g.abs().sum().item() for n, g in grads[r].items()} for r in grads}
    attn = "model.layers.{}.self_attn.{}_proj.weight"
    assert all(size["qkv"][attn.format(1, p)] > 0 for p in "qkv")
    assert size["v"][attn.format(1, "q")] == 0 and size["v"][attn.format(1, "k")] == 0
    assert size["v"][attn.format(1, "v")] > 0 and size["v"][attn.format(0, "q")] > 0


def test_prepared_teacher_is_frozen_in_its_own_dtype() -> None:
    model = tiny_llama(layers=2).train()
    t, device = prepare_teacher(model, settings().teacher, ModelConfig(path="unused", dtype="bfloat16"), CPU)
    assert device == CPU and not t.training and t.lm_head.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in t.parameters())
    with pytest.raises(ShrinkError, match="need CUDA"):
        prepare_teacher(model, settings(teacher={"load_in_4bit": True}).teacher,
                        ModelConfig(path="unused"), CPU)


def test_topk_cache_serves_the_logit_term_without_a_teacher_forward(teacher, tmp_path: Path, monkeypatch) -> None:
    distill = settings(loss="logits", steps=3)
    sampler = WindowSampler(random_stream(), distill.seq_len, 0)
    cache = TopKCache(tmp_path / "cache", k=8192, shard=4)
    cache.build(teacher, CPU, sampler, num_samples=6, batch_size=2, ctx=trainer(teacher, distill).ctx)
    assert sorted(p.name for p in cache.folder.iterdir()) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    values, indices = cache.get(3, 2)  # across the two shards
    assert values.shape == (2, 16, 8192) and indices.dtype == torch.int32
    live = trainer(teacher, distill).run(RunFiles())
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: pytest.fail("teacher called"))
    cached = trainer(teacher, distill, topk=cache).run(RunFiles())
    # the whole vocabulary cached: the same loss up to the fp16 storage of the logits
    assert cached.history[0]["logit"] == pytest.approx(live.history[0]["logit"], rel=1e-3)


def test_tensorboard_scalars(teacher, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    distill = settings(loss="akt", steps=2)
    trainer(teacher, distill).run(RunFiles(tensorboard=tmp_path / "tb"))
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_samples_are_a_function_of_the_index() -> None:
    sampler = WindowSampler(torch.arange(100), seq_len=10, seed=3)
    first = sampler.samples(0, 25)  # 2.5 epochs of 10 windows
    assert sorted(first[:10, 0].tolist()) == list(range(0, 100, 10))
    assert torch.equal(WindowSampler(torch.arange(100), 10, 3).samples(12, 5), first[12:17])
    # two ranks of batch 1 read a single process's batch of 2
    assert [sample_start(4, 1, r, 2, 2, 1) for r in (0, 1)] == [sample_start(4, 1, 0, 2, 1, 2) + i for i in (0, 1)]


def test_bf16_autocast_path_runs_with_fp32_master_weights(teacher) -> None:
    t = trainer(teacher, settings(loss="akt+logits+lm", steps=2, precision="bf16"))
    assert t.bf16
    result = t.run(RunFiles())
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[-1].values())
    assert t.student.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("loss,topk", [("akt+logits+lm", False), ("logits+lm", True)])
def test_blockwise_kernels_train_as_the_naive_ones(teacher, tmp_path: Path, loss: str, topk: bool) -> None:
    """distill.kernels=blockwise (relations in row blocks, head terms in token chunks) against the
    reference kernels: the same loss curve and weights within fp32 tolerance."""
    runs = {}
    cache = None
    if topk:
        sampler = WindowSampler(random_stream(), 16, 0)
        cache = TopKCache(tmp_path / "cache", k=64, shard=4)
        cache.build(teacher, CPU, sampler, num_samples=8, batch_size=2, ctx=trainer(teacher, settings()).ctx)
    for kernels in ("naive", "blockwise"):
        distill = settings(loss=loss, steps=4, kernels=kernels, relation_block=5, logit_chunk=7, temperature=2.0)
        runs[kernels] = trainer(teacher, distill, topk=cache)
        runs[kernels].history = runs[kernels].run(RunFiles()).history
    assert runs["blockwise"].chunked_head and not runs["naive"].chunked_head
    naive, blockwise = runs["naive"].history, runs["blockwise"].history
    assert [set(r) for r in naive] == [set(r) for r in blockwise] and len(naive) == 4
    for a, b in zip(naive, blockwise):
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in a)
    a, b = weights(runs["naive"].student), weights(runs["blockwise"].student)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in weights(skip_student(teacher, [1, 3])).items())


def test_top_logits_in_chunks_are_the_top_of_the_whole_logits(teacher) -> None:
    ids = random_stream(64, seed=2).view(2, 32)
    whole = top_logits(teacher, ids, 5)
    chunked = top_logits(teacher, ids, 5, chunk=7)
    assert chunked[0].shape == (2, 32, 5) and torch.equal(chunked[1], whole[1])
    assert torch.allclose(chunked[0], whole[0], atol=1e-5)


def test_activation_checkpointing_recomputes_the_layers_and_trains_the_same(teacher) -> None:
    runs = {}
    for on in (False, True):
        t = trainer(teacher, settings(loss="akt+logits+lm", steps=3, activation_checkpointing=on))
        calls = []
        handle = t.student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        runs[on] = (t.run(RunFiles()).history, len(calls), t)
        handle.remove()
    # the head check's forward, then each step's forward of layer 0, again in a checkpointed backward (which
    # stops recomputing once it has what backward needs: the MLP's forward hooks never see it)
    assert runs[False][1] == 1 + 3 and runs[True][1] == 1 + 6
    for a, b in zip(runs[False][0], runs[True][0]):
        assert all(b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7) for k in a)
    assert not runs[True][2].student.is_activation_checkpointing  # the exported student carries no training switch
