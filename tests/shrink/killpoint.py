"""Run the shrink CLI and signal it at a chosen point: a real kill, not a simulated error.

    python -m tests.shrink.killpoint MODULE:FUNCTION before|after KILL|INT [shrink overrides...]

The process sends itself SIGKILL (or SIGINT, as Ctrl-C does) when FUNCTION (looked up in
MODULE at call time, e.g. `shrink.pipeline:eval_stage`) is entered ("before") or has
returned ("after"), so the fault tests can stop a run right after a stage checkpoint or in
the middle of an export.
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any, Callable


def killing(original: Callable[..., Any], when: str, signum: int) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result
    return wrapper


def main() -> None:
    target, when, signame, *overrides = sys.argv[1:]
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    setattr(module, name, killing(getattr(module, name), when, getattr(signal, f"SIG{signame}")))
    sys.argv = ["shrink", *overrides]
    from shrink.cli import main as shrink_main

    shrink_main()


if __name__ == "__main__":
    main()
