"""Distillation at a real teacher's context length: peak RSS and tokens/s of `shrink
pipeline=distill` against seq_len, for the naive kernels (the whole [T, T] relations and
[T, V] logits) and the blockwise ones (distill/blockwise.py, distill/chunked.py).

Teacher: a synthetic Llama written by this script (hidden 1024, 8 layers, 16 heads / 4 KV heads,
MLP 3584, max positions 8192, random weights, tied embeddings, the shared docs-en tokenizer),
in a vocabulary of 8192 (the tokenizer's) and of 128,256 (Llama 3's, for the logit term).
Student: the 4-layer skip student (teacher layers 0, 2, 5, 7), batch 1, relation_heads 16,
transfer set docs-en valid. Each arm is one `shrink` process: its peak RSS is the process's
(wait4), its tokens/s are from the steps after the first (warm-up). The naive kernels run only
where they fit (estimated below). The AKT + logit KD against logit KD ratio at T = 1024 is
measured on arms interleaved in this one run (REPEATS of each, alternating), with the load
average at the start and end of every arm.

    python -m benchmarks.distill_memory           # every arm not yet in the JSON (resumable)
    python -m benchmarks.distill_memory --table   # the Markdown table of the JSON
Writes benchmarks/results/distill_memory.json; teachers go to --models (default ~/.cache/shrink/distill_memory).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import RESULTS, ROOT, SHARED, Results
from benchmarks.markdown import footer, md

TOKENIZER = SHARED / "models" / "tokenizer-docs-en"
TEACHER = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
               intermediate_size=3584, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
               rms_norm_eps=1e-5)
VOCABS = {"8k": 8192, "128k": 128256}
SEQ_LENS = (512, 1024, 2048, 4096)
LOSSES = {"lm": "LM only", "logits": "logit KD", "akt": "AKT + logit KD"}
# the naive kernels' largest seq_len per (vocab, loss): beyond, their [T, T] relations (16 heads,
# Q/K/V of 4 layer pairs, several copies kept for backward: about 7.5 GiB at T = 2048) or [T, V]
# logits (a dozen 1 GiB copies at T = 2048, V = 128k) outgrow what this shared 24 GiB machine has free
NAIVE_MAX = {("8k", "lm"): 4096, ("8k", "logits"): 4096, ("8k", "akt"): 2048, ("128k", "lm"): 1024,
             ("128k", "logits"): 1024}
ARMS_128K = ("lm", "logits")  # the 128k vocabulary is for the head terms
RATIO_T, REPEATS = 1024, 3
RATIO_PAIRS = 8  # adjacent AKT + logit KD / logit KD step pairs of the in-process interleaved ratio
STEPS = {512: 4, 1024: 3, 2048: 3, 4096: 2}  # the first step is warm-up


def write_teacher(folder: Path, vocab: int, seed: int = 0) -> None:
    """The synthetic teacher: random weights (std 0.02, norms 1) saved as safetensors with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "tokenizer_config.json").is_file():  # written last: the folder is whole
        return
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=0, **TEACHER)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)


def overrides(teacher: Path, seq_len: int, loss: str, kernels: str, steps: int) -> list[str]:
    return ["pipeline=distill", "pipeline.stages=[distill]", "model=local", f"model.path={teacher}",
            "model.dtype=float32", "model.device=cpu", "data=docs_en", "eval.baseline=false",
            f"distill.train_path={SHARED}/data/docs-en/valid.jsonl.gz", "distill.student.init=skip",
            "distill.student.num_layers=4", f"distill.loss={loss}", f"distill.seq_len={seq_len}",
            "distill.batch_size=1", "distill.relation_heads=16", f"distill.steps={steps}", "distill.warmup=1",
            "distill.checkpoint_every=0", "distill.log_every=1", f"distill.kernels={kernels}"]


def run_arm(teacher: Path, seq_len: int, loss: str, kernels: str, threads: int) -> dict[str, Any]:
    """One `shrink` process: peak RSS (wait4), step times from metrics.json, load averages."""
    steps = STEPS[seq_len]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "shrink.cli", *overrides(teacher, seq_len, loss, kernels, steps), f"out={out}"]
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        err = proc.stderr.read()
        proc.stderr.close()
        seconds = time.time() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"arm {seq_len} {loss} {kernels} failed:\n{err[-3000:]}")
        report = json.loads((out / "metrics.json").read_text())["stages"]["distill"]
    timed = report["step_seconds"][1:]
    step = statistics.median(timed)
    return {"peak_rss_gib": usage.ru_maxrss * 1024 / 2**30, "step_seconds": report["step_seconds"],
            "seconds_per_step": step, "tokens_per_s": seq_len / step, "process_seconds": seconds,
            "final": report["final"], "load_start": list(load_start), "load_end": list(os.getloadavg())}


