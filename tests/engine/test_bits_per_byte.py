"""Bits per byte and per character: the same windows as perplexity, NLL in nats summed over
predicted tokens / ln 2 / the UTF-8 bytes (characters) those tokens cover."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from engine.data import eval_windows, token_stream, token_text_lengths
from engine.evaluation import measure
from tests.conftest import ROOT, tiny_model

TANG = ROOT / "tests" / "fixtures" / "tang-poems.jsonl"  # 16 Tang poems from Debian's fortunes-zh (tang300)



@pytest.fixture(scope="module")
def tokenizer(shipped_tokenizer):
    """Byte-level BPE like the shared docs-en one (trained on the shipped Shakespeare)."""
    return AutoTokenizer.from_pretrained(shipped_tokenizer)


def test_byte_level_tokens_cover_exactly_the_texts_bytes_and_characters(tokenizer) -> None:
    nbytes, nchars = token_text_lengths(tokenizer)
    texts = [json.loads(line)["text"] for line in TANG.read_text(encoding="utf-8").splitlines()]
    texts += ["def f(x):\n    return x ** 2  # naïve café", "émoji 🙂 and tabs\t\tend"]
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert int(nbytes[ids].sum()) == len(text.encode("utf-8"))
        assert int(nchars[ids].sum()) == len(text)
    assert nbytes[tokenizer.eos_token_id] == 0  # EOS covers no text


def test_bits_per_byte_match_a_hand_computation(tmp_path, tokenizer) -> None:
    docs = ["The quick brown fox jumps over the lazy dog. " * 6, "Perl and Python documentation, byte by byte."]
    path = tmp_path / "en.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    windows = eval_windows(token_stream(path, tokenizer, cache_dir=tmp_path), 16)
    model = tiny_model("llama")
    m = measure(model, windows, batch_size=3, lengths=token_text_lengths(tokenizer))
    nll = nbytes = 0.0
    for row in windows:  # one window at a time, log-softmax by hand, bytes by decoding the text
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].double(), dim=-1)
        nll -= float(logp[torch.arange(row.numel() - 1), row[1:]].sum())
        nbytes += len(tokenizer.decode(row[1:], skip_special_tokens=True).encode("utf-8"))
    assert m.tokens == windows.shape[0] * 15 and m.bytes == nbytes
    assert m.bits_per_byte == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert m.ppl == pytest.approx(math.exp(nll / m.tokens), rel=1e-5)
    assert m.bits_per_char == pytest.approx(nll / math.log(2) / m.chars) and m.chars == m.bytes  # ASCII
