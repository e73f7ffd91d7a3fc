"""The teacher: eval mode, no gradients, in its own dtype and device; for large teachers a
device_map across GPUs or an 8/4-bit bitsandbytes load, and an offline cache of its
top-k logits so the logit term needs no teacher forward at training time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from distill.capture import QKVCapture, head_reproduces_logits
from distill.config import TeacherConfig
from distill.data import WindowSampler
from distill.distributed import DistContext
from engine.errors import ShrinkError
from engine.files import atomic_path
from engine.modeling import check_model_folder, load_checked, resolve_device, resolve_dtype
from engine.progress import Progress

log = logging.getLogger(__name__)


def prepare_teacher(model: PreTrainedModel, teacher: TeacherConfig, model_cfg: Any,
                    default_device: torch.device) -> tuple[PreTrainedModel, torch.device]:
    """The frozen teacher and the device its inputs go to.

    With device_map or 8/4-bit, the teacher is loaded again from model.path (accelerate
    places it; bitsandbytes quantizes while loading); otherwise the loaded model is moved.
    """
    dtype = resolve_dtype(teacher.dtype or model_cfg.dtype)
    if reloads_teacher(teacher):
        model = load_sharded_teacher(model_cfg, teacher, dtype, default_device)
        device = model.get_input_embeddings().weight.device
    else:
        device = resolve_device(teacher.device) if teacher.device else default_device
        model = model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, device


def reloads_teacher(teacher: TeacherConfig) -> bool:
    """device_map and 8/4-bit teachers are loaded again from model.path, not moved."""
    return bool(teacher.device_map or teacher.load_in_8bit or teacher.load_in_4bit)


def teacher_device_map(value: Optional[str]) -> Union[str, dict[str, Any], None]:
    """distill.teacher.device_map: a strategy accelerate knows ("auto", "balanced", ...) or a
    JSON file of module -> device, such as the device_map.json that `shrink plan` writes."""
    if not value or not str(value).endswith(".json"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ShrinkError(f"distill.teacher.device_map: {path} does not exist")
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShrinkError(f"distill.teacher.device_map: {path} is not valid JSON ({exc.msg}, line {exc.lineno})")
    if not isinstance(mapping, dict) or not mapping:
        raise ShrinkError(f"distill.teacher.device_map: {path} must map module names to devices")
    return mapping


def load_sharded_teacher(model_cfg: Any, teacher: TeacherConfig, dtype: torch.dtype,
                         default_device: torch.device) -> PreTrainedModel:
    if not torch.cuda.is_available():
        raise ShrinkError("distill.teacher: device_map and load_in_8bit/4bit need CUDA GPUs")
    # An 8/4-bit teacher without a device_map: "auto" spreads it over every visible GPU, except
    # under torchrun, where each rank keeps its own copy on its own GPU (otherwise every rank
    # would spread one over all GPUs, racing the others for memory)
    ranked = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    device_map = teacher_device_map(teacher.device_map) or ({"": default_device} if ranked else "auto")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "use_safetensors": True,
                              "trust_remote_code": model_cfg.trust_remote_code}
    if teacher.load_in_8bit or teacher.load_in_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ShrinkError("distill.teacher.load_in_8bit/4bit: needs the bitsandbytes package")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=teacher.load_in_8bit,
                                                           load_in_4bit=teacher.load_in_4bit,
                                                           bnb_4bit_compute_dtype=dtype)
    folder = check_model_folder(model_cfg.path)
    log.info("teacher: loading %s with %s", folder, {k: str(v) for k, v in kwargs.items()})
    # bitsandbytes stores integer weights where the files hold floats: only their kind differs
    return load_checked(folder, check_kinds=not (teacher.load_in_8bit or teacher.load_in_4bit), **kwargs)


class TopKCache:
    """Teacher top-k logits of samples 0..n-1 (the sampler's order), in shards on disk.

    Shard j holds samples [j * S, (j + 1) * S): values fp16 [S, T, k], indices int32.
    The folder name hashes the teacher's files, the token stream, seq_len, seed and k, so
    another teacher or corpus never reads a stale cache.
    """

    def __init__(self, folder: Path, k: int, shard: int = 256) -> None:
        self.folder, self.k, self.shard = folder, k, shard

    @staticmethod
    def folder_for(root: Path, teacher_path: str, dtype: str, stream: torch.Tensor, seq_len: int, seed: int,
                   k: int) -> Path:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                       for p in Path(teacher_path).expanduser().iterdir() if p.suffix in (".safetensors", ".json"))
        digest = hashlib.sha256(json.dumps([files, dtype, seq_len, seed, k]).encode())
        digest.update(stream.numpy().tobytes())
        return root / "distill-topk" / digest.hexdigest()[:32]

    def shard_path(self, j: int) -> Path:
        return self.folder / f"shard-{j:06d}.safetensors"

    @torch.no_grad()
    def build(self, teacher: PreTrainedModel, device: torch.device, sampler: WindowSampler, num_samples: int,
              batch_size: int, ctx: DistContext, chunk: Optional[int] = None) -> None:
        """Compute the missing shards (rank 0; the others wait); with `chunk`, the teacher's head
        runs `chunk` tokens at a time (top_logits)."""
        shards = range((num_samples + self.shard - 1) // self.shard)
        missing = [j for j in shards if not self.shard_path(j).is_file()]
        if ctx.main and missing:
            chunk = chunk if chunk and head_reproduces_logits(teacher, device) else None
            self.folder.mkdir(parents=True, exist_ok=True)
            progress = Progress("teacher top-k cache", len(missing) * self.shard, unit="tok")
            for j in missing:
                values, indices = [], []
                for start in range(j * self.shard, (j + 1) * self.shard, batch_size):
                    ids = sampler.samples(start, min(batch_size, (j + 1) * self.shard - start))
                    top_values, top_indices = top_logits(teacher, ids.to(device), self.k, chunk)
                    values.append(top_values.half().cpu())
                    indices.append(top_indices.int().cpu())
                    progress.update(ids.shape[0], ids.numel())
                with atomic_path(self.shard_path(j)) as tmp:
                    save_file({"values": torch.cat(values), "indices": torch.cat(indices)}, tmp)
        ctx.barrier()

    def get(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of samples start .. start + count - 1."""
        values, indices = [], []
        k = start
        while k < start + count:
            j, offset = divmod(k, self.shard)
            n = min(start + count - k, self.shard - offset)
            with safe_open(str(self.shard_path(j)), framework="pt") as f:
                values.append(f.get_slice("values")[offset:offset + n])
                indices.append(f.get_slice("indices")[offset:offset + n])
            k += n
        return torch.cat(values), torch.cat(indices)


def top_logits(teacher: PreTrainedModel, ids: torch.Tensor, k: int,
               chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits of each token and their ids, [B, T, k]. With `chunk` (for a
    teacher whose logits are its head's output), its head runs on `chunk` tokens at a time: the
    whole [B, T, V] logits (16 GiB for 8 x 4096 tokens of a 128k vocabulary) are never formed."""
    if chunk is None:
        top = teacher(input_ids=ids, use_cache=False).logits.float().topk(k, dim=-1)
        return top.values, top.indices
    with QKVCapture(teacher, [], final=True) as cap:
        teacher(input_ids=ids, use_cache=False, logits_to_keep=1)
        hidden = cap.pop_final()
    head = teacher.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    tops = [head(flat[r0:r0 + chunk]).float().topk(k, dim=-1) for r0 in range(0, flat.shape[0], chunk)]
    shape = (*ids.shape, k)
    return torch.cat([t.values for t in tops]).view(shape), torch.cat([t.indices for t in tops]).view(shape)


def teacher_vocab_check(teacher: PreTrainedModel, student: PreTrainedModel) -> Optional[int]:
    """The common vocabulary width when the embedding sizes differ (same tokenizer, padded rows)."""
    t_rows = teacher.get_output_embeddings().out_features  # also a packed (GPTQ) head's
    s_rows = student.get_output_embeddings().out_features
    return None if t_rows == s_rows else min(t_rows, s_rows)
