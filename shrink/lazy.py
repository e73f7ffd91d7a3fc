"""The pipeline's side of `model.lazy` (engine/streaming.py): open a model as a skeleton plus its
shards, say which pipelines stream, and turn a stage's streamed output into out/model.

Streamed pipelines: prune, quantize, eval and export in any order (a compressing stage writes
its folder layer by layer and the next stage reads from it; eval runs layer by layer over
all windows). Distill and pretrain, which train the whole model, are refused with model.lazy
on; streamed runs keep no stage-boundary checkpoints (resume starts them over).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from engine.errors import ShrinkError
from engine.metrics import decoder_weight_matrices
from engine.modeling import check_vocab, folder_size_bytes, is_quantized_folder, load_tokenizer, resolve_dtype
from engine.streaming import LazyModel, build_skeleton, resolve_lazy, zero_fraction_lazy
from quant.config import packs_ends
from quant.layout import checkpoint_reader

log = logging.getLogger(__name__)

LAZY_STAGES = ("prune", "quantize", "eval", "export")


def lazy_wanted(cfg: DictConfig, folder: Path, stages: list[str]) -> bool:
    """model.lazy resolved for this run; ShrinkError where the pipeline cannot stream."""
    if not resolve_lazy(cfg.model.get("lazy", "auto"), folder_size_bytes(folder)):
        return False
    unsupported = [s for s in stages if s not in LAZY_STAGES]
    if unsupported:
        raise ShrinkError(f"model.lazy: the {unsupported[0]} stage does not stream layers from the shards yet "
                          f"(streamed stages: {', '.join(LAZY_STAGES)}); set model.lazy=false to load the model whole")
    if cfg.eval.tasks or cfg.eval.sparse_kernels:
        raise ShrinkError("model.lazy: eval.tasks and eval.sparse_kernels need the whole model in memory; "
                          "set model.lazy=false")
    if cfg.export.get("gguf"):
        raise ShrinkError("model.lazy: export.gguf converts the whole model in memory; set model.lazy=false, "
                          "or run `shrink export-gguf OUT/model OUT.gguf` on the export afterwards")
    if "quantize" in stages and packs_ends(cfg.quant):
        raise ShrinkError("model.lazy: quant.lm_head / quant.embed_bits need the whole model in memory; "
                          "set model.lazy=false")
    if is_quantized_folder(folder) and "quantize" in stages:
        raise ShrinkError(f"model.lazy: {folder} is already quantized")
    return True


def open_lazy(cfg: DictConfig, folder: Path) -> tuple[Any, Any, LazyModel]:
    """(skeleton model, tokenizer, LazyModel) of a dense or GPTQ folder, every tensor's presence,
    shape and kind checked against its config before anything is read or written."""
    dtype = resolve_dtype(cfg.model.dtype)
    replace = None
    if is_quantized_folder(folder):
        from quant.export import quantized_skeleton

        replace = quantized_skeleton(folder, dtype)
    lazy = build_skeleton(folder, dtype, cfg.model.trust_remote_code, replace, reader=checkpoint_reader)
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    check_vocab(lazy.model, tokenizer, folder)
    log.info("model.lazy: %s opened as a skeleton; %d decoder layers stream from %s", type(lazy.model).__name__,
             len(lazy.layers), folder)
    return lazy.model, tokenizer, lazy


def export_lazy(state: Any, target: Path, card: str) -> None:
    """out/model from the folder the last streamed stage wrote (moved, not copied), or from the
    input's shards when no stage changed the model (copied)."""
    lazy: LazyModel = state.lazy
    if lazy.written is None:
        raise ShrinkError("model.lazy: nothing was written to export (no stage changed the model)")
    state.tokenizer.save_pretrained(lazy.written)
    (lazy.written / "README.md").write_text(card)
    lazy.written.rename(target)
    lazy.use(target)


def lazy_sparsity(state: Any) -> float:
    return zero_fraction_lazy(state.lazy, lambda layer: decoder_weight_matrices_of_layer(layer))


def decoder_weight_matrices_of_layer(layer: Any) -> dict[str, Any]:
    from torch import nn

    holder = nn.Module()
    holder.layers = nn.ModuleList([layer])
    return decoder_weight_matrices(holder)


def discard(state: Any) -> None:
    """A streamed stage's written folder that no export took (a failed run, or no export stage)."""
    lazy: Optional[LazyModel] = state.lazy
    if lazy is not None and lazy.written is not None and lazy.written.name.startswith(".tmp-"):
        shutil.rmtree(lazy.written, ignore_errors=True)
