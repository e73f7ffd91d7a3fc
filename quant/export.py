"""Export / load GPTQ checkpoints (app level: uses transformers, safetensors, accelerate).

A folder written by save_gptq_model is a standard GPTQ checkpoint (or, when quant_config says
awq, the same quantization in AWQ's GEMM layout: quant/layout.py):
  config.json            model config + "quantization_config" (what transformers/optimum read)
  quantize_config.json   the same dict (what gptqmodel / AutoGPTQ read)
  model.safetensors      or model-0000x-of-0000y.safetensors + model.safetensors.index.json
  generation_config.json when the model has one
Quantized Linears appear as <name>.qweight/.qzeros/.scales/.g_idx(/.bias); everything else
is the usual float state dict. load_quantized_model reads it back with safetensors only
(never pickle) and without gptqmodel/optimum.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.experts import disk_names, split_experts, split_modules, stored_names, to_disk_key, to_memory_key
from engine.files import atomic_folder
from engine.modeling import linear_dims
from engine.weights import SAFE_INDEX, SAFE_NAME, check_load, narrow, read_headers, tied_embeddings, unique_tensors
from quant.config import QuantConfig, export_format
from quant.layout import awq_quantization_config, fit_layout, float_matrices, from_disk, is_awq, memory_format, to_disk
from quant.qlinear import QuantEmbedding, QuantLinear

log = logging.getLogger(__name__)

QUANT_CONFIG_NAME = "quantize_config.json"
EXPORT_DTYPE_HINT = "export it in a wider float dtype (quant.export_dtype=bfloat16, or float32 to keep every value)"
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------------------- modules
def replace_with_quant_linears(
    model: nn.Module,
    packed: dict[str, dict[str, torch.Tensor]],
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> nn.Module:
    """Swap each named Linear/Conv1D (names as in model.named_modules()) for a QuantLinear.

    packed[name] is pack_gptq's output for that layer (weights in nn.Linear orientation
    [out, in], also for Conv1D). The original bias is kept. Returns model (modified in place).
    """
    for name, tensors in packed.items():
        old = model.get_submodule(name)
        in_f, out_f = linear_dims(old)
        bias = old.bias.detach().clone() if getattr(old, "bias", None) is not None else None
        new = QuantLinear.from_packed(tensors, bits, group_size, bias=bias, checkpoint_format=checkpoint_format)
        if (new.in_features, new.out_features) != (in_f, out_f):
            raise ValueError(
                f"{name}: packed tensors are {new.in_features}->{new.out_features}, module is {in_f}->{out_f}"
            )
        model.set_submodule(name, new.to(old.weight.device))
    return model


# ---------------------------------------------------------------------------- config
def gptq_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    static_groups: bool,
    true_sequential: bool,
    damp_percent: float,
    checkpoint_format: str = "gptq",
    modules_in_block_to_quantize: list[list[str]] | None = None,
    quantizer: str = "shrink",
) -> dict[str, Any]:
    """The quantization_config dict shared by config.json and quantize_config.json.

    Field choices (readers checked: transformers 5.23 GPTQConfig, optimum 2.3
    GPTQQuantizer, gptqmodel 7.6 QuantizeConfig):
    - quant_method/method: transformers dispatches on quant_method; gptqmodel 7 calls it
      "method" (quant_method is its deprecated alias). Both are written.
    - format/checkpoint_format: "gptq" = v1 qzeros (z-1). transformers 5 and gptqmodel
      read "format", older AutoGPTQ/optimum "checkpoint_format".
    - pack_dtype "int32": gptqmodel sizes qweight/qzeros from it.
    - lm_head false: gptqmodel would otherwise not know whether lm_head is packed.
    - act_group_aware false: transformers/optimum default it to True (GAR, a
      quantization-time reordering). We never use it; stating False keeps the recorded
      recipe honest. desc_act must be True whenever g_idx is not i // group_size, because
      readers pick kernels that ignore g_idx when desc_act is False (save checks this).
    - modules_in_block_to_quantize: optimum replaces EVERY Linear inside the decoder blocks
      with a quant layer unless this lists the quantized ones (save fills it in).
    - damp_percent/static_groups/true_sequential top level (transformers validates
      damp_percent in (0, 1)) and in meta, where gptqmodel 7 keeps recipe details.
    """
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    if not 0 < damp_percent < 1:
        raise ValueError("damp_percent must be in (0, 1)")
    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "damp_percent": damp_percent,
        "act_group_aware": False,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [quantizer],
            "damp_percent": damp_percent,
            "static_groups": static_groups,
            "true_sequential": true_sequential,
            "act_group_aware": False,
        },
    }
    if modules_in_block_to_quantize is not None:
        cfg["modules_in_block_to_quantize"] = modules_in_block_to_quantize
    return cfg


_BLOCK_RE = re.compile(r"^(?P<block>.+?)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def _modules_in_block(names: list[str], present: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Quantized module names relative to their decoder block, e.g. "self_attn.q_proj".

    One flat group: for loading only membership matters (the nesting records
    true-sequential order for quantization, which the reader ignores). Blocks may differ
    (dense first layers of an MoE model): the list is then their union, which is exact as
    long as no block holds a listed Linear that it did not quantize (`present`: each block's
    Linear names, checked when given).
    """
    per_block: dict[str, set[str]] = {}
    rests: list[str] = []
    for n in names:
        m = _BLOCK_RE.match(n)
        if m is None:
            raise ValueError(f"{n} is not inside a numbered block; GPTQ readers cannot place it")
        per_block.setdefault(m["idx"], set()).add(m["rest"])
        if m["rest"] not in rests:
            rests.append(m["rest"])
    if len({frozenset(s) for s in per_block.values()}) > 1:
        # optimum applies one module list to all blocks: a ragged pattern could load wrong.
        union = set(rests)
        if present is None or any((union & present.get(i, set())) != q for i, q in per_block.items()):
            raise ValueError("quantized modules differ between blocks; GPTQ config cannot express that")
    return [rests]


