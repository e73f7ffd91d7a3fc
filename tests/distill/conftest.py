"""Fixtures of the distillation tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import save_with_tokenizer
from tests.distill.helpers import tiny_llama


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, shipped_tokenizer: Path) -> Path:
    """A 4-layer tiny Llama teacher (GQA 4/2, tied embeddings) with the shipped tokenizer."""
    return save_with_tokenizer(tiny_llama(layers=4), tmp_path_factory.mktemp("teacher") / "teacher", shipped_tokenizer)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and a busy machine's OpenMP spin-waits cannot
    slow them down by an order of magnitude; subprocesses get OMP_NUM_THREADS=1 alike (a
    resumed run must use the thread count of the run it continues to be bit-exact)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
