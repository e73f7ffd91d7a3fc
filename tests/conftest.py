"""Shared fixtures: paths to ../shared, and tiny random models of every family we claim."""
from __future__ import annotations

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
TOKENIZER = SHARED / "models" / "tokenizer-docs-en"
DOCS = SHARED / "data" / "docs-en"

needs_shared = pytest.mark.skipif(not TEACHER.is_dir(), reason="../shared is not present")

VOCAB = 8192  # the shared docs-en tokenizer, so tiny models can use it


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
    }
    return configs[family]()


FAMILIES = ["llama", "qwen2", "mistral", "opt", "gpt2", "gpt_neox", "bloom", "falcon", "phi"]


def tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def save_with_tokenizer(model: transformers.PreTrainedModel, folder: Path, tokenizer: Path = TOKENIZER) -> Path:
    """Save `model` into `folder` together with a tokenizer's files (the shared one by default)."""
    model.save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def tiny_model_dir(tmp_path: Path):
    """Factory: save a tiny random model of a family with the shared tokenizer, return its folder."""
    def make(family: str = "llama", name: str | None = None) -> Path:
        return save_with_tokenizer(tiny_model(family), tmp_path / (name or family))
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
    """docs-en with short windows so tiny-model pipelines take seconds."""
    return ["data=docs_en", f"data.calib.path={DOCS / 'valid.jsonl.gz'}", "data.calib.num_samples=8",
            f"data.calib.seq_len={seq_len}", f"data.eval.seq_len={seq_len}", f"data.eval.max_windows={windows}"]


def correlated_layer(seed: int, dtype: torch.dtype, rows: int, cols: int, n: int):
    """Weights W [rows, cols], H = 2/n X^T X and inputs X with correlated, offset features
    (where second-order updates matter), generated in fp64 then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    scales = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.1
    X = (torch.randn(n, cols, generator=g, dtype=torch.float64) + 0.5) @ mix * scales
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W.to(dtype), (2 / n * X.T @ X).to(dtype), X.to(dtype)
