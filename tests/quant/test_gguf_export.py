"""`shrink export-gguf` (quant/gguf_export.py): GPTQ groups re-blocked into Q4_0/Q4_1/Q8_0, read
back by gguf-py's own dequantizer and by transformers' GGUF loader at the run's perplexity; bad
inputs refused in one line with nothing written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from engine.errors import ShrinkError  # noqa: E402
from engine.evaluation import measure  # noqa: E402
from quant.export import load_quantized_model  # noqa: E402
from quant.gguf_export import gguf_blocks, rotary_rows, write_gguf  # noqa: E402
from quant.pack import dequantize_gptq, pack_gptq  # noqa: E402
from tests.conftest import EVAL_NAME, compose_config, run_shrink, tiny_data_overrides  # noqa: E402


@pytest.mark.parametrize("bits,sym,kind", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_blocks_dequantize_in_gguf_py_to_the_gptq_weights(bits, sym, kind) -> None:
    gen = torch.Generator().manual_seed(0)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (64, 128), generator=gen, dtype=torch.int32)
    zero = torch.full((4, 64), float((maxq + 1) // 2)) if sym else torch.randint(1, maxq + 1, (4, 64), generator=gen).float()
    scale = (torch.rand(4, 64, generator=gen) * 0.05 + 1e-3).half().float()
    got_kind, data = gguf_blocks(codes, scale, zero, bits)
    assert got_kind == kind
    theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind])
    g_idx = torch.arange(128, dtype=torch.int32) // 32
    ours = dequantize_gptq(**pack_gptq(codes, scale, zero, g_idx, bits), bits=bits).numpy()
    step = scale.t().repeat_interleave(32, dim=1).numpy()
    error = np.abs(theirs - ours) / step
    if kind == "Q4_1":  # m = -d z rounded to f16: half an ulp of 15 d at most, under 0.8% of a step
        assert 0 < error.max() < 15 * 2**-11, error.max()
    else:
        assert error.max() == 0


def test_rotary_rows_is_the_permutation_transformers_undoes() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(6 * 16 * 4, dtype=np.float32).reshape(6 * 16, 4)
    permuted = w[rotary_rows(6 * 16, 6).numpy()]
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, 6, 6)
    assert np.array_equal(back, w)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shipped_tokenizer):
    """Default `pipeline=quantize` runs (group 32) of a tiny Llama and a tiny Qwen3-MoE."""
    from tests.conftest import save_with_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family in ("llama", "qwen3_moe"):
        model = tiny_model(family)
        model.config.norm_topk_prob = True  # Qwen3-MoE as it ships (and as llama.cpp's qwen3moe graph routes)
        folder = save_with_tokenizer(model, root / family, shipped_tokenizer)
        metrics = run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(windows=8),
                              "eval.baseline=false", "quant.group_size=32"], root / f"{family}-run")
        out[family] = (root / f"{family}-run" / "model", metrics)
    return out


def perplexity(model, overrides) -> float:
    from engine.modeling import load_tokenizer
    from engine.state import RunState

    cfg = compose_config(overrides)
    state = RunState(cfg, Path("."), model, load_tokenizer(Path(cfg.model.path)))
    windows, _ = state.eval_windows()
    return measure(model, windows, 4, "cpu", "gguf").ppl


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_transformers_reads_the_gguf_back_at_the_runs_perplexity(tmp_path, runs, family) -> None:
    folder, metrics = runs[family]
    out = write_gguf(folder, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(out))
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_1" in kinds and kinds <= {"Q4_1", "F16", "F32"}, kinds  # asymmetric 4-bit, the rest float
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == {"llama": "llama", "qwen3_moe": "qwen3moe"}[family]
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names or family != "llama" or not json.loads(
        (folder / "config.json").read_text()).get("tie_word_embeddings")
    if family == "qwen3_moe":
        assert "blk.0.ffn_gate_exps.weight" in names and "blk.0.ffn_gate_inp.weight" in names
    # transformers' GGUF config mapping lacks the MoE sizes of qwen3moe (llama.cpp reads them from
    # expert_feed_forward_length): the folder's config.json supplies them; the tensors are the GGUF's
    kw = {}
    if family == "qwen3_moe":
        kw["config"] = transformers.AutoConfig.from_pretrained(folder)
        del kw["config"].quantization_config
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                           dtype=torch.float32, **kw).eval()
    ours = load_quantized_model(folder, dtype=torch.float32)
    overrides = ["pipeline=eval", f"model.path={folder}", *tiny_data_overrides(windows=8)]
    with torch.no_grad():
        ppl = perplexity(hf, overrides)
        assert perplexity(ours, overrides) == pytest.approx(metrics["ppl"][EVAL_NAME], rel=1e-4)
    assert ppl == pytest.approx(metrics["ppl"][EVAL_NAME], rel=5e-3)


def test_symmetric_4_bit_is_q4_0_and_exact(tmp_path, tiny_model_dir) -> None:
    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.group_size=64", "quant.sym=true", "export.gguf=true"], tmp_path / "run")
    out = tmp_path / "run" / "model.gguf"  # written by the run's export stage
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_0", "F16", "F32"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                           dtype=torch.float32).eval()
    ours = load_quantized_model(tmp_path / "run" / "model", dtype=torch.float32)
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-5)


def run_cli(*argv: str, capsys) -> tuple[int, str]:
    from shrink.cli import main

    capsys.readouterr()  # what ran before
    old = sys.argv
    sys.argv = ["shrink", *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    return exc.value.code, capsys.readouterr().err


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, runs, tiny_model_dir, capsys) -> None:
    folder, _ = runs["llama"]
    cases = {"is not a quantized export": tiny_model_dir("llama")}
    g48 = tmp_path / "g48-run"  # a GPTQ folder whose groups are not whole GGUF blocks
    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('qwen2')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.group_size=48", "quant.export_format=gptq", "quant.method=rtn"], g48)
    cases["group_size 48 is not a multiple of 32"] = g48 / "model"
    opt = tmp_path / "opt-run"
    run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('opt')}", *tiny_data_overrides(),
                "eval.baseline=false", "quant.group_size=32", "quant.method=rtn"], opt)
    cases["architecture 'opt' has no GGUF mapping"] = opt / "model"
    cases["is not a folder"] = tmp_path / "nowhere"
    for message, source in cases.items():
        code, err = run_cli("export-gguf", str(source), str(tmp_path / "out.gguf"), capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("shrink: error:") and message in lines[0], err
        assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name or p.name.startswith(".tmp")) == []
    (tmp_path / "out.gguf").write_bytes(b"mine")
    code, err = run_cli("export-gguf", str(folder), str(tmp_path / "out.gguf"), capsys=capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "out.gguf").read_bytes() == b"mine"


def test_moe_routing_llama_cpp_would_compute_otherwise_is_refused() -> None:
    from quant.gguf_export import ARCHS, check_routing

    check_routing(transformers.Qwen2MoeConfig(norm_topk_prob=False).to_dict(), ARCHS["qwen2_moe"])
    check_routing(transformers.MixtralConfig().to_dict(), ARCHS["mixtral"])  # Mixtral renormalizes, as llama.cpp's llama
    with pytest.raises(ShrinkError, match="norm_topk_prob=true: llama.cpp's qwen2moe graph does not renormalize"):
        check_routing(transformers.Qwen2MoeConfig(norm_topk_prob=True).to_dict(), ARCHS["qwen2_moe"])
    with pytest.raises(ShrinkError, match="norm_topk_prob=false"):
        check_routing(transformers.Qwen3MoeConfig(norm_topk_prob=False).to_dict(), ARCHS["qwen3_moe"])


@pytest.mark.parametrize("override,message", [
    ("quant.bits=3", "4-bit or symmetric 8-bit"), ("quant.group_size=48", "not a multiple of 32"),
    ("quant.act_order=true", "act-order"), ("quant.embed_bits=8", "embedding"),
])
def test_a_run_with_export_gguf_refuses_grids_gguf_cannot_hold(tmp_path, tiny_model_dir, override, message) -> None:
    with pytest.raises(ShrinkError, match=f"export.gguf: .*{message}"):
        run_shrink(["pipeline=quantize", f"model.path={tiny_model_dir('llama')}", *tiny_data_overrides(),
                    "export.gguf=true", override], tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,message", [
    ("rope", "rope_type 'linear' is not written to GGUF"), ("routing", "norm_topk_prob=false: llama.cpp's llama graph"),
    ("tokenizer", "only byte-level BPE tokenizers"),
])
def test_a_run_with_export_gguf_refuses_a_model_gguf_cannot_hold_before_quantizing(tmp_path, tiny_model_dir, case,
                                                                                  message) -> None:
    """Read from the input folder before any model loads, not after the quantize stage has run."""
    folder = tiny_model_dir("mixtral" if case == "routing" else "llama")
    config = json.loads((folder / "config.json").read_text())
    if case == "rope":
        config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    elif case == "routing":
        config["norm_topk_prob"] = False  # a Mixtral-shaped model that does not renormalize its top-2
    else:
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "Whitespace"}
        (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShrinkError, match=f"^export.gguf: .*{message}") as error:
        run_shrink(["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.sym=true",
                    "quant.group_size=32", "export.gguf=true"], tmp_path / "run")
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
