"""`shrink publish` and the model card: a real export validates; each broken file is named."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from shrink.card import base_model_id, license_of, read_front_matter
from engine.errors import ShrinkError
from shrink.publish import check_folder, publish
from tests.conftest import (EVAL_NAME, ROOT, compose_config, run_shrink, save_with_tokenizer, tiny_data_overrides,
                            tiny_model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shipped_tokenizer: Path) -> Path:
    """A GPTQ export of a tiny Llama whose input card says MIT."""
    root = tmp_path_factory.mktemp("publish")
    model = save_with_tokenizer(tiny_model("llama"), root / "tiny-base", shipped_tokenizer)
    (model / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    run_shrink(["pipeline=quantize", f"model.path={model}", *tiny_data_overrides(), "quant.method=rtn",
                "quant.bits=4", "quant.group_size=32"], root / "run")
    return root / "run" / "model"


@pytest.fixture
def folder(exported: Path, tmp_path: Path) -> Path:
    """A private copy each test may break."""
    return Path(shutil.copytree(exported, tmp_path / "model"))


@pytest.fixture
def offline(monkeypatch):
    """Any network access or Hub client fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access during a dry run")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("huggingface_hub.HfApi", refuse)


def test_card_metadata_results_and_loading(exported: Path) -> None:
    text = (exported / "README.md").read_text()
    meta = read_front_matter(text)
    assert meta["base_model"] == "tiny-base" and meta["license"] == "mit"  # from the input card
    # the default export: asymmetric 4-bit in AWQ's layout, which vLLM serves
    assert {"shrink", "awq", "4-bit", "quantized"} <= set(meta["tags"])
    assert meta["quantized_by"] == "shrink" and meta["quantization"]["bits"] == 4
    assert meta["quantization"]["group_size"] == 32 and meta["base_model_relation"] == "quantized"
    assert meta["quantization"]["layout"] == "awq" and meta["quantization"]["sym"] is False
    assert f"| {EVAL_NAME} |" in text and "bits per weight" in text
    assert "load_quantized_model" in text and "gptqmodel" in text and "vllm serve" in text
    assert "quant.bits=4" in text and "```yaml" in text


def test_card_of_a_pruned_model_with_unknown_license(tmp_path: Path) -> None:
    from shrink.card import model_card
    from engine.state import RunState

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    cfg = compose_config(["pipeline=prune", f"model.path={base}", "prune=sparsegpt_2of4"])
    state = RunState(cfg=cfg, out=tmp_path, model=tiny_model("llama"),
                     metrics={"ppl": {"test": 12.0}, "baseline_ppl": {"test": 10.0}})
    text = model_card(state)
    meta = read_front_matter(text)
    assert {"shrink", "pruned", "sparsegpt", "sparse-2of4"} <= set(meta["tags"]) and "gptq" not in meta["tags"]
    assert meta["license"] == "other" and "could not be determined" in text
    assert "| test | 12.000 | 10.000 | +20.0% |" in text and "quantization" not in meta


def test_provenance_rules() -> None:
    assert base_model_id("/no/such/dir", {"_name_or_path": "meta-llama/Llama-2-7b-hf"}, {}) == \
        ("meta-llama/Llama-2-7b-hf", True)
    assert base_model_id("/x/local-model", {}, {"general.source.repo_url": "https://huggingface.co/org/m"}) == \
        ("org/m", True)
    assert base_model_id("/x/local-model", {}, {}) == ("local-model", False)
    assert license_of({}, {}, {"general.license": "Apache-2.0"}) == {"license": "apache-2.0"}
    assert license_of({}, {}, {}) == {"license": "other", "license_name": "unknown"}


def test_dry_run_lists_every_file_and_touches_no_network(folder: Path, offline, capsys) -> None:
    assert publish(folder, "me/tiny-gptq", dry_run=True) is None
    out = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "quantize_config.json", "tokenizer.json", "README.md",
                 "generation_config.json"):
        assert any(line.split()[:1] == [name] and line.rstrip().endswith("ok") for line in out.splitlines()), name
    assert "nothing was sent" in out


