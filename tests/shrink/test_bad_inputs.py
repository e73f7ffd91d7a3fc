"""Bad inputs and faults, one table: each row is a command as a user types it, the fragment its
one-line error must hold, and what may exist afterwards. Exit status 2, one `shrink: error:`
line, no traceback, and `out` left as it was (absent, or untouched when it existed).

The fault tests below kill real `pipeline=quantize` runs (SIGKILL right after the quantize
checkpoint, SIGKILL in the middle of the export, SIGINT) and check that resume=true ends
with a model folder equal in every file to an uninterrupted run's, at the same perplexity.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import (EVAL_NAME, SHAKESPEARE_EVAL, save_with_tokenizer, tiny_config, tiny_data_overrides,
                            tiny_model)
from tests.shrink.killpoint import shrink_process

EVAL = ["pipeline=eval", "data=shakespeare", "data.eval.seq_len=32", "data.eval.max_windows=2"]
NEEDS_LM_EVAL = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="the eval extra (lm-eval)")


def edit_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def set_nan(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


def set_int(state: dict[str, torch.Tensor]) -> None:
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(torch.int32)


def truncate(folder: Path) -> Path:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return folder


def link_template(folder: Path) -> Path:
    (folder / "chat_template.jinja").symlink_to("/etc/passwd")
    return folder


def traversing_template(folder: Path) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "../../evil", "template": "{{ messages }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def pickled(folder: Path) -> Path:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def lost_shard(folder: Path) -> Path:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# name -> how a copy of the good tiny model is broken
MODELS: dict[str, Callable[[Path], Path]] = {
    "good": lambda f: f,
    "more_layers": lambda f: edit_config(f, num_hidden_layers=3),
    "fewer_layers": lambda f: edit_config(f, num_hidden_layers=1),
    "other_shape": lambda f: edit_config(f, intermediate_size=96),
    "not_json": lambda f: (f / "config.json").write_text("{model_type: llama") and f,
    "no_model_type": lambda f: (f / "config.json").write_text("[1, 2]") and f,
    "truncated": truncate,
    "nan": lambda f: edit_weights(f, set_nan),
    "int_weight": lambda f: edit_weights(f, set_int),
    "symlink": link_template,
    "template_name": traversing_template,
    "pickle": pickled,
    "lost_shard": lost_shard,
    # issue 30
    "big_norm": lambda f: edit_weights(f, set_big_norm),
    "untied_head": lambda f: edit_config(f, tie_word_embeddings=True),  # the file's lm_head is its own
    "no_hidden_size": lambda f: drop_config_key(f, "hidden_size"),
    "no_tokenizer": lambda f: [p.unlink() for p in f.glob("tokenizer*")] and f,
}


def set_big_norm(state: dict[str, torch.Tensor]) -> None:
    """A finite float32 value beyond float16's range (65504)."""
    state["model.norm.weight"][0] = 7e4


