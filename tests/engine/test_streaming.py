"""model.lazy: a model streamed from its shards quantizes and evaluates exactly as the eager path."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import EVAL_NAME, run_shrink, tiny_data_overrides


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family,extra", [
    ("llama", ["pipeline=quantize"]), ("qwen2", ["pipeline=quantize"]), ("opt", ["pipeline=quantize"]),
    ("llama", ["pipeline=quantize", "quant.method=rtn"]),
    ("llama", ["pipeline=prune"]),  # SparseGPT 50%: a dense export
    ("qwen2", ["pipeline=prune", "prune=wanda"]),
    ("llama", ["pipeline=prune_quantize"]),  # two streamed stages, the second reading the first's folder
    ("llama", ["pipeline=prune", "prune.joint_quant=true"]),
])
def test_lazy_equals_eager(tmp_path, tiny_model_dir, family, extra) -> None:
    folder = tiny_model_dir(family)
    common = [*extra, f"model.path={folder}", "quant.group_size=32", *tiny_data_overrides()]
    eager = run_shrink(common + ["model.lazy=false"], tmp_path / "eager")
    lazy = run_shrink(common + ["model.lazy=true", "export.max_shard_size=40KB"], tmp_path / "lazy")
    a, b = tensors(tmp_path / "eager" / "model"), tensors(tmp_path / "lazy" / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (tmp_path / "lazy" / "model" / "model.safetensors.index.json").is_file()  # sharded at 40 kB
    config = lambda run: json.loads((tmp_path / run / "model" / "config.json").read_text())  # noqa: E731
    assert config("eager") == config("lazy")
    for key in ("ppl", "baseline_ppl", "bits_per_byte", "params", "sparsity"):
        assert lazy[key] == eager[key], key
    assert sorted(p.name for p in (tmp_path / "lazy").iterdir() if p.name.startswith(".tmp")) == []


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_lazy_eval_of_the_gptq_output_equals_eager(tmp_path, tiny_model_dir, family) -> None:
    """The exported folder reloads lazily (packed Linears streamed too) to the in-run figures."""
    folder = tiny_model_dir(family)
    run_shrink(["pipeline=quantize", f"model.path={folder}", "model.lazy=true", "quant.group_size=32",
                "eval.baseline=false", *tiny_data_overrides()], tmp_path / "q")
    common = ["pipeline=eval", f"model.path={tmp_path / 'q' / 'model'}", *tiny_data_overrides()]
    eager = run_shrink(common + ["model.lazy=false"], tmp_path / "eager")
    lazy = run_shrink(common + ["model.lazy=true"], tmp_path / "lazy")
    assert lazy["ppl"][EVAL_NAME] == eager["ppl"][EVAL_NAME]
    assert lazy["sparsity"] == eager["sparsity"] and lazy["params"] == eager["params"]


def test_auto_streams_only_past_the_share_of_available_ram() -> None:
    from engine.errors import ShrinkError
    from engine.streaming import AUTO_RAM_SHARE, resolve_lazy

    gib = 2**30
    assert resolve_lazy("auto", int(AUTO_RAM_SHARE * 8 * gib) + 1, available=8 * gib)
    assert not resolve_lazy("auto", int(AUTO_RAM_SHARE * 8 * gib), available=8 * gib)
    assert resolve_lazy(True, 1) and not resolve_lazy("false", 10**15)
    with pytest.raises(ShrinkError, match="model.lazy"):
        resolve_lazy("sometimes", 1)


def test_lazy_refuses_stages_that_do_not_stream(tmp_path, tiny_model_dir) -> None:
    from engine.errors import ShrinkError

    with pytest.raises(ShrinkError, match="model.lazy: the distill stage"):
        run_shrink(["pipeline=distill", f"model.path={tiny_model_dir('llama')}", "model.lazy=true",
                    "distill.student.num_layers=1", *tiny_data_overrides()], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def sharded(tmp_path: Path, tiny_model_dir) -> Path:
    """A tiny llama saved in several shards with an index."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def rewrite(file: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    tensors[name] = tensor
    save_file(tensors, file, metadata={"format": "pt"})


def damage_missing_shard(folder: Path) -> tuple[str, str]:
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    return victim.name, "does not exist"


def damage_unindexed_shard(folder: Path) -> tuple[str, str]:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[1]
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != victim}
    index.write_text(json.dumps(data))
    return index.name, "is missing"


def damage_truncated(folder: Path) -> tuple[str, str]:
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    return victim.name, "truncated"


