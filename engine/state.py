"""The state of one run, handed from stage to stage: config, output folder, the model in
memory, and what a stage leaves for the next (the export config of a quantized model)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine import data as data_mod
from engine.config import EvalSet, eval_sets
from engine.distributed_calib import CalibComm
from engine.layer_checkpoint import LayerCheckpoint
from engine.modeling import resolve_device


@dataclass
class RunState:
    cfg: DictConfig
    out: Path
    model: Optional[PreTrainedModel] = None
    tokenizer: Optional[PreTrainedTokenizerBase] = None
    changed: bool = False
    # Set by the quantize stage: export then writes the GPTQ layout with this config.
    quantization_config: Optional[dict[str, Any]] = None
    # Set by the pipeline for a stage that compresses layer by layer: where each finished
    # decoder layer is checkpointed, so a killed run resumes inside the stage.
    layer_checkpoint: Optional[LayerCheckpoint] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    # Under torchrun with every rank compressing: calibration and evaluation split over the ranks.
    comm: Optional[CalibComm] = None
    # model.lazy: `model` is a skeleton on the meta device whose tensors this
    # engine.streaming.LazyModel reads from the shards, one decoder layer at a time.
    lazy: Optional[Any] = None
    _calib: Optional[torch.Tensor] = None
    _text_lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.model.device)

    def calibration(self) -> torch.Tensor:
        """Calibration windows [num_samples, seq_len], sampled once per run."""
        if self._calib is None:
            calib = self.cfg.data.calib
            stream = data_mod.token_stream(calib.path, self.tokenizer, self.cfg.data.text_field,
                                           self.cfg.data.cache_dir, key="data.calib.path")
            self._calib = data_mod.calibration_windows(stream, calib.num_samples, calib.seq_len, self.cfg.seed)
        return self._calib

    def eval_sets(self) -> list[EvalSet]:
        return eval_sets(self.cfg.data.eval)

    def eval_windows(self, eval_set: Optional[EvalSet] = None) -> tuple[torch.Tensor, int]:
        """Windows [n, seq_len] of one eval set (the first by default) and the file's total count."""
        eval_set = eval_set or self.eval_sets()[0]
        stream = data_mod.token_stream(eval_set.path, self.tokenizer, self.cfg.data.text_field,
                                       self.cfg.data.cache_dir, key=f"{eval_set.key}.path")
        return (data_mod.eval_windows(stream, eval_set.seq_len, eval_set.max_windows, key=eval_set.key),
                data_mod.window_count(stream, eval_set.seq_len, key=eval_set.key))

    def text_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """UTF-8 bytes and characters per token id of the run's tokenizer (bits per byte)."""
        if self._text_lengths is None:
            self._text_lengths = data_mod.token_text_lengths(self.tokenizer)
        return self._text_lengths