def test_upload_creates_the_repo_then_uploads_the_checked_files(folder: Path, monkeypatch) -> None:
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert publish(folder, "me/tiny-gptq", private=True, token="t") == "https://hub/commit/1"
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[1][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert sorted(calls[2][1]["allow_patterns"]) == sorted(p.name for p in folder.iterdir() if p.is_file())


def break_sharding(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    (folder / "model.safetensors").unlink()
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:]), 1):
        save_file({k: tensors[k] for k in part}, folder / f"model-0000{i}-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names}  # wrong for the second half
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def set_json(name: str, key: str, value) -> callable:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data[key] = value
        (folder / name).write_text(json.dumps(data))
    return edit


BREAKAGES = {
    "quantize_config.json: missing": lambda f: (f / "quantize_config.json").unlink(),
    "tokenizer_config.json: missing": lambda f: (f / "tokenizer_config.json").unlink(),
    "model.safetensors: missing": lambda f: (f / "model.safetensors").unlink(),
    "README.md: missing": lambda f: (f / "README.md").unlink(),
    "config.json: not valid JSON": lambda f: (f / "config.json").write_text("{"),
    "README.md: front matter has no license": lambda f: (f / "README.md").write_text("---\nbase_model: a/b\n"
                                                                                      "tags: [x]\n---\n"),
    "README.md: no YAML front matter": lambda f: (f / "README.md").write_text("# card\n"),
    "quantize_config.json: bits=3": set_json("quantize_config.json", "bits", 3),
    "model-00001-of-00002.safetensors: tensors differ from model.safetensors.index.json": break_sharding,
    "pytorch_model.bin: pickle weights": lambda f: (f / "pytorch_model.bin").write_bytes(b"x"),
    "generation_config.json: not valid JSON": lambda f: (f / "generation_config.json").write_text("nope"),
    # the rules of a run's own input (issue 30): publish loads the folder as a run would
    "holds non-finite values": lambda f: edit_tensor(f, "model.norm.weight", float("inf")),
    "has no 'hidden_size'": lambda f: drop_key(f, "config.json", "hidden_size"),
    "links outside the model folder": lambda f: (f / "chat_template.jinja").symlink_to("/etc/hostname"),
}


def edit_tensor(folder: Path, name: str, value: float) -> None:
    tensors = load_file(folder / "model.safetensors")
    tensors[name][0] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def drop_key(folder: Path, file: str, key: str) -> None:
    data = json.loads((folder / file).read_text())
    del data[key]
    (folder / file).write_text(json.dumps(data))


@pytest.mark.parametrize("problem", list(BREAKAGES))
def test_a_broken_folder_is_refused_naming_the_file_before_any_upload(folder: Path, offline, problem: str) -> None:
    BREAKAGES[problem](folder)
    for dry_run in (True, False):
        with pytest.raises(ShrinkError) as err:
            publish(folder, "me/tiny-gptq", dry_run=dry_run)
        assert problem in str(err.value)


def test_bad_repo_id_and_missing_folder(folder: Path, tmp_path: Path, offline) -> None:
    with pytest.raises(ShrinkError, match="--repo-id"):
        publish(folder, "not a repo/with/slashes", dry_run=True)
    with pytest.raises(ShrinkError, match="is not a folder"):
        check_folder(tmp_path / "nope")


@pytest.mark.slow
def test_cli_dry_run_and_error_exit(folder: Path) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "shrink.cli", "publish", str(folder), "--repo-id", "me/tiny", "--dry-run"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "model.safetensors" in ok.stdout
    (folder / "tokenizer.json").unlink()
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("shrink: error: publish:")
    assert "tokenizer.json" in bad.stderr