def damage_dtype(folder: Path) -> tuple[str, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite(folder / index[name], name, torch.zeros(64, 128, dtype=torch.int32))
    return index[name], "is I32 but the model holds float"


def damage_shape(folder: Path) -> tuple[str, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite(folder / index[name], name, torch.zeros(64, 32))
    return index[name], "has shape [64, 32] but config.json gives [64, 64]"


@pytest.mark.parametrize("damage", [damage_missing_shard, damage_unindexed_shard, damage_truncated, damage_dtype,
                                    damage_shape])
def test_bad_shards_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, damage) -> None:
    from engine.errors import ShrinkError

    folder = sharded(tmp_path, tiny_model_dir)
    file, what = damage(folder)
    out = tmp_path / "run"
    with pytest.raises(ShrinkError) as caught:
        run_shrink(["pipeline=quantize", f"model.path={folder}", "model.lazy=true", "quant.method=rtn",
                    *tiny_data_overrides()], out)
    message = str(caught.value)
    assert "\n" not in message and file in message and what in message, message
    assert not out.exists()


@pytest.mark.parametrize("max_bytes", [10**6, 3000])  # header in its reserved room; header moved (copy)
def test_shard_writer_writes_standard_safetensors(tmp_path, max_bytes) -> None:
    from safetensors.torch import load_file

    from engine.streaming import ShardWriter
    from engine.weights import read_headers

    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.w": torch.randn(16, 24, generator=g).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    tensors["layers.9.q"] = torch.randint(-2**31, 2**31 - 1, (8, 8), dtype=torch.int32, generator=g)
    writer = ShardWriter(tmp_path, max_bytes)
    writer.add_all(tensors)
    weight_map = writer.finish()
    files = sorted(set(weight_map.values()))
    assert (len(files) > 1) == (max_bytes < 10**6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    read = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert {k: h.shape for k, h in read_headers(tmp_path).items()} == {k: tuple(t.shape) for k, t in tensors.items()}


@pytest.mark.parametrize("extra", [["pipeline=quantize"], ["pipeline=prune"]])
def test_lazy_moe_equals_eager(tmp_path, tiny_model_dir, extra) -> None:
    """Fused experts split on the skeleton, read and written under the family's per-expert names."""
    folder = tiny_model_dir("mixtral")
    common = [*extra, f"model.path={folder}", "quant.group_size=32", *tiny_data_overrides()]
    eager = run_shrink(common + ["model.lazy=false"], tmp_path / "eager")
    lazy = run_shrink(common + ["model.lazy=true"], tmp_path / "lazy")
    a, b = tensors(tmp_path / "eager" / "model"), tensors(tmp_path / "lazy" / "model")
    assert a.keys() == b.keys() and any(".experts.3." in k for k in a)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for key in ("ppl", "baseline_ppl", "params", "sparsity"):
        assert lazy[key] == eager[key], key
    assert lazy["stages"][extra[0].split("=")[1]]["moe"] == eager["stages"][extra[0].split("=")[1]]["moe"]


def test_max_shard_size_reads_sizes_and_refuses_nonsense() -> None:
    from engine.errors import ShrinkError
    from quant.streaming import shard_bytes

    assert shard_bytes("4GB") == 4 * 10**9 and shard_bytes("512MiB") == 512 * 2**20 and shard_bytes(1000) == 1000
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ShrinkError, match="export.max_shard_size"):
            shard_bytes(bad)


def test_a_streamed_layer_is_freed_when_done_without_waiting_for_gc(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """Every decoder layer's Linears (their compressed weights, their Hessians' jobs) are freed by
    reference counting once the layer is written: nothing of a finished layer may wait for a
    cyclic garbage collection, or peak memory grows with depth (it did: a job listed itself)."""
    import gc
    import weakref

    from torch import nn

    from engine.streaming import LazyModel

    seen: list[weakref.ref] = []
    load_layer = LazyModel.load_layer

    def tracking(self: LazyModel, i: int) -> nn.Module:
        layer = load_layer(self, i)
        seen.extend(weakref.ref(m) for m in layer.modules() if type(m) is nn.Linear)
        return layer

    monkeypatch.setattr(LazyModel, "load_layer", tracking)
    folder = tiny_model_dir("llama")
    gc.collect()
    gc.disable()
    try:
        run_shrink(["pipeline=quantize", f"model.path={folder}", "model.lazy=true", "quant.group_size=32",
                    "eval.baseline=false", *tiny_data_overrides()], tmp_path / "q")
        alive = sum(ref() is not None for ref in seen)
    finally:
        gc.enable()
    assert seen and alive == 0, f"{alive} of {len(seen)} streamed Linears outlived their layer"
