"""Model plumbing that knows no algorithm: load, save, and find decoder layers and Linears.

Discovery works from the model's own structure, not per-architecture tables: the
decoder layers are the longest ModuleList of identical blocks, and the Linears are
every nn.Linear or GPT-2-style Conv1D inside one block.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from engine.config import ModelConfig
from engine.experts import SplitExperts
from engine.errors import ShrinkError, first_line
from engine.weights import check_load, read_headers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors",)
# A tokenizer's vocabulary lives in one of these (fast tokenizers, SentencePiece, BPE vocab files).
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
# (folder, device=..., dtype=...) -> model: how a GPTQ folder is loaded (quant.export.load_quantized_model)
QuantizedLoader = Callable[..., PreTrainedModel]


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ShrinkError(f"model.dtype: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ShrinkError(f"model.device: {name!r} asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ShrinkError(f"model.device: unknown device {name!r} (cpu | cuda | auto)")
    return torch.device(name)


def check_model_folder(path: str | os.PathLike, key: str = "model.path") -> Path:
    """A local HF folder with a readable config.json and safetensors weights (pickles are
    refused), whose files all lie inside it, checked without loading any weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ShrinkError(f"{key}: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ShrinkError(f"{key}: {folder} has no config.json (not a Hugging Face model folder)")
    check_contained(folder, key)
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickles[0]}: pickled weights are not loaded)" if pickles else ""
        raise ShrinkError(f"{key}: {folder} has no .safetensors weights{hint}")
    read_config(folder, key)
    read_headers(folder, key)
    if not any((folder / name).is_file() for name in TOKENIZER_VOCABS):
        raise ShrinkError(f"{key}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_VOCABS)})")
    check_chat_template_names(folder, key)
    return folder


def check_contained(folder: Path, key: str) -> None:
    """Every file must resolve inside the folder (a Hub cache snapshot: inside its repo),
    since the tokenizer's and config's files are read and written again into exports."""
    root = folder.resolve()
    # huggingface_hub snapshots are links into the repo's blobs/ folder
    allowed = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    for path in folder.rglob("*"):
        target = path.resolve()
        if path.is_symlink() and not any(target.is_relative_to(a) for a in allowed):
            raise ShrinkError(f"{key}: {path} links outside the model folder (to {target}); refused")
        if path.is_symlink() and not (target.is_file() or target.is_dir()):
            raise ShrinkError(f"{key}: {path} is a broken link or not a regular file; refused")


def read_config(folder: Path, key: str = "model.path") -> dict:
    """config.json as a dict, or a one-line error saying why it is not one."""
    return read_config_file(folder / "config.json", key)


