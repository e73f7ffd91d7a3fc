"""Corpora, the protocol's token stream, its cache, and the seeded calibration sampler."""
from __future__ import annotations

import gzip
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from engine.data import calibration_windows, eval_windows, load_texts, token_stream
from engine.errors import ShrinkError


@pytest.fixture(scope="module")
def tokenizer(shipped_tokenizer):
    return AutoTokenizer.from_pretrained(shipped_tokenizer)


def write_jsonl(path, docs, field="text"):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as fh:
        for d in docs:
            fh.write(json.dumps({field: d}) + "\n")
    return path


def test_formats_load_in_file_order(tmp_path) -> None:
    docs = ["first document.", "second one, longer.", "third"]
    assert load_texts(write_jsonl(tmp_path / "a.jsonl", docs)) == docs
    assert load_texts(write_jsonl(tmp_path / "a.jsonl.gz", docs)) == docs
    (tmp_path / "b.txt").write_text("line one\nline two\n")
    assert load_texts(tmp_path / "b.txt") == ["line one\nline two\n"]
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    assert load_texts(tmp_path / "c.parquet") == docs


def test_bad_inputs_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(ShrinkError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl", key="data.eval.path")
    with pytest.raises(ShrinkError, match="no field 'text'"):
        load_texts(write_jsonl(tmp_path / "x.jsonl", ["a"], field="body"))
    with pytest.raises(ShrinkError, match="empty corpus"):
        load_texts(write_jsonl(tmp_path / "y.jsonl", ["", ""]))
    (tmp_path / "z.xml").write_text("<a/>")
    with pytest.raises(ShrinkError, match="unsupported data format"):
        load_texts(tmp_path / "z.xml")


def test_stream_follows_the_protocol_and_is_cached(tmp_path, tokenizer, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["Hello world.", "Second doc here."])
    ids = token_stream(path, tokenizer, cache_dir=tmp_path / "cache")
    eos = tokenizer.eos_token_id
    expected = (tokenizer("Hello world.", add_special_tokens=False)["input_ids"] + [eos]
                + tokenizer("Second doc here.", add_special_tokens=False)["input_ids"] + [eos])
    assert ids.tolist() == expected
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 1
    monkeypatch.setattr("engine.data.load_texts", lambda *a, **k: pytest.fail("cache was not used"))
    assert token_stream(path, tokenizer, cache_dir=tmp_path / "cache").tolist() == expected


def test_windows(tmp_path) -> None:
    stream = torch.arange(1030)
    w = eval_windows(stream, 512)
    assert w.shape == (2, 512) and w[1, 0] == 512  # remainder dropped, no overlap
    assert eval_windows(stream, 100, max_windows=3).shape == (3, 100)
    with pytest.raises(ShrinkError, match="shorter than one window"):
        eval_windows(torch.arange(10), 512)
    a = calibration_windows(stream, 8, 64, seed=1)
    assert a.shape == (8, 64)
    assert torch.equal(a, calibration_windows(stream, 8, 64, seed=1))
    assert not torch.equal(a, calibration_windows(stream, 8, 64, seed=2))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 64)) for row in a)  # contiguous windows


def test_every_record_of_every_format_is_checked_naming_its_line(tmp_path) -> None:
    """Past line 1 too: a number or a list as text, bytes that are not UTF-8, a line that is not
    JSON; a folder or a device as the path. JSON arrays, .txt and .csv hold the same rules."""
    good = json.dumps({"text": "fine"})
    cases = {
        "number.jsonl": (f'{good}\n{{"text": 7}}\n'.encode(), "line 2: 'text' is a number, not text"),
        "list.jsonl.gz": (gzip.compress(f'{good}\n\n{{"text": ["a"]}}\n'.encode()), "line 3: 'text' is a list"),
        "latin1.jsonl": (f'{good}\n'.encode() + b'{"text": "caf\xe9"}\n', "line 2 is not UTF-8 (byte 0xe9"),
        "cut.jsonl": (f'{good}\n{{"text": "x"\n'.encode(), "line 2 is not JSON"),
        "array.json": (b'[{"text": "a"}, {"text": {"b": 1}}]', "record 2: 'text' is an object"),
        "latin1.txt": (b"ok\n\xff\n", "line 2 is not UTF-8"),
        "numbers.csv": (b"text\n1\n2\n", "row 1: 'text' is a number"),
    }
    for name, (raw, expected) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ShrinkError, match=re.escape(expected)):
            load_texts(tmp_path / name, key="data.calib.path")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ShrinkError, match="is a folder, not a data file"):
        load_texts(tmp_path / "folder.jsonl")
    with pytest.raises(ShrinkError, match="is not a regular file"):
        load_texts("/dev/zero")
    (tmp_path / "ok.json").write_text('[{"text": "a"}, {"text": null}, {"other": 1}, {"text": "b"}]')
    assert load_texts(tmp_path / "ok.json") == ["a", "b"]