def drop_config_key(folder: Path, key: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def jsonl(path: Path, *records: object) -> Path:
    """A JSON-lines file: six good documents, then the given records (dicts, or raw lines)."""
    good = [json.dumps({"text": "To be, or not to be, that is the question. " * 40})] * 6
    path.write_bytes(b"\n".join([*(g.encode() for g in good),
                                  *(r if isinstance(r, bytes) else json.dumps(r).encode() for r in records)]) + b"\n")
    return path


def write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as fh:
        fh.write(text)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shipped_tokenizer: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    good = save_with_tokenizer(tiny_model("llama"), root / "good", shipped_tokenizer)
    paths = {name: make(shutil.copytree(good, root / name) if name != "good" else good)
             for name, make in MODELS.items()}
    config = tiny_config("llama")
    config.vocab_size = 1000
    import transformers
    paths["small_vocab"] = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config),
                                               root / "small_vocab", shipped_tokenizer)
    paths["empty_gz"] = write_gz(root / "empty.jsonl.gz", "")
    paths["not_jsonl"] = root / "bad.jsonl"
    paths["not_jsonl"].write_text("this is not json\n")
    paths["not_gzip"] = root / "fake.jsonl.gz"
    paths["not_gzip"].write_text('{"text": "plain text named .gz"}\n')
    paths["csv_empty"] = root / "empty.csv"
    paths["csv_empty"].write_text("")
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("x")
    paths["shakespeare"] = SHAKESPEARE_EVAL
    # issue 30: records after the first line, checked before anything is written
    paths["text_number"] = jsonl(root / "number.jsonl", {"text": 12345})
    paths["text_list"] = jsonl(root / "list.jsonl", {"text": ["a", "b"]})
    paths["not_utf8"] = jsonl(root / "latin1.jsonl", b'{"text": "caf\xe9"}')
    paths["bad_json_later"] = jsonl(root / "later.jsonl", b'{"text": "unclosed"')
    paths["no_text_field"] = root / "body.jsonl"
    paths["no_text_field"].write_text(json.dumps({"body": "words " * 200}) + "\n")
    paths["empty_texts"] = root / "empty_texts.jsonl"
    paths["empty_texts"].write_text("\n".join(json.dumps({"text": ""}) for _ in range(3)) + "\n")
    paths["short_text"] = root / "short.jsonl"
    paths["short_text"].write_text(json.dumps({"text": "Too short."}) + "\n")
    paths["a_folder"] = root / "folder.jsonl"
    paths["a_folder"].mkdir()
    paths["not_gguf"] = root / "model.gguf"
    paths["not_gguf"].write_bytes((root / "good" / "model.safetensors").read_bytes()[:4096])
    paths["truncated_gguf"] = root / "truncated.gguf"
    paths["truncated_gguf"].write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10).to_bytes(8, "little")
                                        + (3).to_bytes(8, "little") + bytes(20))
    paths["gptq"] = gptq_folder(good, root / "gptq_run")
    paths["broken_tasks"] = root / "broken_tasks"  # a task YAML that does not parse
    paths["broken_tasks"].mkdir()
    (paths["broken_tasks"] / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
    paths["hub_tasks"] = root / "hub_tasks"  # a task whose dataset only the hub has
    paths["hub_tasks"].mkdir()
    (paths["hub_tasks"] / "remote.yaml").write_text("task: remote_task\ndataset_path: some-org/not-cached-here\n"
                                                    "output_type: multiple_choice\ntest_split: test\n")
    return paths


def gptq_folder(model: Path, run: Path) -> Path:
    """A 4-bit RTN export of `model`: an already quantized input."""
    from tests.conftest import run_shrink

    run_shrink(["pipeline=quantize", f"model.path={model}", *tiny_data_overrides(), "quant.method=rtn",
                "quant.group_size=32", "eval.baseline=false"], run)
    return run / "model"


@dataclass(frozen=True)
class Row:
    id: str
    args: Callable[[dict[str, Path], Path], list[str]]  # (inputs, out) -> command line
    expect: str  # fragment of the one-line error
    # prepares `out` before the command; whatever it leaves there must be unchanged afterwards
    setup: Callable[[dict[str, Path], Path], None] = field(default=lambda inputs, out: None)
    before_model: bool = False  # refused before any model is loaded (checked, not only claimed)
    marks: tuple = ()


def model(name: str, *extra: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda inp, out: [*EVAL, f"model.path={inp[name]}", *extra, f"out={out}"]


def quantize(name: str, *extra: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda inp, out: ["pipeline=quantize", f"model.path={inp[name]}", *tiny_data_overrides(),
                             "quant.group_size=32", *extra, f"out={out}"]


def stage(pipeline: str, name: str, *extra: str) -> Callable[[dict[str, Path], Path], list[str]]:
    return lambda inp, out: [f"pipeline={pipeline}", f"model.path={inp[name]}", *tiny_data_overrides(), *extra,
                             f"out={out}"]


HELD: list = []  # locks held by a row's setup (another live run), released after the row


@pytest.fixture(autouse=True)
def release_held_locks():
    yield
    while HELD:
        HELD.pop().release()


def run_in_progress(inp: dict[str, Path], out: Path) -> None:
    """out is being written by a live run: its lock is held (here by this test process)."""
    from engine.files import FolderLock

    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"config_sha256": "x", "done": []}))
    HELD.append(FolderLock(out).acquire())


def finished_run(inp: dict[str, Path], out: Path) -> None:
    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"config_sha256": "x", "done": ["1-eval"], "finished": True}))


def other_recipe_run(inp: dict[str, Path], out: Path) -> None:
    out.mkdir()
    (out / "progress.json").write_text(json.dumps({"config_sha256": "another", "done": ["baseline"]}))


