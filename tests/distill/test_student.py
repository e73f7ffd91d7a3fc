"""Student initialization (skip, width, scratch, pretrained) and layer maps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.config import StudentConfig
from distill.layer_map import akt_layer_weights, evenly_spaced, parse_layer_map
from distill.student import build_student
from engine.errors import ShrinkError
from engine.modeling import load_tokenizer
from tests.conftest import TEACHER, needs_shared
from tests.distill.helpers import tiny_llama


def calibration() -> torch.Tensor:
    return torch.randint(0, 8192, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(layers=6, hidden=96, heads=6, kv=2)  # head_dim 16


@pytest.fixture(scope="module")
def teacher_tok(shipped_tokenizer):
    return load_tokenizer(shipped_tokenizer)


def test_skip_keeps_every_kth_layer_and_copies_weights_exactly(teacher, teacher_tok) -> None:
    s = build_student(StudentConfig(init="skip", num_layers=3), teacher, teacher_tok, calibration)
    assert s.report["teacher_layers"] == [0, 3, 5]
    t_sd, s_sd = teacher.state_dict(), s.model.state_dict()
    for i, j in enumerate([0, 3, 5]):
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight"):
            assert torch.equal(s_sd[f"model.layers.{i}.{name}"], t_sd[f"model.layers.{j}.{name}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[name], t_sd[name])
    assert s.model.config.num_hidden_layers == 3 and s.model.lm_head.weight is s.model.model.embed_tokens.weight
    explicit = build_student(StudentConfig(init="skip", layers=[0, 5]), teacher, teacher_tok, calibration)
    assert torch.equal(explicit.model.model.layers[1].mlp.up_proj.weight, teacher.model.layers[5].mlp.up_proj.weight)
    with pytest.raises(ShrinkError, match="teacher layer 9 does not exist"):
        build_student(StudentConfig(init="skip", layers=[0, 9]), teacher, teacher_tok, calibration)


def test_width_produces_the_requested_shape_copies_kept_weights_and_runs(teacher, teacher_tok) -> None:
    cfg = StudentConfig(init="width", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                        intermediate_size=96)
    s = build_student(cfg, teacher, teacher_tok, calibration)
    config = s.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.head_dim) == (2, 64, 4, 2, 96, 16)
    layer = s.model.model.layers[0].self_attn
    assert layer.q_proj.weight.shape == (64, 64) and layer.k_proj.weight.shape == (32, 64)
    # kept embedding columns are teacher columns, in order
    emb_t, emb_s = teacher.model.embed_tokens.weight, s.model.model.embed_tokens.weight
    cols = [next(j for j in range(96) if torch.equal(emb_t[:, j], emb_s[:, i])) for i in range(64)]
    assert cols == sorted(cols)
    # the kept query heads of the first kept layer, 2 per kept KV group
    assert s.report["teacher_layers"] == [0, 5]
    kept = s.report["width"]["heads_kept"][0]
    assert len(kept) == 4 and len({h // 3 for h in kept}) == 2
    q_t = teacher.model.layers[0].self_attn.q_proj.weight
    rows = torch.cat([torch.arange(h * 16, h * 16 + 16) for h in kept])
    assert torch.equal(layer.q_proj.weight, q_t[rows][:, cols])
    logits = s.model(input_ids=torch.randint(0, 8192, (1, 12))).logits
    assert logits.shape == (1, 12, 8192) and torch.isfinite(logits).all()
    with pytest.raises(ShrinkError, match="may only shrink"):
        build_student(StudentConfig(init="width", hidden_size=64, num_heads=4, num_kv_heads=4), teacher, teacher_tok,
                      calibration)


def test_scratch_student_has_the_chosen_shape(teacher, teacher_tok) -> None:
    s = build_student(StudentConfig(init="scratch", num_layers=2, hidden_size=64), teacher, teacher_tok, calibration)
    config = s.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == (2, 64, 4, 2, 16)
    again = build_student(StudentConfig(init="scratch", num_layers=2, hidden_size=64), teacher, teacher_tok,
                          calibration)
    assert torch.equal(s.model.lm_head.weight, again.model.lm_head.weight)  # seeded: same on every rank


def other_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer trained on the spot (a different vocabulary)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = ["def main(): return 0", "print the documentation of perl", "the quick brown fox"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def test_pretrained_student_with_another_tokenizer_is_refused_or_mapped(tmp_path, teacher, teacher_tok) -> None:
    folder = tmp_path / "student"
    tiny_llama(layers=2, vocab=300).save_pretrained(folder)
    other_tokenizer(folder)
    with pytest.raises(ShrinkError, match="tokenizer .* differs from the teacher's"):
        build_student(StudentConfig(init="pretrained", path=str(folder)), teacher, teacher_tok, calibration)
    mapped = build_student(StudentConfig(init="pretrained", path=str(folder), vocab_map=True), teacher, teacher_tok,
                           calibration)
    assert mapped.tokenizer is teacher_tok and mapped.report["vocab"]["mapped"]
    emb = mapped.model.get_input_embeddings().weight
    assert emb.shape[0] == 8192 and mapped.model.lm_head.weight is emb
    student_tok = PreTrainedTokenizerFast.from_pretrained(folder)
    old = tiny_llama(layers=2, vocab=300).get_input_embeddings().weight
    token = "the"
    assert torch.equal(emb[teacher_tok.get_vocab()[token]], old[student_tok.get_vocab()[token]])
    assert mapped.report["vocab"]["shared_tokens"] > 200


def test_a_pretrained_student_with_the_teachers_tokenizer_loads_as_it_is(shipped_shared, teacher_tok) -> None:
    s = build_student(StudentConfig(init="pretrained", path=str(shipped_shared / "models" / "llama-student")),
                      tiny_llama(layers=2), teacher_tok, calibration)
    assert s.report["layers"] == 4 and s.report["hidden_size"] == 32 and not s.report["vocab"]["mapped"]
    assert s.tokenizer is teacher_tok


@needs_shared
def test_the_shared_pretrained_student_loads_with_the_shared_teachers_tokenizer() -> None:
    from tests.conftest import STUDENT

    s = build_student(StudentConfig(init="pretrained", path=str(STUDENT)), tiny_llama(layers=2),
                      load_tokenizer(TEACHER), calibration)
    assert s.report["layers"] == 4 and s.report["hidden_size"] == 256 and not s.report["vocab"]["mapped"]


def test_layer_maps() -> None:
    assert evenly_spaced(4, 8) == [0, 2, 5, 7] and evenly_spaced(1, 8) == [7]
    assert evenly_spaced(8, 8) == list(range(8))
    assert parse_layer_map("uniform", 4, 8) == [(0, 0), (1, 2), (2, 5), (3, 7)]
    assert parse_layer_map("uniform", 3, 6) == [(0, 0), (1, 3), (2, 5)]
    assert parse_layer_map("last", 4, 8) == [(3, 7)]
    assert parse_layer_map("last:2", 4, 8) == [(2, 5), (3, 7)]
    assert parse_layer_map("1:2, 0:0", 4, 8) == [(0, 0), (1, 2)]
    with pytest.raises(ShrinkError, match="student layer 4 does not exist"):
        parse_layer_map("0:1,4:3", 4, 8)
    with pytest.raises(ShrinkError, match="teacher layer 8 does not exist"):
        parse_layer_map("0:8", 4, 8)
    with pytest.raises(ShrinkError, match="mapped twice"):
        parse_layer_map("0:1,0:2", 4, 8)
    with pytest.raises(ShrinkError, match="is not uniform"):
        parse_layer_map("every-other", 4, 8)
    with pytest.raises(ShrinkError, match="K must be"):
        parse_layer_map("last:5", 4, 8)
    assert akt_layer_weights([(0, 1), (1, 3)], 2.0, None) == [1.0, 1.0]
    assert akt_layer_weights([(0, 1), (1, 3)], 1.0, [1, 3]) == [0.25, 0.75]
    with pytest.raises(ShrinkError, match="2 weights for 3"):
        akt_layer_weights([(0, 1), (1, 3), (2, 5)], 1.0, [1, 1])