def interleaved_ratio(teacher_folder: Path, seq_len: int, pairs: int) -> dict[str, Any]:
    """AKT + logit KD against logit KD alone in one process, step by step: one trainer on the
    skip student alternates the two objectives (A B, B A, ... so a drift in the machine's load
    falls on both), and the ratio of each adjacent pair of steps is taken. On a machine shared
    with other jobs, whose load swings within a minute, this is far steadier than whole runs."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from distill.config import DistillConfig
    from distill.data import WindowSampler
    from distill.layer_map import parse_layer_map
    from distill.plan import Objective, make_train_plan
    from distill.student import skip_student
    from distill.trainer import Trainer, make_optimizer
    from engine import data as data_mod
    from engine.modeling import load_tokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32).eval().requires_grad_(False)
    student = skip_student(teacher, [0, 2, 5, 7])
    distill = OmegaConf.merge(OmegaConf.structured(DistillConfig),
                              {"loss": "akt", "seq_len": seq_len, "batch_size": 1, "relation_heads": 16})
    plan = make_train_plan(distill, parse_layer_map("uniform", 4, 8), student)
    stream = data_mod.token_stream(SHARED / "data" / "docs-en" / "valid.jsonl.gz", load_tokenizer(teacher_folder))
    cpu = torch.device("cpu")
    trainer = Trainer(student, teacher, cpu, WindowSampler(stream, seq_len, 0), plan, distill, cpu)
    objectives = {"akt": plan.phases[0].objective, "logits": Objective(logit=plan.phases[0].objective.logit)}
    optimizer = make_optimizer(student, distill)
    seconds: dict[str, list[float]] = {"akt": [], "logits": []}
    load_start = os.getloadavg()
    student.train()
    with trainer.captures() as (s_cap, t_cap):
        order = ["logits", "akt"] + [name for i in range(pairs) for name in (("akt", "logits") if i % 2 else
                                                                              ("logits", "akt"))]
        for step, name in enumerate(order):
            began = time.perf_counter()
            trainer.step(step, objectives[name], optimizer, distill.lr, s_cap, t_cap)
            seconds[name].append(time.perf_counter() - began)
    ratios = [a / k for a, k in zip(seconds["akt"][1:], seconds["logits"][1:])]  # the first of each: warm-up
    return {"step_seconds_akt": seconds["akt"], "step_seconds_logits": seconds["logits"], "ratios": ratios,
            "ratio": statistics.median(ratios), "threads": torch.get_num_threads(), "load_start": list(load_start),
            "load_end": list(os.getloadavg())}


def arms() -> list[dict[str, Any]]:
    """Every arm in run order: the interleaved ratio arms first, then by vocabulary and seq_len."""
    plan = []
    for repeat in range(REPEATS):
        for loss in ("logits", "akt"):
            plan.append({"vocab": "8k", "seq_len": RATIO_T, "loss": loss, "kernels": "blockwise", "repeat": repeat})
    for vocab in VOCABS:
        for seq_len in SEQ_LENS:
            for loss in (LOSSES if vocab == "8k" else ARMS_128K):
                for kernels in ("blockwise", "naive"):
                    if kernels == "naive" and seq_len > NAIVE_MAX[(vocab, loss)]:
                        continue
                    arm = {"vocab": vocab, "seq_len": seq_len, "loss": loss, "kernels": kernels, "repeat": 0}
                    if arm not in plan:
                        plan.append(arm)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the results JSON")
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache" / "shrink" / "distill_memory",
                        help="where the synthetic teachers are written (once)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each arm's process")
    parser.add_argument("--only", default=None, help="run only arms of this vocab:seq_len:loss:kernels pattern "
                        "(fields may be *), e.g. 8k:4096:akt:*")
    args = parser.parse_args()
    if args.table:
        print(render_table(json.loads((RESULTS / "distill_memory.json").read_text())))
        return
    config = {"teacher": TEACHER, "vocabs": VOCABS, "student": "skip, 4 layers (teacher layers 0, 2, 5, 7)",
              "batch_size": 1, "relation_heads": 16, "steps": STEPS, "threads": args.threads,
              "train": "docs-en valid", "ratio_seq_len": RATIO_T, "repeats": REPEATS}
    results = Results("distill_memory", config, key=("vocab", "seq_len", "loss", "kernels", "repeat"))
    for arm in arms():
        if results.has(**arm) or not selected(arm, args.only):
            continue
        teacher = args.models / f"teacher-{arm['vocab']}"
        write_teacher(teacher, VOCABS[arm["vocab"]])
        print(f"arm {arm}", flush=True)
        results.add({**arm, **run_arm(teacher, arm["seq_len"], arm["loss"], arm["kernels"], args.threads)})
    ratio_arm = {"vocab": "8k", "seq_len": RATIO_T, "loss": "interleaved", "kernels": "blockwise", "repeat": 0}
    if not results.has(**ratio_arm) and selected(ratio_arm, args.only):
        import torch

        torch.set_num_threads(args.threads)
        write_teacher(args.models / "teacher-8k", VOCABS["8k"])
        print(f"arm {ratio_arm}", flush=True)
        results.add({**ratio_arm, **interleaved_ratio(args.models / "teacher-8k", RATIO_T, RATIO_PAIRS)})
    print(results.save())


def selected(arm: dict[str, Any], pattern: Optional[str]) -> bool:
    if not pattern:
        return True
    fields = [str(arm[k]) for k in ("vocab", "seq_len", "loss", "kernels")]
    return all(p in ("*", f) for p, f in zip(pattern.split(":"), fields))


def noisy(rows: list[dict[str, Any]]) -> bool:
    return any(max(r["load_start"][0], r["load_end"][0]) > 2.5 for r in rows)


def render_table(p: dict[str, Any]) -> str:
    rows = p["rows"]
    by = {(r["vocab"], r["seq_len"], r["loss"], r["kernels"]): r for r in rows if r["repeat"] == 0}
    body = []
    for vocab in VOCABS:
        for loss in (LOSSES if vocab == "8k" else ARMS_128K):
            for seq_len in SEQ_LENS:
                naive, new = by.get((vocab, seq_len, loss, "naive")), by.get((vocab, seq_len, loss, "blockwise"))
                if not (naive or new):
                    continue
                load = " / ".join(f"{max(r['load_start'][0], r['load_end'][0]):.1f}" if r else "-" for r in (naive, new))
                body.append([f"{vocab} vocabulary", LOSSES[loss], seq_len,
                             naive and f"{naive['peak_rss_gib']:.2f}", new and f"{new['peak_rss_gib']:.2f}",
                             naive and f"{naive['tokens_per_s']:.0f}", new and f"{new['tokens_per_s']:.0f}", load])
    text = md(["teacher", "loss", "seq_len", "naive peak RSS GiB", "blockwise peak RSS GiB", "naive tokens/s",
               "blockwise tokens/s", "load average (naive / blockwise)"], body)
    short, long = by.get(("8k", 1024, "akt", "blockwise")), by.get(("8k", 4096, "akt", "blockwise"))
    if short and long:
        text += (f"\n\nAKT + logit KD with the blockwise kernels, 8k vocabulary: peak RSS "
                 f"{long['peak_rss_gib']:.2f} GiB at T = 4096 against {short['peak_rss_gib']:.2f} GiB at T = 1024, "
                 f"{long['peak_rss_gib'] - short['peak_rss_gib']:+.2f} GiB.")
    inter = next((r for r in rows if r["loss"] == "interleaved"), None)
    if inter:
        text += (f"\n\n**AKT + logit KD costs {inter['ratio']:.2f}x logit KD alone per token** at T = {RATIO_T} "
                 f"(blockwise kernels): the median over {len(inter['ratios'])} adjacent pairs of steps of one process "
                 f"that alternates the two losses on the skip student (pairs from {min(inter['ratios']):.2f}x to "
                 f"{max(inter['ratios']):.2f}x; median step {statistics.median(inter['step_seconds_akt'][1:]):.2f} s "
                 f"against {statistics.median(inter['step_seconds_logits'][1:]):.2f} s, {inter['threads']} threads, "
                 f"load average {inter['load_start'][0]:.1f} to {inter['load_end'][0]:.1f}"
                 f"{' (noisy)' if noisy([inter]) else ''}).")
    ratio = [r for r in rows if r["vocab"] == "8k" and r["seq_len"] == RATIO_T and r["kernels"] == "blockwise"
             and r["loss"] in ("logits", "akt")]
    # every timed step (after each run's first) of the interleaved runs, pooled per loss
    kd = [t for r in ratio if r["loss"] == "logits" for t in r["step_seconds"][1:]]
    akt = [t for r in ratio if r["loss"] == "akt" for t in r["step_seconds"][1:]]
    if kd and akt:
        loads = [x for r in ratio for x in (r["load_start"][0], r["load_end"][0])]
        runs = sum(r["loss"] == "akt" for r in ratio), sum(r["loss"] == "logits" for r in ratio)
        text += (f"\n\nThe same from whole runs (`shrink` processes, {runs[0]} and {runs[1]} interleaved, their "
                 f"{len(akt)} and {len(kd)} timed steps pooled): median seconds per "
                 f"step {statistics.median(akt):.2f} against {statistics.median(kd):.2f}, "
                 f"**{statistics.median(akt) / statistics.median(kd):.2f}x** per token (fastest steps: "
                 f"{min(akt):.2f} against {min(kd):.2f}, {min(akt) / min(kd):.2f}x); load average {min(loads):.1f} to "
                 f"{max(loads):.1f}{' (noisy)' if noisy(ratio) else ''}.")
    return text + footer(p)


if __name__ == "__main__":
    main()
