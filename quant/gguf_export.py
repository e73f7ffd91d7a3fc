"""GGUF export of a quantized model folder, for llama.cpp and Ollama (and transformers' gguf_file=).

A GPTQ grid maps exactly onto GGUF's blocks of 32 input columns when every block lies in one of
its groups (group sizes that are multiples of 32, no act-order g_idx): the codes and the fp16
scale of each block are kept as they are.

- 4-bit, every zero point 8 (symmetric): Q4_0, x = d (q - 8). Exact.
- 4-bit, asymmetric: Q4_1, x = d q + m with m = -d z. The codes and d are exact; m is stored in
  f16, so x moves by at most half an f16 ulp of d z (z <= 15: under 0.8% of a quantization step).
- 8-bit symmetric (z = 128): Q8_0, x = d (q - 128) as a signed byte. Exact.
- anything else (2/3-bit, asymmetric 8-bit) has no GGUF block type that holds it: refused.

Every other tensor is written as llama.cpp's converter writes it: matrices in f16, vectors in f32.
Tensor names come from gguf-py's name map for the architecture (the one llama.cpp's converter and
transformers' GGUF loader use); per-expert Linears are stacked into the architecture's 3-D expert
tensors, and llama.cpp's llama graph gets q/k rows in its rotary order (the permutation its
converter applies, and transformers' loader undoes). Metadata: the architecture's hyperparameters
and a byte-level BPE tokenizer (tokens, types, merges, special ids, chat template).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from engine.errors import ShrinkError
from engine.files import atomic_path
from engine.modeling import is_quantized_folder, load_tokenizer, read_config
from quant.pack import uniform_groups, unpack_gptq
from quant.qlinear import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

BLOCK = 32  # the input columns of one GGUF block (Q4_0, Q4_1, Q8_0)
_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")


@dataclass(frozen=True)
class Arch:
    gguf: str  # gguf-py's MODEL_ARCH_NAMES value
    rotary_rows: bool = False  # llama.cpp's llama graph: q/k rows permuted to its rotary order
    head_required: bool = False  # llama.cpp's loader needs output.weight even when it is the embedding
    # whether llama.cpp's graph renormalizes the top-k routing weights (fixed there, not read from
    # the file): a model routing otherwise would run as another model
    topk_norm: bool = True


# model_type -> llama.cpp architecture (Mistral and Mixtral run as llama in llama.cpp)
ARCHS = {"llama": Arch("llama", True), "mistral": Arch("llama", True), "mixtral": Arch("llama", True),
         "qwen2": Arch("qwen2"), "qwen2_moe": Arch("qwen2moe", head_required=True, topk_norm=False),
         "qwen3": Arch("qwen3"), "qwen3_moe": Arch("qwen3moe"), "phi3": Arch("phi3")}


def check_gguf_quant(quant: Any, key: str = "export.gguf") -> None:
    """The settings of a run whose export is also written as GGUF: groups of whole blocks of 32,
    a bit width and symmetry a block type holds, no packed embedding (before any model loads)."""
    if quant.bits not in (4, 8) or (quant.bits == 8 and not quant.sym):
        raise ShrinkError(f"{key}: GGUF blocks hold 4-bit or symmetric 8-bit codes, not quant.bits={quant.bits}"
                          f"{'' if quant.sym else ', quant.sym=false'}")
    if quant.group_size != -1 and quant.group_size % BLOCK:
        raise ShrinkError(f"{key}: quant.group_size={quant.group_size} is not a multiple of {BLOCK} (GGUF blocks)")
    if quant.act_order and quant.method == "gptq" and not quant.static_groups:
        raise ShrinkError(f"{key}: act-order groups (g_idx) have no GGUF form; set quant.static_groups=true")
    if quant.embed_bits is not None:
        raise ShrinkError(f"{key}: a packed input embedding (quant.embed_bits) has no GGUF form")


def check_gguf_model(config: dict[str, Any], folder: Path, key: str) -> Arch:
    """What of a model (its config.json, its folder's tokenizer) decides whether it has a GGUF form
    here: the architecture, plain rope, MoE routing as llama.cpp computes it, a byte-level BPE
    tokenizer; checked by `shrink export-gguf` and, with export.gguf=true, before any model loads."""
    arch = check_gguf_arch(str(config.get("model_type")), key)
    check_rope(config, key)
    check_routing(config, arch, key)
    check_tokenizer(folder / "tokenizer.json", key)
    return arch


def check_rope(config: dict[str, Any], key: str) -> None:
    """Plain rope only: scaled kinds (linear, yarn, llama3, ...) are not written to GGUF here."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ShrinkError(f"{key}: rope_type {kind!r} is not written to GGUF here")


def check_routing(config: dict[str, Any], arch: Arch, key: str = "export-gguf") -> None:
    """An MoE model's top-k weights normalized as llama.cpp's graph for the architecture does."""
    if not (config.get("num_local_experts") or config.get("num_experts")):
        return
    norm = bool(config.get("norm_topk_prob", True))  # Mixtral has no such field: it renormalizes
    if norm != arch.topk_norm:
        how = "renormalizes" if arch.topk_norm else "does not renormalize"
        raise ShrinkError(f"{key}: norm_topk_prob={str(norm).lower()}: llama.cpp's {arch.gguf} graph {how} "
                          "the top-k routing weights, so the GGUF would run as another model")


def check_tokenizer(spec_file: Path, key: str) -> None:
    """A byte-level BPE tokenizer.json, which GGUF holds as llama.cpp's "gpt2" tokenizer model."""
    try:
        spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    except ValueError as exc:
        raise ShrinkError(f"{key}: {spec_file} is not valid JSON ({exc})") from None
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ShrinkError(f"{key}: {spec_file}: only byte-level BPE tokenizers are written to GGUF here")


def check_gguf_arch(model_type: str, key: str) -> Arch:
    arch = ARCHS.get(model_type)
    if arch is None:
        raise ShrinkError(f"{key}: architecture {model_type!r} has no GGUF mapping here "
                          f"(supported: {', '.join(sorted(ARCHS))})")
    return arch


# ---------------------------------------------------------------------------- blocks
def gguf_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> tuple[str, torch.Tensor]:
    """(GGML type, uint8 [out, in / 32 * block bytes]) of codes [out, in] whose blocks of 32 inputs
    have scale/zero [in / 32, out]; ValueError where no block type holds them exactly."""
    out_f, in_f = codes.shape
    q = codes.to(torch.int64).reshape(out_f, in_f // BLOCK, BLOCK)
    d = scale.t().to(torch.float16).contiguous().reshape(out_f, -1, 1)
    z = zero.t().contiguous().reshape(out_f, -1, 1)
    if bits == 8:
        if not bool((z == 128).all()):
            raise ValueError("8-bit asymmetric grids have no GGUF block type (Q8_0 is symmetric); use quant.sym=true")
        body = (q - 128).to(torch.int8).view(torch.uint8)
        return "Q8_0", torch.cat([d.view(torch.uint8), body], dim=2).reshape(out_f, -1)
    if bits != 4:
        raise ValueError(f"{bits}-bit codes have no GGUF block type (4-bit and symmetric 8-bit do)")
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)  # byte j: q[j] low, q[j + 16] high
    if bool((z == 8).all()):
        return "Q4_0", torch.cat([d.view(torch.uint8), nibbles], dim=2).reshape(out_f, -1)
    m = (-d.to(torch.float32) * z).to(torch.float16).contiguous()
    return "Q4_1", torch.cat([d.view(torch.uint8), m.view(torch.uint8), nibbles], dim=2).reshape(out_f, -1)


def linear_blocks(module: QuantLinear, rows: Optional[torch.Tensor] = None) -> tuple[str, torch.Tensor]:
    """A QuantLinear's weight as GGUF blocks (rows: an output-row order, for llama's q/k)."""
    codes, zero, scale = unpack_gptq(module.qweight, module.qzeros, module.scales, module.g_idx, module.bits,
                                     module.checkpoint_format)
    scale, zero = uniform_groups(scale, zero, module.g_idx, BLOCK)
    if rows is not None:
        codes, scale, zero = codes[rows], scale[:, rows], zero[:, rows]
    return gguf_blocks(codes, scale, zero, module.bits)


def rotary_rows(out_features: int, heads: int) -> torch.Tensor:
    """The output-row order llama.cpp's converter gives q/k of the llama graph: within each head,
    the two halves of the rotary dimensions interleaved (transformers' GGUF loader undoes it)."""
    half = out_features // heads // 2
    return torch.arange(out_features).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------- tensors
def gguf_tensors(model: nn.Module, config: Any, arch: Arch, rename: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(on-disk HF name, GGML type or F16/F32, data) of every tensor, experts stacked per block; a
    tied output head is left out (llama.cpp then reads the token embedding)."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    stacks: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    tied = getattr(config, "tie_word_embeddings", False) and head is not None and not isinstance(head, QuantLinear) \
        and not arch.head_required
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        module, disk = modules.get(owner), rename(owner)
        if tied and module is head:
            continue
        rows = None  # llama's q/k: rows (and their biases) in llama.cpp's rotary order
        if arch.rotary_rows and disk.endswith(("q_proj", "k_proj")) and leaf in ("weight", "bias", "qweight"):
            rows = rotary_rows(tensor.shape[-1] if leaf == "qweight" else tensor.shape[0],
                               heads if disk.endswith("q_proj") else kv_heads)
        if isinstance(module, QuantEmbedding):
            raise ShrinkError(f"export-gguf: {disk}: a packed input embedding (quant.embed_bits) has no GGUF form")
        if isinstance(module, QuantLinear) and leaf == "qweight":
            try:
                kind, data = linear_blocks(module, rows)
            except ValueError as exc:
                raise ShrinkError(f"export-gguf: {disk}: {exc}") from None
            if (expert := _EXPERT.match(disk)) is not None:
                stacks.setdefault(f"{expert['head']}.{expert['proj']}.weight", []).append(
                    (int(expert["expert"]), kind, data))
            else:
                yield f"{disk}.weight", kind, data
        elif tensor.is_floating_point() and not (isinstance(module, QuantLinear) and leaf == "scales"):
            tensor = (tensor[rows] if rows is not None else tensor).squeeze()  # as llama.cpp's converter: [1, n] -> [n]
            yield f"{disk}.{leaf}", ("F32" if tensor.ndim <= 1 else "F16"), tensor.float()
    for key, experts in stacks.items():
        experts.sort(key=lambda e: e[0])
        kinds = {k for _, k, _ in experts}
        if len(kinds) != 1:
            raise ShrinkError(f"export-gguf: {key}: experts of one block are stored in different block types {kinds}")
        yield key, kinds.pop(), torch.stack([d for _, _, d in experts])


def write_gguf(folder: Path, out: Path, tokenizer_pre: Optional[str] = None) -> Path:
    """OUT.gguf from a model folder (a shrink quantized export, or a dense one: all f16)."""
    import gguf

    from quant.export import load_quantized_model
    from engine.experts import disk_names, split_modules, to_disk_key

    folder, out = Path(folder), Path(out)
    if out.exists():
        raise ShrinkError(f"export-gguf: {out} already exists; choose another output path")
    raw = read_config(folder, "export-gguf")
    arch = check_gguf_model(raw, folder, "export-gguf")
    if not is_quantized_folder(folder):
        raise ShrinkError(f"export-gguf: {folder} is not a quantized export (no gptq/awq quantization_config)")
    qcfg = raw["quantization_config"]
    size = int(qcfg.get("group_size", -1))
    if size != -1 and size % BLOCK:
        raise ShrinkError(f"export-gguf: {folder}: group_size {size} is not a multiple of {BLOCK} (GGUF blocks)")
    model = load_quantized_model(folder, dtype=torch.float32)
    config = model.config
    renames = disk_names(model)[1] if split_modules(model) else []
    tensors = list(gguf_tensors(model, config, arch, lambda key: to_disk_key(key, renames)))
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf), None)
    if arch_id is None:
        raise ShrinkError(f"export-gguf: the installed gguf package has no {arch.gguf!r} architecture; upgrade gguf")
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf)
        write_metadata(writer, gguf, config, arch, folder, tensors, tokenizer_pre)
        for key, kind, data in tensors:
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ShrinkError(f"export-gguf: {key}: no GGUF name for this tensor in llama.cpp's {arch.gguf} layout")
            if kind in ("F16", "F32"):
                writer.add_tensor(name, data.to(torch.float16 if kind == "F16" else torch.float32).numpy())
            else:
                writer.add_tensor(name, data.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("wrote %s (%d tensors)", out, len(tensors))
    return out


def write_metadata(writer: Any, gguf: Any, config: Any, arch: Arch, folder: Path,
                   tensors: list[tuple[str, str, torch.Tensor]], tokenizer_pre: Optional[str]) -> None:
    """general.*, the architecture's hyperparameters (as llama.cpp's converter names them), tokenizer."""
    kinds = [k for _, k, _ in tensors if k not in ("F16", "F32")]
    main = max(set(kinds), key=kinds.count) if kinds else "F16"
    writer.add_name(folder.parent.name if folder.name == "model" else folder.name)  # a run's OUT/model: the run
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or arch.gguf.startswith("qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    write_tokenizer(writer, gguf, folder, config.vocab_size, tokenizer_pre)


# ---------------------------------------------------------------------------- tokenizer
def pre_tokenizer_name(spec: Any) -> Optional[str]:
    """llama.cpp's name for a byte-level pre-tokenizer it knows by its tokenizer.json form."""
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    parts = spec.get("pretokenizers") if spec.get("type") == "Sequence" else None
    if parts and len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and parts[1].get("type") == "ByteLevel" and parts[1].get("use_regex", True):
        return "smollm"
    return None


def write_tokenizer(writer: Any, gguf: Any, folder: Path, vocab_size: int, pre: Optional[str]) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" tokenizer model."""
    spec = json.loads((folder / "tokenizer.json").read_text())  # checked by check_gguf_model
    tokenizer = load_tokenizer(folder)  # one line, not a traceback, for a tokenizer that does not load
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    name = pre or pre_tokenizer_name(spec.get("pre_tokenizer"))
    if name is None:
        log.warning("export-gguf: the pre-tokenizer is not one llama.cpp is known to name; writing 'default' "
                    "(pass --tokenizer-pre NAME for llama.cpp's name of it)")
        name = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
