"""Multi-process runs: `torchrun --nproc_per_node N -m shrink OVERRIDES`.

OVERRIDES are those of the `shrink` command (out= is required). Rank 0 runs the whole
pipeline exactly as `shrink` would and writes every artifact. In a pipeline of compression
stages (quantize, prune, eval, export: no distill/pretrain) every rank runs the same stages
on the same model: calibration windows and eval windows are split over the ranks, each
Linear is compressed by one owner rank and shared (engine/distributed_calib.py). Otherwise
the other ranks wait for rank 0 to reach a distill/pretrain stage, join its training (the
student sharded with FSDP2 across all ranks), and exit when rank 0's pipeline is over, while
any compression runs on rank 0 alone. The backend is NCCL on GPUs (one per rank, LOCAL_RANK)
and gloo on CPUs. SHRINK_DIST_TIMEOUT (seconds, default 1800) bounds how long a rank waits for
the others inside calibration and evaluation before it stops with an error.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from distill.distributed import DONE, receive, send
from engine.distributed_calib import DEFAULT_TIMEOUT, CalibComm
from engine.errors import ShrinkError
from quant.config import packs_ends
from shrink.cli import Terminated, on_sigterm_raise, stopped
from shrink.config import compose, quiet_import_noise

log = logging.getLogger("shrink")


def worker(cfg: Any, out: Path) -> None:
    """Join every training rank 0 announces, until it says DONE."""
    from distill.stage import run_training
    from engine.state import RunState
    from shrink.pipeline import load_model

    while (stage := receive()) != DONE:
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_model(cfg.model)
        state = RunState(cfg=cfg, out=out, model=model, tokenizer=tokenizer)
        run_training(state, pretrain=stage == "pretrain")


def init_backend() -> None:
    """NCCL for CUDA tensors with each rank on its own GPU (LOCAL_RANK), gloo for CPU tensors
    (object collectives, and training with model.device=cpu on a GPU machine)."""
    timeout = timedelta(hours=6)
    if not torch.cuda.is_available():
        dist.init_process_group("gloo", timeout=timeout)
        return
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    # FSDP2 puts shards on the *current* device: without this every rank would use GPU 0
    torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=local)


def compresses_together(cfg: Any) -> bool:
    """Every rank runs the pipeline (no training stage, whose ranks follow rank 0's lead)."""
    return not {"distill", "pretrain"} & set(cfg.pipeline.stages)


def calib_timeout() -> timedelta:
    value = os.environ.get("SHRINK_DIST_TIMEOUT")
    try:
        return timedelta(seconds=float(value)) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise ShrinkError(f"SHRINK_DIST_TIMEOUT: {value!r} is not a number of seconds") from None


def main(argv: Optional[list[str]] = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    quiet_import_noise()
    init_backend()
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    status = 0
    comm = None
    on_sigterm_raise()  # torchrun stops the other ranks with SIGTERM when one dies
    try:
        comm = CalibComm.create(calib_timeout())  # every rank, before any other group is made
        cfg = compose(overrides)
        if not cfg.out:
            raise ShrinkError("out: a torchrun job needs out=FOLDER")
        together = compresses_together(cfg)
        if together and "quantize" in cfg.pipeline.stages and packs_ends(cfg.quant):
            raise ShrinkError("quant.lm_head / quant.embed_bits: not under torchrun yet; run in one process")
        if together and "quantize" in cfg.pipeline.stages and cfg.quant.refine_steps:
            raise ShrinkError("quant.refine_steps: the block refinement runs in one process, not under torchrun")
        if rank == 0:
            from shrink.pipeline import run_pipeline

            # On an error rank 0 exits without DONE: torchrun then stops the workers, which
            # may be inside a collective of the training.
            metrics = run_pipeline(cfg, Path(cfg.out), comm if together else None)
            if not together:
                send(DONE)
            for name, ppl in metrics.get("ppl", {}).items():
                print(f"ppl[{name}] = {ppl:.3f}")
            print(f"out: {cfg.out}")
        elif together:
            from shrink.pipeline import follow_pipeline

            follow_pipeline(cfg, Path(cfg.out), comm)
        else:
            worker(cfg, Path(cfg.out))
    except ShrinkError as exc:
        print(f"shrink: error: {exc}", file=sys.stderr)
        status = 2
    except Terminated as exc:  # the README's line: which rank stopped, found among the peers
        dead = comm.dead_peers() if comm is not None else []
        line = (f"torchrun: {', '.join(f'rank {r}' for r in dead)} stopped; rank {rank} stops too "
                f"(torchrun ended it with SIGTERM)" if dead else stopped(exc))
        print(f"shrink: error: {line}", file=sys.stderr)
        status = 2
    if status == 0:
        # every rank past its last collective before any tears the group down: a rank that
        # destroys while its peer is still inside the DONE broadcast can abort at exit (gloo)
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(status)


if __name__ == "__main__":
    main()
