"""The model's ends (quant.lm_head, quant.embed_bits): packed in gptqmodel's layout, untied from
each other, counted in the bits, and read back by our loader (and by gptqmodel, in test_interop)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from engine.errors import ShrinkError
from quant.export import load_quantized_model
from quant.qlinear import QuantEmbedding, QuantLinear
from tests.conftest import run_shrink, tiny_data_overrides

ENDS = ["quant.lm_head=true", "quant.embed_bits=8"]


def saved(folder) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("family,table,head", [("llama", "model.embed_tokens", "lm_head"),
                                               ("gpt2", "transformer.wte", "lm_head"),
                                               ("mixtral", "model.embed_tokens", "lm_head")])
def test_packed_ends_shrink_the_checkpoint_and_reload_exactly(tmp_path, tiny_model_dir, family, table, head) -> None:
    folder = tiny_model_dir(family)
    plain = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false"],
                       tmp_path / "plain")
    out = tmp_path / "ends"
    m = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false",
                    *ENDS], out)
    keys = saved(out / "model")
    for end in (table, head):
        assert {f"{end}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")} <= keys.keys()
        assert f"{end}.weight" not in keys
    config = json.loads((out / "model" / "config.json").read_text())
    q = config["quantization_config"]
    assert config["tie_word_embeddings"] is False
    assert q["lm_head"] is True and q["dynamic"] == {table: {"bits": 8, "group_size": 32, "sym": False,
                                                             "desc_act": False}}
    assert not any(n.startswith(("lm_head", "embed", "wte")) for n in q["modules_in_block_to_quantize"][0])
    # a tied pair is stored twice once untied, and counted so; the packed ends still take fewer bytes
    model = load_quantized_model(out / "model", dtype=torch.float32)
    table_params = model.get_input_embeddings().num_embeddings * model.get_input_embeddings().embedding_dim
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    assert m["params"] == plain["params"] + (table_params if tied else 0)
    assert m["size_bytes"] < plain["size_bytes"]
    assert m["bits_per_weight"] < plain["bits_per_weight"]
    ends = {e["full_name"]: e for e in m["stages"]["quantize"]["ends"]}
    assert ends[table]["bits"] == 8 and 0 < ends[table]["rel_error"] < 1e-3
    assert "gptq_error" in ends[head] and 0 < ends[head]["rel_error"] < 0.05
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), QuantLinear)
    assert model.get_output_embeddings().bits == 4 and model.get_input_embeddings().bits == 8
    card = (out / "model" / "README.md").read_text()
    assert "transformers + optimum do not read" in card and "from_pretrained" not in card
    reloaded = run_shrink(["pipeline=eval", f"model.path={out / 'model'}", *tiny_data_overrides()], tmp_path / "re")
    assert reloaded["ppl"] == pytest.approx(m["ppl"], rel=1e-5)
    assert reloaded["params"] == m["params"]
    assert reloaded["bits_per_weight"] == pytest.approx(m["bits_per_weight"], rel=1e-3)


def test_the_head_is_calibrated_on_every_token_of_the_model_as_it_is(tiny_model_dir) -> None:
    """The head's Hessian holds one row per calibration token (the final hidden states), and
    GPTQ with it beats RTN on the head's output error tr((W-Q) H (W-Q)^T)."""
    from transformers import AutoModelForCausalLM

    from quant.ends import head_hessian
    from quant.gptq import gptq_quantize, rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    windows = torch.randint(0, 8192, (6, 32), generator=torch.Generator().manual_seed(0))
    head = model.get_output_embeddings()
    acc = head_hessian(model, head, windows, torch.device("cpu"), batch_size=4)
    assert acc.n == windows.numel()
    W, H = head.weight.detach().float(), acc.H
    err = lambda Q: float(torch.trace((W - Q) @ H @ (W - Q).T))  # noqa: E731
    assert err(gptq_quantize(W, H, 4, 32).Q) < 0.8 * err(rtn_quantize(W, 4, 32).Q)


@pytest.mark.parametrize("overrides,message", [
    (["quant.embed_bits=5"], "quant.embed_bits: 5 is not supported"),
    (["quant.embed_group_size=0"], "quant.embed_group_size"),
    (["quant.lm_head=true", "model.lazy=true"], "model.lazy: quant.lm_head / quant.embed_bits"),
])
def test_ends_that_cannot_be_done_are_refused_in_one_line(tmp_path, tiny_model_dir, overrides, message) -> None:
    folder = tiny_model_dir("llama")
    with pytest.raises(ShrinkError, match=message.replace(".", r"\.").replace("/", r"/")):
        run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), *overrides], tmp_path / "o")
    assert not (tmp_path / "o" / "model").exists()


def test_joint_prune_quantize_refuses_ends(tmp_path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    with pytest.raises(ShrinkError, match="not with prune.joint_quant"):
        run_shrink(["pipeline=prune_quantize", f"model.path={folder}", *tiny_data_overrides(),
                    "prune.joint_quant=true", "quant.lm_head=true"], tmp_path / "o")


@pytest.mark.slow  # three CLI processes
def test_a_run_killed_after_quantizing_the_ends_resumes_to_the_same_bytes(tmp_path, tiny_model_dir) -> None:
    """The stage checkpoint holds the packed ends; resume=true reads them back and exports the
    same folder as a run that was never interrupted."""
    import signal

    from tests.shrink.killpoint import shrink_process

    args = ["pipeline=quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(), *ENDS]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert shrink_process(*args, f"out={ref}").returncode == 0
    killed = shrink_process(*args, f"out={out}", kill=("shrink.pipeline:eval_stage", "before", "KILL"))
    assert killed.returncode == -signal.SIGKILL
    resumed = shrink_process(*args, f"out={out}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    files = sorted(p.name for p in (ref / "model").iterdir())
    assert sorted(p.name for p in (out / "model").iterdir()) == files
    for name in files:
        assert (out / "model" / name).read_bytes() == (ref / "model" / name).read_bytes(), name


def test_packing_one_end_of_a_tied_pair_warns_that_the_export_grows(tmp_path, tiny_model_dir, caplog) -> None:
    folder = tiny_model_dir("gpt2")  # tied
    base = ["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false"]
    plain = run_shrink(base, tmp_path / "plain")
    one = run_shrink(base + ["quant.lm_head=true"], tmp_path / "one")
    assert "only one end of a tied pair is packed" in caplog.text
    assert one["size_bytes"] > plain["size_bytes"]


def test_nan_in_the_heads_inputs_is_one_line_naming_the_head(tmp_path, tiny_model_dir) -> None:
    """Finite weights whose product overflows after the last decoder layer (a final-norm gain of
    3e38) reach only the head's inputs: the head's Hessian is refused, not quantized."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] = 3e38
    model.save_pretrained(folder)
    with pytest.raises(ShrinkError, match=r"^lm_head: NaN/inf in calibration activations$"):
        # float32 export: a float16 one is refused before anything runs (3e38 is beyond its range)
        run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "eval.baseline=false",
                    "quant.export_dtype=float32", *ENDS], tmp_path / "o")
    assert not (tmp_path / "o" / "model").exists()