def read_config_file(file: Path, key: str = "model.path") -> dict:
    """A model config file as a dict: JSON, with a model_type and every size its family needs."""
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShrinkError(f"{key}: {file} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ShrinkError(f"{key}: {file} has no model_type (not a Hugging Face model config)")
    check_config_sizes(config, file, key)
    return config


# The config keys that set a model's shapes (its family's own names for them among these):
# transformers fills an absent one with its family default (a 7B Llama's hidden_size, say).
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
             "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "head_dim", "intermediate_size",
             "ffn_dim", "n_inner", "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size", "shared_expert_intermediate_size", "n_shared_experts", "kv_lora_rank",
             "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def check_config_sizes(config: dict, file: Path, key: str) -> None:
    """Refuse a config.json without a size its family would otherwise default (a value given as
    None in the family's signature is derived from the others, as it should be: not refused;
    a size given under a legacy name its family reads, e.g. BLOOM's n_embed, is given)."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:  # remote code: its own class decides
        return
    family = CONFIG_MAPPING[config["model_type"]]
    params = inspect.signature(family.__init__).parameters
    aliases = getattr(family, "attribute_map", {}) or {}
    resolved = None
    for name in SIZE_KEYS:
        if name not in params or params[name].default in (None, inspect.Parameter.empty):
            continue
        if ({name} | {other for pair in aliases.items() if name in pair for other in pair}) & config.keys():
            continue  # given, under either spelling
        try:
            resolved = resolved or family.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
        except Exception:  # noqa: BLE001 - a config transformers refuses is refused where it loads
            return
        if getattr(resolved, name, None) == params[name].default:
            raise ShrinkError(f"{key}: {file} has no {name!r} (a {config['model_type']} config would default it "
                              f"to {params[name].default!r}, not this model's value)")


def check_chat_template_names(folder: Path, key: str) -> None:
    """Named chat templates become file names when saved: refuse any that is not a plain name."""
    file = folder / "tokenizer_config.json"
    try:
        templates = json.loads(file.read_text()).get("chat_template") if file.is_file() else None
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise ShrinkError(f"{key}: {file} is not a JSON object") from None
    names = [t.get("name") for t in templates if isinstance(t, dict)] if isinstance(templates, list) else []
    for name in names:
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise ShrinkError(f"{key}: {file}: chat template name {name!r} is not a plain file name")


# The quantization_config methods of the packed layouts quant's loader reads (GPTQ, AWQ GEMM).
PACKED_METHODS = ("gptq", "awq")


def is_quantized_folder(folder: Path) -> bool:
    """A checkpoint in one of the packed layouts (its loader is quant's, not transformers')."""
    return (read_config(folder).get("quantization_config") or {}).get("quant_method") in PACKED_METHODS


def load_model(cfg: ModelConfig, quantized_loader: Optional[QuantizedLoader] = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer from a local folder on the CPU in cfg.dtype, in eval mode.

    Models stay on the CPU: the stages move what they need (one layer at a time for
    calibration, the whole model for evaluation) to cfg.device. A GPTQ folder needs
    `quantized_loader` (the engine knows no quantization format; quant provides it).
    """
    folder = check_model_folder(cfg.path)
    dtype = resolve_dtype(cfg.dtype)
    if is_quantized_folder(folder):
        if quantized_loader is None:
            raise ShrinkError(f"model.path: {folder} is a quantized checkpoint; it cannot be used here")
        model = quantized_loader(folder, device="cpu", dtype=dtype)
    else:
        model = load_checked(folder, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(folder, cfg.trust_remote_code)
    check_vocab(model, tokenizer, folder)
    return model.eval(), tokenizer


def load_checked(folder: Path, check_kinds: bool = True, **kwargs: object) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, refused unless every tensor loaded whole (engine.weights)."""
    headers = read_headers(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ShrinkError(f"model.path: cannot load {folder}: {first_line(exc)}") from None
    check_load(folder, model, headers, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"],
               check_kinds=check_kinds)
    return model


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ShrinkError(f"model.path: cannot load a tokenizer from {folder}: {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise ShrinkError(f"model.path: tokenizer in {folder} has no EOS token")
    return tokenizer


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Every token id the tokenizer can emit must index a row of the embedding."""
    table = model.get_input_embeddings()
    rows = getattr(table, "num_embeddings", None) or table.weight.shape[0]  # a packed table has no weight
    if len(tokenizer) > rows:
        raise ShrinkError(
            f"model.path: tokenizer in {folder} has {len(tokenizer)} tokens but the model's "
            f"embedding has {rows} rows (tokenizer/vocab mismatch)"
        )


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count: tied weights once, packed Linears by their unpacked size
    and their bias (a buffer there), so quantizing leaves the count as it was."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_packed_linear(module):
            bias = getattr(module, "bias", None)
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def is_packed_linear(module: nn.Module) -> bool:
    """A GPTQ-style packed Linear (quant.qlinear.QuantLinear and the ecosystem's kernels)."""
    return hasattr(module, "qweight") and hasattr(module, "in_features") and hasattr(module, "out_features")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList whose children all share one class: the decoder stack."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or isinstance(module, SplitExperts) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, (nn.Linear, Conv1D)) or is_packed_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ShrinkError(f"no decoder layers found in {type(model).__name__} (no repeated block with Linears)")
    return best


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D under module, by qualified name, in registration order."""
    return {
        name: child
        for name, child in module.named_modules()
        if isinstance(child, (nn.Linear, Conv1D)) and name
    }


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (weight stored [in, out])."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"not a Linear or Conv1D: {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (Conv1D stores it transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def set_weight_matrix(module: nn.Module, W: torch.Tensor) -> None:
    target = module.weight.data
    target.copy_(W.t() if isinstance(module, Conv1D) else W)


def folder_size_bytes(folder: str | os.PathLike, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.name.endswith(suffixes))
