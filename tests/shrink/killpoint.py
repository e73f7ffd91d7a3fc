"""Run the shrink CLI and signal it at a chosen point: a real kill, not a simulated error.

    python -m tests.shrink.killpoint MODULE:NAME before|after[:N] KILL|INT [shrink overrides...]

The process sends itself SIGKILL (or SIGINT, as Ctrl-C does) when NAME (a function or a
Class.method, looked up in MODULE at call time, e.g. `shrink.pipeline:eval_stage` or
`engine.layer_checkpoint:LayerCheckpoint.save`) is entered ("before") or has returned
("after") for the N-th time (the first by default), so the fault tests can stop a run right
after a stage checkpoint, after the checkpoint of decoder layer N, or in the middle of a write.
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]


def killing(original: Callable[..., Any], when: str, signum: int) -> Callable[..., Any]:
    moment, _, nth = when.partition(":")
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        due = calls == int(nth or 1)
        if due and moment == "before":
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        if due and moment == "after":
            os.kill(os.getpid(), signum)
        return result
    return wrapper


def main() -> None:
    target, when, signame, *overrides = sys.argv[1:]
    module_name, name = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, attr = name.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, attr, killing(getattr(owner, attr), when, getattr(signal, f"SIG{signame}")))
    sys.argv = ["shrink", *overrides]
    from shrink.cli import main as shrink_main

    shrink_main()


def shrink_process(*args: str, kill: tuple[str, str, str] | None = None) -> subprocess.CompletedProcess:
    """`shrink ARGS` in a fresh process; with kill=(MODULE:NAME, before|after[:N], KILL|INT)
    the process signals itself at that point."""
    prefix = ["-m", "tests.shrink.killpoint", *kill] if kill else ["-m", "shrink.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child gets Ctrl-C's default, as in a terminal.
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    main()
