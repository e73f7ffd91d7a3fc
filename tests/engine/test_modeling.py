"""Generic discovery of decoder layers and Linears on every family we claim."""
from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from engine.errors import ShrinkError
from engine.modeling import (check_model_folder, count_parameters, find_decoder_layers, find_linears, linear_dims,
                             set_weight_matrix, weight_matrix)
from engine.weights import unique_tensors
from tests.conftest import FAMILIES, tiny_model

EXPECTED_LINEARS = {  # Linears per decoder layer, found without any per-family table
    "llama": 7, "qwen2": 7, "mistral": 7, "opt": 6, "gpt2": 4, "gpt_neox": 4, "bloom": 4, "falcon": 4, "phi": 6,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_decoder_layers_and_linears(family: str) -> None:
    model = tiny_model(family)
    name, layers = find_decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 2, name
    linears = find_linears(layers[0])
    assert len(linears) == EXPECTED_LINEARS[family], list(linears)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_matrix_is_out_by_in(family: str) -> None:
    """weight_matrix gives [out, in] for Linear and Conv1D alike: module(x) == x W^T + b."""
    _, layers = find_decoder_layers(tiny_model(family))
    for lname, module in find_linears(layers[0]).items():
        W = weight_matrix(module)
        x = torch.randn(3, W.shape[1])
        bias = module.bias if module.bias is not None else 0
        torch.testing.assert_close(module(x), x @ W.t() + bias, msg=lname)
        with torch.no_grad():
            set_weight_matrix(module, torch.zeros_like(W))
            torch.testing.assert_close(module(x), torch.zeros_like(module(x)) + bias)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_dims_match_the_weight_matrix(family: str) -> None:
    """(in, out) for nn.Linear and the transposed Conv1D alike; anything else is refused."""
    _, layers = find_decoder_layers(tiny_model(family))
    for lname, module in find_linears(layers[0]).items():
        out_features, in_features = weight_matrix(module).shape
        assert linear_dims(module) == (in_features, out_features), lname
    with pytest.raises(TypeError, match="LayerNorm"):
        linear_dims(torch.nn.LayerNorm(4))


def test_unique_tensors_keeps_each_view_once() -> None:
    """A tied weight is one tensor under two names; other views of one storage stay apart."""
    base = torch.arange(12.0).reshape(3, 4)
    state = {"embed": base, "head": base, "row0": base[0], "row1": base[1], "empty": torch.empty(0),
             "empty2": torch.empty(0), "copy": base.clone()}
    unique, aliases = unique_tensors(state)
    assert aliases == {"head": "embed"}
    assert list(unique) == ["embed", "row0", "row1", "empty", "empty2", "copy"]
    assert unique["row1"] is state["row1"]


def test_gpt2_uses_conv1d() -> None:
    _, layers = find_decoder_layers(tiny_model("gpt2"))
    assert all(isinstance(m, Conv1D) for m in find_linears(layers[0]).values())


def test_count_parameters_counts_tied_weights_once() -> None:
    import transformers

    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    naive = sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    assert count_parameters(model) == naive - model.lm_head.weight.numel()


def test_no_decoder_layers_is_a_clear_error() -> None:
    with pytest.raises(ShrinkError, match="no decoder layers"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_model_folder_checks(tmp_path) -> None:
    with pytest.raises(ShrinkError, match="is not a folder"):
        check_model_folder(tmp_path / "missing")
    with pytest.raises(ShrinkError, match="no config.json"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ShrinkError, match="pickled weights are not loaded"):
        check_model_folder(tmp_path)
