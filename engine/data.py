"""Corpora, tokenization (cached), the calibration sampler and the evaluation windows.

Token streams follow the perplexity protocol of ../shared/README.md: each document
tokenized without special tokens, EOS appended, all documents concatenated in file
order. Streams are cached on disk (safetensors) keyed by the file's content hash and
the tokenizer's fingerprint, so a second run does not tokenize again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from engine.errors import ShrinkError
from engine.files import atomic_path
from engine.records import data_file, read_texts

log = logging.getLogger(__name__)
# Part of the token cache's key: streams cached before engine.records refused non-text values
# (a list read as its repr) are not reused.
READER_VERSION = "records-2"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHRINK_CACHE", "~/.cache/shrink")).expanduser()


def load_texts(path: str | os.PathLike, text_field: str = "text", key: str = "data.path") -> list[str]:
    """Documents of a local file, in file order (a .txt file is one document), every record
    checked by engine.records."""
    return read_texts(path, text_field, key)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{payload}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def token_stream(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    text_field: str = "text",
    cache_dir: str | os.PathLike | None = None,
    key: str = "data.path",
) -> torch.Tensor:
    """int64 token ids of the whole file per the protocol, from cache when possible."""
    file = data_file(path, key)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    ident = hashlib.sha256(f"{file_sha256(file)}|{tokenizer_fingerprint(tokenizer)}|{text_field}|{READER_VERSION}".encode()).hexdigest()
    cached = cache / "tokens" / f"{ident[:32]}.safetensors"
    if cached.is_file():
        return load_file(cached)["ids"]
    start = time.time()
    texts = load_texts(file, text_field, key)
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([t for doc in encoded for t in (*doc, eos)], dtype=torch.int64)
    with atomic_path(cached) as tmp:  # a concurrent or killed run never sees half a file
        save_file({"ids": ids}, tmp)
    log.info("tokenized %s: %d documents, %d tokens in %.1fs", file.name, len(texts), ids.numel(), time.time() - start)
    return ids


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None, key: str = "data.eval") -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; the remainder is dropped."""
    n = window_count(stream, seq_len, key)
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seq_len].view(n, seq_len)


def window_count(stream: torch.Tensor, seq_len: int, key: str = "data.eval") -> int:
    """Complete windows of seq_len in the stream (the file's total); ShrinkError if none."""
    if seq_len <= 1:
        raise ShrinkError(f"{key}.seq_len must be > 1, got {seq_len}")
    n = stream.numel() // seq_len
    if n == 0:
        raise ShrinkError(f"{key}: {stream.numel()} tokens is shorter than one window of {seq_len} "
                          f"(no complete window to evaluate)")
    return n


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The UTF-8 bytes each token id stands for (b"" for special tokens): exact for byte-level
    BPE; for SentencePiece-style vocabularies "▁" is a space and <0xNN> one byte."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))
    decoder = byte_level_decoder()
    special = set(tokenizer.all_special_ids)
    result = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None or i in special:
            result.append(b"")
        elif byte_level and all(c in decoder for c in tok):
            result.append(bytes(decoder[c] for c in tok))
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            result.append(bytes([int(tok[3:5], 16)]))
        else:
            result.append(tok.replace("\u2581", " ").encode("utf-8"))
    return result


def token_text_lengths(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id: UTF-8 bytes it covers, and characters that start in it (bytes that are
    not UTF-8 continuation bytes), so summing over a token span counts its characters."""
    pieces = token_bytes(tokenizer)
    nbytes = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    nchars = torch.tensor([sum(1 for b in p if b & 0xC0 != 0x80) for p in pieces], dtype=torch.int64)
    return nbytes, nchars


def calibration_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """num_samples random windows [num_samples, seq_len] of the stream (GPTQ's sampler), seeded."""
    if num_samples <= 0 or seq_len <= 0:
        raise ShrinkError(f"data.calib: num_samples and seq_len must be positive, got {num_samples}, {seq_len}")
    if stream.numel() <= seq_len:
        raise ShrinkError(f"data.calib: {stream.numel()} tokens is not more than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
