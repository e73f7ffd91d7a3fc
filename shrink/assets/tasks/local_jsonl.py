"""lm-eval `custom_dataset` for the tasks in this folder: the items are a JSONL file next to
the task YAML, read wherever the folder lives (lm-eval's `data_files` would be read relative
to the working directory)."""
from pathlib import Path
from typing import Any


def load(file: str, **_: Any):
    import datasets

    path = Path(__file__).resolve().parent / file
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
