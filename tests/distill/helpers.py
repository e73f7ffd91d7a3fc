"""Tiny teachers and students for the distillation tests (seconds on a CPU)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import OmegaConf

from distill.config import DistillConfig
from tests.conftest import SHAKESPEARE_TRAIN, VOCAB, tiny_data_overrides

H = 64


def tiny_llama(layers: int = 4, hidden: int = H, heads: int = 4, kv: int = 2, seed: int = 0,
               vocab: int = VOCAB) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                                      vocab_size=vocab, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def settings(**overrides: Any) -> Any:
    """A typed distill config (as the pipeline passes it) with test-sized defaults."""
    base = OmegaConf.structured(DistillConfig)
    small = {"seq_len": 16, "batch_size": 2, "steps": 4, "warmup": 1, "lr": 1e-3, "checkpoint_every": 0,
             "log_every": 1, "relation_heads": 4}
    return OmegaConf.merge(base, small, overrides)


def random_stream(n: int = 4096, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def tiny_distill(teacher_dir: Path, *extra: str) -> list[str]:
    """Overrides of a seconds-long distill pipeline on a tiny teacher and the shipped Shakespeare."""
    return [f"model.path={teacher_dir}", "pipeline=distill", *tiny_data_overrides(seq_len=32, windows=2),
            f"distill.train_path={SHAKESPEARE_TRAIN}", "distill.seq_len=16", "distill.batch_size=2",
            "distill.steps=3", "distill.relation_heads=4", "distill.student.num_layers=2",
            "distill.checkpoint_every=0", *extra]