def foreign_files(inp: dict[str, Path], out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def damaged_progress(inp: dict[str, Path], out: Path) -> None:
    out.mkdir()
    (out / "progress.json").write_text('{"done": [')


ROWS = [
    # inputs that were refused cleanly before issue 21 (kept so they never regress)
    Row("no_model_folder", lambda i, o: [*EVAL, f"model.path={o.parent / 'nope'}", f"out={o}"], "model.path"),
    Row("pickle_only", model("pickle"), "pickled weights are not loaded"),
    Row("small_vocab", model("small_vocab"), "tokenizer/vocab mismatch"),
    Row("no_eval_data", model("good", "data.eval.path=/nonexistent/test.jsonl"), "data.eval.path"),
    Row("unknown_stage", model("good", "pipeline.stages=[eval,compile]"), "unknown stage 'compile'"),
    Row("unknown_key", model("good", "quant.nbits=4"), "quant.nbits"),
    Row("bad_type", model("good", "quant.bits=four"), "quant.bits"),
    Row("unfinished_run_no_resume", model("good"), "pass resume=true", setup=other_recipe_run),
    # issue 21, 2: missing / unexpected / mismatched / non-finite tensors
    Row("missing_tensors", model("more_layers"), "tensor 'model.layers.2."),
    Row("unexpected_tensors", model("fewer_layers"), "is unexpected"),
    Row("shape_mismatch", model("other_shape"), "has shape [64, 128] but config.json gives [64, 96]"),
    Row("int_tensor", model("int_weight"), "tensor 'model.layers.0.mlp.up_proj.weight' is I32"),
    Row("nan_tensor", model("nan"), "tensor 'model.layers.1.mlp.up_proj.weight' holds non-finite"),
    Row("lost_shard", model("lost_shard"), "model-00002-of-00002.safetensors is listed"),
    # 3: files linking out of the model folder
    Row("symlinked_template", model("symlink"), "chat_template.jinja links outside the model folder"),
    # 4: `+` adds no key
    Row("plus_unknown_key", model("good", "+quant.bitz=4"), "quant.bitz: unknown key"),
    Row("plus_unknown_top_key", model("good", "+colour=red"), "colour: unknown key"),
    # 5: out must be new, empty, or this recipe's unfinished run
    Row("out_is_the_model", lambda i, o: [*EVAL, f"model.path={i['good']}", f"out={i['good']}"], "is not empty"),
    Row("out_foreign_files", model("good"), "is not empty and holds no shrink run", setup=foreign_files),
    Row("out_is_a_file", lambda i, o: [*EVAL, f"model.path={i['good']}", f"out={i['a_file']}"], "is a file"),
    Row("resume_other_settings", model("good", "resume=true"), "settings differ", setup=other_recipe_run),
    Row("damaged_progress", model("good", "resume=true"), "is damaged", setup=damaged_progress),
    # 6: tracebacks before issue 21
    Row("config_not_json", model("not_json"), "config.json is not valid JSON"),
    Row("config_no_model_type", model("no_model_type"), "has no model_type"),
    Row("truncated_safetensors", model("truncated"), "model.safetensors is truncated"),
    Row("empty_jsonl_gz", model("good", "data.eval.path={empty_gz}"), "is empty"),
    Row("not_jsonl", model("good", "data.eval.path={not_jsonl}"), "line 1 is not JSON"),
    Row("not_gzip", model("good", "data.eval.path={not_gzip}"), "cannot read"),
    Row("empty_csv", model("good", "data.eval.path={csv_empty}"), "is empty"),
    Row("out_not_creatable", lambda i, o: [*EVAL, f"model.path={i['good']}", "out=/proc/shrink-out"],
        "out: cannot create /proc/shrink-out"),
    Row("template_name_traversal", model("template_name"), "chat template name '../../evil'"),
    # 7: inputs of later stages are checked before any model loads
    Row("no_calib_data", quantize("good", "data.calib.path=/nonexistent/calib.jsonl.gz"), "data.calib.path"),
    Row("calib_data_unset", quantize("good", "data.calib.path='???'"),
        "data.calib.path: not set"),
    Row("calib_dtype", quantize("good", "data.calib.dtype=float16"),
        "data.calib.dtype: 'float16' is not one of auto | model | float32 | float64", before_model=True),
    # 8: a finished run is not resumed
    Row("resume_finished", model("good", "resume=true"), "nothing to resume", setup=finished_run),
    Row("finished_no_resume", model("good"), "already holds a finished run", setup=finished_run),
    # issue 19: evaluation inputs, refused before any model is loaded (the hub is offline in these tests)
    Row("no_complete_window", model("good", "data.eval.seq_len=100000"), "no complete window", before_model=True),
    Row("equal_eval_set_names", model("good", "data.eval=null", "data.eval=[{{path:{shakespeare}}},{{path:{shakespeare}}}]"),
        "two eval sets are named", before_model=True),
    Row("unknown_task", quantize("good", "eval.tasks=[no_such_task]"), "eval.tasks: unknown task 'no_such_task'",
        before_model=True, marks=(NEEDS_LM_EVAL,)),
    Row("task_yaml_not_parsing", quantize("good", "eval.tasks=[shakespeare_next_line]", "eval.task_dir={broken_tasks}"),
        "bad.yaml does not parse", before_model=True, marks=(NEEDS_LM_EVAL,)),
    Row("task_needs_the_hub", quantize("good", "eval.tasks=[remote_task]", "eval.task_dir={hub_tasks}"),
        "'remote_task' needs the dataset 'some-org/not-cached-here' from the Hugging Face Hub",
        before_model=True, marks=(NEEDS_LM_EVAL,)),
    # issue 30, 1: a finite value beyond the narrowed dtype (export, or a float16 load)
    Row("beyond_export_dtype", quantize("big_norm", "quant.method=rtn"),
        "quant.export_dtype: tensor 'model.norm.weight' holds 70000, beyond the range of float16"),
    Row("beyond_model_dtype", model("big_norm", "model.dtype=float16"),
        "tensor 'model.norm.weight' holds 70000, beyond the range of float16"),
    # 2, 3, 9, 17: what a folder claims against what it holds
    Row("tied_but_different_head", model("untied_head"), "'lm_head.weight' differs from 'model.embed_tokens.weight'"),
    Row("config_without_a_size", model("no_hidden_size"), "has no 'hidden_size'", before_model=True),
    Row("no_tokenizer", model("no_tokenizer"), "has no tokenizer", before_model=True),
    Row("quantize_a_gptq_folder", quantize("gptq"), "is already quantized (awq, 4-bit"),  # the default layout
    Row("quantize_a_gptq_folder_any_coverage", quantize("gptq", "min_coverage=0"), "is already quantized"),
    Row("prune_a_gptq_folder", stage("prune", "gptq"), "prune needs the floating-point model"),
    Row("prune_after_quantize", stage("quantize", "good", "pipeline.stages=[quantize,prune,eval]"),
        "prune after quantize", before_model=True),
    # 4, 5, 8: settings that ran and gave another result than they say
    Row("two_four_at_0.7", stage("prune", "good", "prune.pattern='2:4'", "prune.sparsity=0.7"),
        "prune.sparsity: 0.7 but prune.pattern=2:4 prunes exactly 0.5", before_model=True),
    Row("distill_zero_steps", stage("distill", "good", "distill.student.init=skip", "distill.steps=0"),
        "distill.steps: 0 must be > 0", before_model=True),
    Row("damp_zero", quantize("good", "quant.damp=0"), "quant.damp: 0.0 must be in (0, 1)", before_model=True),
    Row("calib_num_samples_zero", quantize("good", "data.calib.num_samples=0"), "data.calib.num_samples: 0 must be > 0",
        before_model=True),
    Row("unknown_model_dtype", model("good", "model.dtype=fp8"), "model.dtype: unknown dtype 'fp8'", before_model=True),
    Row("cuda_without_a_gpu", model("good", "model.device=cuda"), "no CUDA device is available", before_model=True,
        marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA"),)),
    # 6: a second run on an out a live run is writing
    Row("out_in_use", model("good", "resume=true"), "is in use by another process", setup=run_in_progress),
    # 7, 16, 17: data records past line 1, and data that would fail after the baseline
    Row("calib_text_a_number", quantize("good", "data.calib.path={text_number}"), "line 7: 'text' is a number",
        before_model=True),
    Row("eval_text_a_list", model("good", "data.eval.path={text_list}"), "line 7: 'text' is a list", before_model=True),
    Row("eval_not_utf8", model("good", "data.eval.path={not_utf8}"), "line 7 is not UTF-8 (byte 0xe9", before_model=True),
    Row("bad_json_on_line_7", quantize("good", "data.calib.path={bad_json_later}"), "line 7 is not JSON",
        before_model=True),
    Row("calib_without_text_field", quantize("good", "data.calib.path={no_text_field}"), "has no field 'text'",
        before_model=True),
    Row("calib_all_texts_empty", quantize("good", "data.calib.path={empty_texts}"), "holds no text",
        before_model=True),
    Row("calib_shorter_than_seq_len", quantize("good", "data.calib.path={short_text}"), "is too short",
        before_model=True),
    Row("data_path_a_folder", quantize("good", "data.calib.path={a_folder}"), "is a folder, not a data file",
        before_model=True),
    Row("data_path_a_device", model("good", "data.eval.path=/dev/zero"), "is not a regular file", before_model=True),
    Row("min_coverage_before_the_baseline", quantize("good", "quant.skip=[q_proj,k_proj,v_proj,o_proj]",
                                                     "min_coverage=0.9"), "min_coverage: "),
    Row("student_deeper_than_skip_allows", stage("distill", "good", "distill.student.init=skip",
                                                 "distill.student.num_layers=3"), "must be in 1..2"),
    Row("two_of_five_does_not_divide", stage("prune", "good", "prune.pattern='2:5'", "prune.sparsity=0.4"),
        "does not divide"),
    # 12: out longer than the system allows
    Row("out_name_too_long", lambda i, o: [*EVAL, f"model.path={i['good']}", f"out={o.parent / ('x' * 300)}"],
        "File name too long", before_model=True),
    # 3, 13: the other commands hold the same rules
    Row("plan_config_without_a_size", lambda i, o: ["plan", f"model.path={i['no_hidden_size']}", "target=1xH100-80GB",
                                                    f"out={o}"], "has no 'hidden_size'", before_model=True),
    Row("import_gguf_not_gguf", lambda i, o: ["import-gguf", str(i["not_gguf"]), str(o)],
        "is not a GGUF file", before_model=True),
    Row("import_gguf_truncated", lambda i, o: ["import-gguf", str(i["truncated_gguf"]), str(o)],
        "is damaged or truncated", before_model=True),
    Row("import_gguf_into_a_foreign_folder", lambda i, o: ["import-gguf", str(i["not_gguf"]), str(o)],
        "is not an imported model folder", setup=foreign_files, before_model=True),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    try:
        if not folder.exists():
            return {}
    except OSError:  # a name the system refuses: nothing can be there
        return {}
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`shrink ARGS` in this process (seconds instead of a fresh interpreter per row)."""
    from shrink.cli import main

    monkeypatch.setattr(sys, "argv", ["shrink", *args])
    handlers = list(logging.root.handlers)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:  # Hydra's handlers write to this row's captured stderr, closed after it: not the next row's
        for handler in [h for h in logging.root.handlers if h not in handlers]:
            logging.root.removeHandler(handler)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row", [pytest.param(r, marks=r.marks, id=r.id) for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(row: Row, inputs, tmp_path, capsys, monkeypatch) -> None:
    import shrink.pipeline

    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as a machine without hub access (no test reaches the hub)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = []
    if row.before_model:
        monkeypatch.setattr(shrink.pipeline, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    row.setup(inputs, out)
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in row.args(inputs, out)]
    target = Path(next((a.split("=", 1)[1] for a in args if a.startswith("out=")), out))
    before = snapshot(target)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # Hydra writes nothing here either (no outputs/DATE/TIME)
    code, err = run_cli(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("shrink: error:")]
    assert code == 2 and len(errors) == 1 and row.expect in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert snapshot(target) == before  # out absent, or exactly as it was
    assert list(cwd.iterdir()) == [] and loaded == []


def test_a_good_run_writes_only_out_and_world_readable_files(inputs, tmp_path, capsys, monkeypatch) -> None:
    """The counterpart of the table: the same command with good inputs succeeds, writes out
    (files 0644) and nothing else, not even Hydra's outputs/DATE/TIME."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    code, err = run_cli(model("good")(inputs, out), capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "progress.json", "recipe.yaml"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert json.loads((out / "progress.json").read_text())["finished"]


def test_documents_without_the_text_field_are_counted_in_a_warning(tmp_path, caplog) -> None:
    from engine.data import load_texts

    file = tmp_path / "mixed.jsonl"
    file.write_text("\n".join(json.dumps(d) for d in [{"text": "a b"}, {"body": "x"}, {"text": ""}, {"text": "c"}]))
    assert load_texts(file, "text", "data.eval.path") == ["a b", "c"]
    assert "2 of 4 documents of mixed.jsonl have no 'text' text" in caplog.text


# ------------------------------------------------------------- right results (issue 30)
def test_a_corrected_command_runs_in_the_out_a_refused_one_used(inputs, tmp_path, capsys, monkeypatch) -> None:
    """A refusal that needs the model (min_coverage) leaves out as it was: the corrected command
    then runs there, with no 'unfinished run' or 'settings differ' in its way."""
    out = tmp_path / "out"
    args = quantize("good", "quant.method=rtn")(inputs, out)
    code, err = run_cli([*args, "quant.skip=[q_proj,k_proj,v_proj,o_proj]", "min_coverage=0.9"], capsys, monkeypatch)
    assert code == 2 and "min_coverage" in err and not out.exists()
    code, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert (out / "model" / "config.json").is_file() and not (out / ".lock").exists()


def enospc(*args, **kwargs):
    raise OSError(28, "No space left on device", "/full/disk/file")


def test_a_full_disk_before_anything_resumable_leaves_out_as_it_was(inputs, tmp_path, capsys, monkeypatch) -> None:
    import shrink.pipeline

    out = tmp_path / "out"
    args = quantize("good", "quant.method=rtn")(inputs, out)
    with monkeypatch.context() as patch:
        patch.setattr(shrink.pipeline, "write_recipe", enospc)  # the run's first writes
        code, err = run_cli(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("shrink: error:")]
    assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err
    assert not out.exists()
    assert run_cli(args, capsys, monkeypatch)[0] == 0


def test_a_full_disk_after_a_stage_keeps_it_and_resume_finishes(inputs, tmp_path, capsys, monkeypatch) -> None:
    """Also for errors a Rust library words as text (safetensors' SafetensorError)."""
    import shrink.pipeline
    from safetensors import SafetensorError

    def rust_enospc(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    out = tmp_path / "out"
    args = quantize("good", "quant.method=rtn")(inputs, out)
    with monkeypatch.context() as patch:
        patch.setattr(shrink.pipeline, "save_model_folder", rust_enospc)  # the export, after quantize
        code, err = run_cli(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("shrink: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "No space left on device" in errors[0] and "keeps the finished work (rerun with resume=true)" in errors[0]
    assert not (out / "model").exists() and not list(out.glob(".tmp-*"))
    code, err = run_cli([*args, "resume=true"], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert (out / "model" / "model.safetensors").is_file() and not (out / "checkpoints").exists()


def test_a_loss_past_exps_range_is_an_infinite_perplexity(inputs, tmp_path) -> None:
    """A model whose logits are huge: mean NLL past 709 nats is reported as perplexity inf."""
    from tests.conftest import run_shrink

    folder = edit_weights(shutil.copytree(inputs["good"], tmp_path / "loud"),
                          lambda st: st["lm_head.weight"].mul_(1e5))
    metrics = run_shrink([*EVAL, f"model.path={folder}"], tmp_path / "out")
    assert metrics["ppl"][EVAL_NAME] == float("inf")


def test_a_student_deeper_than_its_teacher_distills(inputs, tmp_path, shipped_tokenizer) -> None:
    """Two student layers learn from the same teacher layer (the uniform map of 3 onto 2)."""
    from tests.conftest import run_shrink

    config = tiny_config("llama")
    config.num_hidden_layers = 3
    import transformers
    student = save_with_tokenizer(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "deep",
                                  shipped_tokenizer)
    metrics = run_shrink(["pipeline=distill", f"model.path={inputs['good']}", *tiny_data_overrides(),
                          "distill.student.init=pretrained", f"distill.student.path={student}", "distill.steps=2",
                          "distill.batch_size=2", "distill.seq_len=32", "distill.warmup=0"], tmp_path / "out")
    assert metrics["stages"]["distill"]["layer_map"] == [[0, 0], [1, 1], [2, 1]]
    final = metrics["stages"]["distill"]["final"]
    assert metrics["stages"]["distill"]["steps"] == 2 and final["step"] == 2
    assert math.isfinite(final["loss"]) and math.isfinite(metrics["ppl"][EVAL_NAME])


def test_a_failed_sweep_point_does_not_end_the_sweep_and_the_report_names_it(inputs, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    sweep = tmp_path / "sweep"
    bad = inputs["text_number"]
    args = ["-m", "pipeline=quantize", f"model.path={inputs['good']}", *tiny_data_overrides(), "quant.group_size=32",
            f"data.calib.path={bad},{SHAKESPEARE_EVAL}", f"hydra.sweep.dir={sweep}"]
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(args, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("shrink: error:")]
    assert code == 2 and len(errors) == 1 and "sweep: 1 point failed (0: data.calib.path" in errors[0], err[-3000:]
    assert (sweep / "1" / "metrics.json").is_file()  # the point after the failed one ran
    assert "is a number" in json.loads((sweep / "0" / "failed.json").read_text())["error"]
    code, err = run_cli(["report", str(sweep)], capsys, monkeypatch)
    assert code == 0, err[-3000:]
    report = (sweep / "report.md").read_text()
    assert "Left out (1):" in report and "- 0: failed: data.calib.path" in report and "# Sweep report (1 runs)" in report


# ---------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> tuple[list[str], Path]:
    """An uninterrupted pipeline=quantize run and its command."""
    args = quantize("good")(inputs, Path("unused"))[:-1]
    out = tmp_path_factory.mktemp("reference") / "run"
    result = shrink_process(*args, f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return args, out


def reload_perplexity(folder: Path) -> float:
    from engine.config import ModelConfig
    from engine.data import eval_windows, token_stream
    from engine.evaluation import perplexity
    from shrink.model_folder import load_model

    model, tokenizer = load_model(ModelConfig(path=str(folder)))
    windows = eval_windows(token_stream(SHAKESPEARE_EVAL, tokenizer), 32, 4)
    return perplexity(model, windows, 4, torch.device("cpu"))


FAULTS = {
    # killed right after the quantize stage's checkpoint (before the eval stage starts)
    "sigkill_after_quantize_checkpoint": (("shrink.pipeline:eval_stage", "before", "KILL"), -signal.SIGKILL),
    # killed in the middle of the export: model/ written to its temp folder, not yet renamed
    "sigkill_during_export": (("shrink.pipeline:save_model_folder", "after", "KILL"), -signal.SIGKILL),
    # Ctrl-C after the quantize checkpoint: one line, exit 2, the run stays resumable
    "sigint_after_quantize_checkpoint": (("shrink.pipeline:eval_stage", "before", "INT"), 2),
    # `kill` (SIGTERM) at the same point: handled as Ctrl-C is
    "sigterm_after_quantize_checkpoint": (("shrink.pipeline:eval_stage", "before", "TERM"), 2),
}


@pytest.mark.slow  # three CLI processes each
@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_after_a_kill_equals_an_uninterrupted_run(fault: str, reference, tmp_path) -> None:
    args, ref = reference
    kill, code = FAULTS[fault]
    out = tmp_path / "run"
    killed = shrink_process(*args, f"out={out}", kill=kill)
    assert killed.returncode == code, killed.stderr[-3000:]
    if code == 2:
        errors = [line for line in killed.stderr.splitlines() if line.startswith("shrink: error:")]
        said = "terminated (SIGTERM)" if kill[2] == "TERM" else "interrupted"
        assert len(errors) == 1 and said in errors[0] and "resume=true" in errors[0], killed.stderr[-3000:]
        assert "Traceback" not in killed.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["checkpoint"] == "checkpoints/1-quantize"  # relative: the run folder can move
    assert not (out / "model").exists()

    resumed = shrink_process(*args, f"out={out}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no temp, no checkpoints
    files = sorted(p.name for p in (ref / "model").iterdir())
    assert {"config.json", "quantize_config.json", "model.safetensors", "README.md"} <= set(files)
    assert sorted(p.name for p in (out / "model").iterdir()) == files
    for name in files:
        assert (out / "model" / name).read_bytes() == (ref / "model" / name).read_bytes(), name
        assert (out / "model" / name).stat().st_mode & 0o777 == 0o644, name
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["bits"] == 4
    ref_ppl = json.loads((ref / "metrics.json").read_text())["ppl"]
    assert json.loads((out / "metrics.json").read_text())["ppl"] == ref_ppl
    assert reload_perplexity(out / "model") == pytest.approx(reload_perplexity(ref / "model"), rel=0, abs=0)
    assert reload_perplexity(out / "model") == pytest.approx(ref_ppl[EVAL_NAME], rel=1e-4)
