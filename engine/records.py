"""The one reader and check of data files: every text a run, a task builder or a benchmark
reads goes through `read_texts`, so every format refuses the same faults in one line that
names the file and the line (or row): a path that is a folder or a device, a file that is
not UTF-8, a line that is not JSON or not an object, and a text field that holds a number,
a list or an object (a tokenizer would otherwise raise deep inside, or a loader turn the
list into its repr and a run measure that). Records without the field, or with it empty
or null, are skipped and counted (a warning says how many).

Formats: JSON lines (.jsonl, or .json holding lines), a JSON array of objects (.json), plain
text (.txt, one document), .csv and .parquet (read with `datasets`); each optionally .gz,
.bz2, .xz, or .zst (with the zstandard package).
"""
from __future__ import annotations

import importlib
import json
import logging
import lzma
import os
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from engine.errors import ShrinkError, first_line

log = logging.getLogger(__name__)

LOADERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}
ABSENT = object()  # a record without the text field
# what reading a damaged file raises (a truncated or corrupt .gz raises EOFError or zlib.error)
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def loader_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in COMPRESSED]
    if not suffixes or suffixes[-1] not in LOADERS:
        raise ShrinkError(f"{path}: unsupported data format (use .jsonl, .json, .txt, .parquet or .csv, optionally .gz)")
    return LOADERS[suffixes[-1]]


def data_file(path: str | os.PathLike, key: str) -> Path:
    """path as a regular file of a known format (ShrinkError saying what it is otherwise)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ShrinkError(f"{key}: {file} does not exist")
    if file.is_dir():
        raise ShrinkError(f"{key}: {file} is a folder, not a data file")
    if not file.is_file():
        raise ShrinkError(f"{key}: {file} is not a regular file (a device or a pipe?)")
    loader_for(file)
    return file


def open_binary(file: Path, key: str) -> IO[bytes]:
    """The file's bytes, decompressed by its suffix."""
    module = COMPRESSED.get(file.suffix)
    if module is None:
        return open(file, "rb")
    try:
        opener = importlib.import_module(module)
    except ImportError:
        raise ShrinkError(f"{key}: {file} is {file.suffix}-compressed; reading it needs the {module} package") from None
    return opener.open(file, "rb")


def check_data_file(path: str | os.PathLike, key: str) -> Path:
    """Before any model loads: the file is a regular file of a known format, not empty, and
    (JSON lines) its first record parses. The whole file is read (and every record checked)
    when its tokens are needed, which the run also does before it writes anything."""
    file = data_file(path, key)
    try:
        with open_binary(file, key) as fh:
            first = next((line for line in fh if line.strip()), b"")
    except (*READ_ERRORS, ValueError) as exc:
        raise ShrinkError(f"{key}: cannot read {file}: {first_line(exc)}") from None
    if not first.strip():
        raise ShrinkError(f"{key}: {file} is empty (no documents)")
    if ".jsonl" in file.suffixes:
        parse_line(first, file, 1, key)
    return file


def parse_line(raw: bytes, file: Path, number: int, key: str) -> dict[str, Any]:
    """One JSON-lines record as a dict, or a one-line error naming the line."""
    try:
        record = json.loads(raw.decode("utf-8").strip())
    except UnicodeDecodeError as exc:
        raise ShrinkError(f"{key}: {file}: line {number} is not UTF-8 (byte {raw[exc.start]:#04x} "
                          f"at column {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise ShrinkError(f"{key}: {file}: line {number} is not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ShrinkError(f"{key}: {file}: line {number} is not a JSON object")
    return record


def read_texts(path: str | os.PathLike, text_field: str = "text", key: str = "data.path") -> list[str]:
    """The documents of a data file, in file order, every record checked (module docstring)."""
    file = check_data_file(path, key)
    fields: list[str] = []
    texts: list[str] = []
    total = 0
    try:
        for where, record in records(file, key):
            total += 1
            if not fields and isinstance(record, dict):
                fields = [str(k) for k in record]
            value = record.get(text_field, ABSENT) if isinstance(record, dict) else record
            if value is ABSENT or value is None or value == "":
                continue
            if not isinstance(value, str):
                raise ShrinkError(f"{key}: {file}: {where}: {text_field!r} is {type_name(value)}, not text")
            texts.append(value)
    except READ_ERRORS as exc:
        raise ShrinkError(f"{key}: cannot read {file}: {first_line(exc)}") from None
    if texts and len(texts) < total:
        log.warning("%s: %d of %d documents of %s have no %r text; they are skipped", key, total - len(texts),
                    total, file.name, text_field)
    if not texts and total and fields and text_field not in fields:
        raise ShrinkError(f"{key}: {file} has no field {text_field!r} (fields: {fields}; set data.text_field)")
    if not texts:
        raise ShrinkError(f"{key}: {file} holds no text (empty corpus)")
    return texts


def type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def records(file: Path, key: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of every record: a dict, or the document's text for plain text."""
    loader = loader_for(file)
    if loader == "text":
        yield "the file", decode(read_all(file, key), file, key)
    elif loader == "json":
        yield from json_records(file, key)
    else:
        yield from table_records(file, loader, key)


def read_all(file: Path, key: str) -> bytes:
    with open_binary(file, key) as fh:
        return fh.read()


def decode(raw: bytes, file: Path, key: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ShrinkError(f"{key}: {file}: line {line} is not UTF-8 (byte {raw[exc.start]:#04x})") from None


def json_records(file: Path, key: str) -> Iterator[tuple[str, Any]]:
    """JSON lines; a .json file may instead hold one array of objects."""
    if ".jsonl" not in file.suffixes:
        with open_binary(file, key) as fh:
            head = fh.read(1 << 16).lstrip()
        if head.startswith(b"["):
            try:
                items = json.loads(decode(read_all(file, key), file, key))
            except ValueError as exc:
                raise ShrinkError(f"{key}: {file} is not JSON ({first_line(exc)})") from None
            for i, item in enumerate(items if isinstance(items, list) else [items], 1):
                if not isinstance(item, dict):
                    raise ShrinkError(f"{key}: {file}: record {i} is not a JSON object")
                yield f"record {i}", item
            return
    with open_binary(file, key) as fh:
        for number, raw in enumerate(fh, 1):
            if raw.strip():
                yield f"line {number}", parse_line(raw, file, number, key)


def table_records(file: Path, loader: str, key: str) -> Iterator[tuple[str, Any]]:
    """Rows of a .csv or .parquet file, read by `datasets` (pyarrow)."""
    import datasets  # heavy import, only for these formats

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(loader, data_files=str(file), split="train")
        rows = ds.to_list()
    except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
        raise ShrinkError(f"{key}: cannot read {file}: {first_line(exc)}") from None
    for i, row in enumerate(rows, 1):
        yield f"row {i}", row
