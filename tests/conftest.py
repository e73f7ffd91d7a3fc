"""Shared fixtures: tiny random models of every family we claim, a tokenizer and a corpus built
from what ships (so behaviour tests run on a fresh clone), and the paths to ../shared, whose
trained models only the checks of their published figures use (`needs_shared`).

SHRINK_SHARED moves ../shared (as it does for the presets); pointing it at a missing folder runs
the suite as a fresh clone would.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHRINK_SHARED", ROOT.parent / "shared"))
TEACHER = SHARED / "models" / "llama-teacher"
STUDENT = SHARED / "models" / "llama-student"

needs_shared = pytest.mark.skipif(not TEACHER.is_dir(), reason="../shared is not present (figures of its models)")

VOCAB = 8192  # the size of both tokenizers (shared docs-en, and the one trained here)
# Public-domain Shakespeare shipped in the package (conf/data/shakespeare.yaml)
SHAKESPEARE_TRAIN = ROOT / "shrink" / "assets" / "shakespeare-train.jsonl.gz"
SHAKESPEARE_EVAL = ROOT / "shrink" / "assets" / "shakespeare-eval.jsonl.gz"
EVAL_NAME = "shakespeare"  # the eval set of tiny_data_overrides()


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-layer random config of each architecture family (fast on CPU)."""
    h, common = 64, dict(vocab_size=VOCAB)
    configs = {
        "llama": lambda: transformers.LlamaConfig(hidden_size=h, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(hidden_size=h, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, **common),
        "mistral": lambda: transformers.MistralConfig(hidden_size=h, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, **common),
        "opt": lambda: transformers.OPTConfig(hidden_size=h, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                              word_embed_proj_dim=h, **common),
        "gpt2": lambda: transformers.GPT2Config(n_embd=h, n_layer=2, n_head=4, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=h, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, **common),
        "bloom": lambda: transformers.BloomConfig(hidden_size=h, n_layer=2, n_head=4, **common),
        "falcon": lambda: transformers.FalconConfig(hidden_size=h, num_hidden_layers=2, num_attention_heads=4,
                                                    new_decoder_architecture=False, multi_query=True, **common),
        "phi": lambda: transformers.PhiConfig(hidden_size=h, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, **common),
        **moe_configs(h, common),
    }
    return configs[family]()


def moe_configs(h: int, common: dict) -> dict:
    """Tiny mixture-of-experts configs (fused 3-D experts in transformers 5): plain top-2
    (mixtral), shared expert + gate (qwen2_moe), qwen3_moe, dense first layer + shared experts
    (deepseek_v3), transposed experts with biases and interleaved gate/up (gpt_oss)."""
    attn = dict(hidden_size=h, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common)
    return {
        "mixtral": lambda: transformers.MixtralConfig(intermediate_size=96, num_local_experts=4,
                                                      num_experts_per_tok=2, **attn),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                                         shared_expert_intermediate_size=96, num_experts=4,
                                                         num_experts_per_tok=2, **attn),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                                         num_experts_per_tok=2, head_dim=16, **attn),
        "deepseek_v3": lambda: transformers.DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=16, **{**attn, "num_key_value_heads": 4}),
        "gpt_oss": lambda: transformers.GptOssConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                                     head_dim=16, sliding_window=16, **attn),
    }


MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]
FAMILIES = ["llama", "qwen2", "mistral", "opt", "gpt2", "gpt_neox", "bloom", "falcon", "phi"]


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def save_with_tokenizer(model: transformers.PreTrainedModel, folder: Path, tokenizer: Path) -> Path:
    """Save `model` into `folder` together with a tokenizer folder's files."""
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def read_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_jsonl_gz(path: Path, docs: list[dict[str, str]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    return path


@pytest.fixture(scope="session")
def shipped_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer of VOCAB tokens with `<|endoftext|>` = EOS = BOS = PAD = 0, like
    the shared one, trained on the shipped Shakespeare (a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(read_texts(SHAKESPEARE_TRAIN), trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    eos = "<|endoftext|>"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=eos,
                                         model_max_length=1024).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shipped_corpus(tmp_path_factory) -> Path:
    """docs-en's layout (train, valid, test .jsonl.gz, one {"text", "source"} document per line)
    cut from the shipped Shakespeare: scenes of The Tempest and Macbeth for train and valid
    (every third to valid), scenes of Julius Caesar for test."""
    folder = tmp_path_factory.mktemp("corpus")
    train = [d for text in read_texts(SHAKESPEARE_TRAIN) for d in documents(text)]
    write_jsonl_gz(folder / "train.jsonl.gz", [d for i, d in enumerate(train) if i % 3 != 2])
    write_jsonl_gz(folder / "valid.jsonl.gz", [d for i, d in enumerate(train) if i % 3 == 2])
    write_jsonl_gz(folder / "test.jsonl.gz", [d for text in read_texts(SHAKESPEARE_EVAL) for d in documents(text)])
    return folder


def documents(text: str, size: int = 3000) -> list[dict[str, str]]:
    """`text` cut at blank lines into documents of about `size` characters."""
    docs, current = [], ""
    for paragraph in text.split("\n\n"):
        current += paragraph + "\n\n"
        if len(current) >= size:
            docs.append(current)
            current = ""
    docs += [current] if current.strip() else []
    return [{"text": d, "source": f"shakespeare-{i}"} for i, d in enumerate(docs)]


@pytest.fixture(scope="session")
def shipped_shared(tmp_path_factory, shipped_tokenizer: Path, shipped_corpus: Path) -> Path:
    """../shared's layout built from what ships, for the presets (model=llama_teacher,
    model=llama_student, data=docs_en) on a fresh clone: tiny random models shaped like the shared
    ones (teacher 8 layers, GQA 4/2, tied embeddings; a narrower 4-layer student, 2/1 heads), the
    trained tokenizer and the Shakespeare corpus. Only their shapes are the shared models'."""
    from tests.distill.helpers import tiny_llama

    root = tmp_path_factory.mktemp("shared")
    shutil.copytree(shipped_tokenizer, root / "models" / "tokenizer-docs-en")
    shutil.copytree(shipped_corpus, root / "data" / "docs-en")
    save_with_tokenizer(tiny_llama(layers=8), root / "models" / "llama-teacher", shipped_tokenizer)
    save_with_tokenizer(tiny_llama(layers=4, hidden=32, heads=2, kv=1, seed=1), root / "models" / "llama-student",
                        shipped_tokenizer)
    return root


@pytest.fixture
def on_shipped_shared(monkeypatch, shipped_shared: Path) -> Path:
    """SHRINK_SHARED points the presets (in this process and in subprocesses) at shipped_shared."""
    monkeypatch.setenv("SHRINK_SHARED", str(shipped_shared))
    return shipped_shared


@pytest.fixture
def tiny_model_dir(tmp_path: Path, shipped_tokenizer: Path):
    """Factory: save a tiny random model of a family with the shipped tokenizer, return its folder."""
    def make(family: str = "llama", name: str | None = None) -> Path:
        return save_with_tokenizer(tiny_model(family), tmp_path / (name or family), shipped_tokenizer)
    return make


def compose_config(overrides: list[str]):
    """The config the CLI would compose for these overrides."""
    from shrink.config import compose

    return compose(overrides)


def run_shrink(overrides: list[str], out: Path) -> dict:
    """Run a pipeline in-process exactly as `shrink OVERRIDES out=OUT` would; returns metrics."""
    from shrink.pipeline import run_pipeline

    cfg = compose_config(overrides + [f"out={out}"])
    return run_pipeline(cfg, out)


def tiny_data_overrides(seq_len: int = 32, windows: int = 4) -> list[str]:
    """The shipped Shakespeare (eval set EVAL_NAME) with short windows, so tiny-model pipelines
    take seconds."""
    return ["data=shakespeare", "data.calib.num_samples=8", f"data.calib.seq_len={seq_len}",
            f"data.eval.seq_len={seq_len}", f"data.eval.max_windows={windows}"]


def correlated_layer(seed: int, dtype: torch.dtype, rows: int, cols: int, n: int):
    """Weights W [rows, cols], H = 2/n X^T X and inputs X with correlated, offset features
    (where second-order updates matter), generated in fp64 then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    scales = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.1
    X = (torch.randn(n, cols, generator=g, dtype=torch.float64) + 0.5) @ mix * scales
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W.to(dtype), (2 / n * X.T @ X).to(dtype), X.to(dtype)