def _block_linears(model: nn.Module, rename: Callable[[str], str]) -> dict[str, set[str]]:
    """Per block index, the (on-disk) names of its Linears and QuantLinears."""
    present: dict[str, set[str]] = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)) and (b := _BLOCK_RE.match(rename(n))):
            present.setdefault(b["idx"], set()).add(b["rest"])
    return present


# ---------------------------------------------------------------------------- save
def _ends(model: nn.Module) -> list[nn.Module]:
    ends = [getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output")]
    return [m for m in ends if m is not None]


def cast_floats(state: dict[str, torch.Tensor], float_dtype: torch.dtype | None,
                qnames: list[str]) -> dict[str, torch.Tensor]:
    """A GPTQ export's floating tensors in float_dtype (None: as they are), the scales of the
    packed Linears `qnames` left float16 as the format fixes them."""
    if float_dtype is None:
        return state
    scales = {f"{n}.scales" for n in qnames}
    return {k: narrow(t, float_dtype, k, "quant.export_dtype", EXPORT_DTYPE_HINT)
            if t.is_floating_point() and k not in scales else t for k, t in state.items()}


def _dedup_shared(state: dict[str, torch.Tensor], tied: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """safetensors refuses tensors sharing storage. For tied embeddings drop the later key
    (transformers re-ties on load); any other sharing is broken with a clone, because the
    loader would not know to re-share it."""
    _, aliases = unique_tensors(state)
    if tied:
        return {k: t.contiguous() for k, t in state.items() if k not in aliases}, list(aliases)
    return {k: (t.clone() if k in aliases else t).contiguous() for k, t in state.items()}, []


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


def _check_g_idx(model: nn.Module, desc_act: bool) -> None:
    """GPTQ readers ignore g_idx unless desc_act (AWQ has no g_idx: layout.to_disk checks its groups)."""
    if desc_act:
        return
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.group_size not in (-1, 0):
            trivial = torch.arange(m.in_features, device=m.g_idx.device) // m.group_size
            if not torch.equal(m.g_idx.long(), trivial):
                raise ValueError(f"{name}: act-order g_idx requires desc_act=True in quantization_config")


def save_gptq_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    quant_config: dict[str, Any],
    max_shard_size: int = 4 * 1024**3,
    overwrite: bool = False,
    float_dtype: torch.dtype | None = None,
) -> Path:
    """Write model (with QuantLinear layers already swapped in) as a GPTQ folder.

    float_dtype: the dtype of every floating tensor outside the packed layers (embeddings,
    lm_head, norms, routers, biases; config.json's dtype says so too), None = as in memory.
    GPTQ scales stay float16 whatever it is. Everything goes to a temporary sibling first and is
    renamed into place at the end, so a failure never leaves a half-written out_dir. Returns the
    final path.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True)")
    quant_config = fit_layout(model, quant_config)
    # split experts are written under the family's on-disk per-expert names
    renames = disk_names(model)[1] if split_modules(model) else []
    rename = lambda key: to_disk_key(key, renames)  # noqa: E731
    qnames = [rename(n) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not qnames:
        raise ValueError("model has no QuantLinear layers; call replace_with_quant_linears first")
    # the packed ends (quant/ends.py) are described by lm_head / dynamic, not by the block list
    end_modules = _ends(model)
    ends = {rename(n) for n, m in model.named_modules() if any(m is e for e in end_modules)}
    config, qcfg, tied = export_config(model, quant_config, [n for n in qnames if n not in ends],
                                       _block_linears(model, rename), rename)
    _check_g_idx(model, bool(qcfg.get("desc_act", False)) or is_awq(qcfg))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if tied and isinstance(out_emb, QuantLinear):
        # A quantized lm_head cannot be re-tied to the float embedding on load.
        config.tie_word_embeddings = False
        tied = False

    if float_dtype is not None:
        config.dtype = float_dtype
    state, dropped = _dedup_shared({rename(k): v.detach().cpu() for k, v in model.state_dict().items()}, tied)
    state = to_disk(cast_floats(state, float_dtype, qnames), qcfg, packed_formats(model, rename))
    if dropped:
        log.info("tied weights not written (re-tied on load): %s", dropped)

    with atomic_folder(out, replace=True) as tmp:
        shards = _shards(state, max_shard_size)
        meta = {"format": "pt"}  # transformers expects this safetensors metadata tag
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFE_NAME), metadata=meta)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        write_export_configs(tmp, model, config, qcfg)
    return out


def packed_formats(model: nn.Module, rename: Callable[[str], str] = lambda n: n) -> dict[str, str]:
    """On-disk name -> zero-point convention of every QuantLinear (what layout.to_disk converts)."""
    return {rename(n): m.checkpoint_format for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def export_config(model: nn.Module, quant_config: dict[str, Any], qnames: list[str],
                  present: dict[str, set[str]], rename: Callable[[str], str] = lambda n: n
                  ) -> tuple[Any, dict[str, Any], bool]:
    """(config.json's config with quantization_config, that quantization_config, tied embeddings)
    of a model whose on-disk quantized Linear names are qnames (`present`: each block's Linears)."""
    qcfg = copy.deepcopy(quant_config)
    if is_awq(qcfg):
        qcfg["modules_to_not_convert"] = float_matrices(model, rename, qnames)
    elif "modules_in_block_to_quantize" not in qcfg:
        qcfg["modules_in_block_to_quantize"] = _modules_in_block(qnames, present)
    config = copy.deepcopy(model.config)
    config.quantization_config = qcfg
    return config, qcfg, tied_embeddings(model)


def write_export_configs(folder: Path, model: nn.Module, config: Any, qcfg: dict[str, Any] | None) -> None:
    """config.json, quantize_config.json (GPTQ only: qcfg given) and generation_config.json."""
    config.save_pretrained(str(folder))
    if qcfg is not None:
        # sorted like config.json, so a resumed run (config read back) writes the same bytes
        (folder / QUANT_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(folder))


# ---------------------------------------------------------------------------- load
def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / SAFE_NAME
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no {SAFE_NAME} or {SAFE_INDEX} in {folder} (pickle checkpoints are not read)")


def load_quantized_model(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    cache_weight: bool = True,
) -> nn.Module:
    """Load a GPTQ folder into a runnable model with pure-torch QuantLinear layers.

    Needs only transformers + safetensors + accelerate. Float tensors are cast to dtype;
    GPTQ scales stay fp16 as stored (QuantLinear dequantizes in fp32). The model keeps
    config.quantization_config, so saving it again (a resumed run) writes the GPTQ layout.
    Every tensor is checked by engine.weights.check_load (missing, unexpected, shape, kind,
    non-finite: ShrinkError naming file and tensor).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    qcfg = _folder_quant_config(folder, config)
    # Build from a config WITHOUT quantization_config so transformers never routes through
    # its own GPTQ quantizer (which needs optimum + gptqmodel).
    if hasattr(config, "quantization_config"):
        del config.quantization_config

    files = _safetensors_files(folder)
    headers = read_headers(folder)
    keys = set(headers)

    # Parameters on meta (no allocation, no random init); buffers stay real so
    # non-persistent ones (e.g. rotary inv_freq) are computed as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    qnames, renames = _install_placeholders(model, qcfg, keys, dtype, cache_weight)

    qkeys = {f"{n}.{s}" for n in qnames for s in _QUANT_SUFFIXES}
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                k = to_memory_key(k, renames)
                if t.is_floating_point() and k not in qkeys:
                    t = t.to(dtype)
                state[k] = t
    state = from_disk(state, qcfg)  # an AWQ folder's Linears as the GPTQ tensors they hold
    for name in qnames:  # placeholder n_groups may differ (e.g. act-order files): trust the file
        m = model.get_submodule(name)
        if {f"{name}.scales", f"{name}.qzeros"} <= state.keys() and m.scales.shape != state[f"{name}.scales"].shape:
            m.scales = torch.empty_like(state[f"{name}.scales"], device="meta")
            m.qzeros = torch.empty_like(state[f"{name}.qzeros"], device="meta")
    placeholders = model.state_dict()
    mismatched = [(k, tuple(t.shape), tuple(placeholders[k].shape)) for k, t in state.items()
                  if k in placeholders and tuple(t.shape) != tuple(placeholders[k].shape)]
    result = model.load_state_dict({k: t for k, t in state.items() if k not in {m[0] for m in mismatched}},
                                   strict=False, assign=True)
    if tied_embeddings(model):
        model.tie_weights()
    skipped = {m[0] for m in mismatched}
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta and n not in skipped]
    check_load(folder, model, headers, still_meta, result.unexpected_keys, mismatched)
    model.config.quantization_config = qcfg
    return model.to(device).eval()


def _folder_quant_config(folder: Path, config: Any) -> dict[str, Any]:
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None and (folder / QUANT_CONFIG_NAME).exists():
        qcfg = json.loads((folder / QUANT_CONFIG_NAME).read_text())
    if qcfg is None:
        raise ValueError(f"{folder} has no quantization_config")
    return qcfg if isinstance(qcfg, dict) else qcfg.to_dict()


def _install_placeholders(model: nn.Module, qcfg: dict[str, Any], keys: set[str], dtype: torch.dtype,
                          cache_weight: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Swap every Linear whose packed tensors the files hold (`keys`) for a meta QuantLinear;
    (their in-memory names, the expert renames)."""
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    fmt = memory_format(qcfg)
    qnames = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
    # fused experts are read back as split ones: the per-expert keys map onto their Linears, under
    # the names the files use (another tool's export may use other names than the family's own)
    default, renames = disk_names(model)
    renames = renames if split_experts(model, stored_names(keys, "qweight", default)) else []
    qnames = [to_memory_key(n, renames) for n in qnames]
    for name in qnames:
        old = model.get_submodule(name)
        own = module_override(qcfg, name)  # gptqmodel's per-module `dynamic` settings (a packed embedding)
        kw = dict(bits=int(own.get("bits", bits)), group_size=int(own.get("group_size", group_size)),
                  device="meta", cache_weight=cache_weight, checkpoint_format=fmt)
        if isinstance(old, nn.Embedding):  # gptqmodel's layout: a Linear from vocab to dim
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, output_dtype=dtype, **kw)
        else:
            in_f, out_f = linear_dims(old)
            new = QuantLinear(in_f, out_f, bias=f"{name}.bias" in keys, bias_dtype=dtype, **kw)
        model.set_submodule(name, new)
    return qnames, renames


def module_override(qcfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The `dynamic` entry of quantization_config that matches module `name` ({} if none). As in
    gptqmodel: a key is an exact name or a regex, "+:" in front marks a positive match, "-:" a
    module left unquantized (no settings to take from it)."""
    for key, value in (qcfg.get("dynamic") or {}).items():
        if key.startswith("-:"):
            continue
        pattern = key[2:] if key.startswith("+:") else key
        if pattern == name or re.fullmatch(pattern, name):
            return dict(value)
    return {}


def quantized_skeleton(folder: Path, dtype: torch.dtype) -> Callable[[nn.Module], None]:
    """For engine.streaming.build_skeleton: swaps a GPTQ folder's packed Linears in (meta)."""
    from transformers import AutoConfig

    qcfg = _folder_quant_config(folder, AutoConfig.from_pretrained(str(folder)))
    keys = set(read_headers(folder))

    def replace(model: nn.Module) -> None:
        _install_placeholders(model, qcfg, keys, dtype)
        model.config.quantization_config = qcfg
    return replace


def quantization_config(quant: QuantConfig) -> dict[str, Any]:
    """The `quantization_config` of a model quantized with these settings, in the layout
    quant.export_format resolves to."""
    if export_format(quant) == "awq":
        return awq_quantization_config(quant.group_size, quant.method, quant.damp, quant.true_sequential)
    return gptq_quantization_config(bits=quant.bits, group_size=quant.group_size, sym=quant.sym,
                                    desc_act=quant.act_order and quant.method == "gptq",
                                    static_groups=quant.static_groups, true_sequential=quant.true_sequential,
                                    damp_percent=quant.damp)


def export_float_dtype(quant: QuantConfig) -> torch.dtype | None:
    """The dtype a GPTQ export writes its floating tensors in (quant.export_dtype)."""
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    return names[quant.export_dtype] if quant.export_dtype is not None else None


def round_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Round, in place, every floating parameter and persistent buffer outside the packed
    GPTQ tensors to dtype's precision (their storage dtype is kept): the model then holds
    exactly what save_gptq_model(float_dtype=dtype) writes, so the figures measured in memory
    are those of the exported checkpoint. Tied tensors are one storage, rounded once. A value
    that dtype cannot hold is refused (engine.weights.narrow), not turned into inf."""
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLinear):
            named = [("bias", module.bias)] if module.bias is not None else []
        else:
            named = list(module.named_parameters(recurse=False))
            named += [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
        for n, t in named:
            if t.is_floating_point() and t.dtype != dtype:
                with torch.no_grad():
                    t.copy_(narrow(t, dtype, f"{prefix}.{n}" if prefix else n, "quant.export_dtype", EXPORT_DTYPE_HINT))


def install_quantized(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]],
                      quant: QuantConfig) -> dict[str, Any]:
    """Swap the quantized Linears for QuantLinears and round the float tensors to
    quant.export_dtype; returns the export's quantization_config."""
    replace_with_quant_linears(model, packed, quant.bits, quant.group_size)
    dtype = export_float_dtype(quant)
    if dtype is not None:
        round_float_tensors(model, dtype)
    return quantization_config(quant)
