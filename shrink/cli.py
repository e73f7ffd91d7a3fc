"""The `shrink` console script: a Hydra app, plus a few plain subcommands.

`shrink [overrides]` composes conf/config.yaml and runs the pipeline; `shrink
import-gguf ...` (and later report/publish/plan) are argparse subcommands dispatched
before Hydra sees argv, since Hydra has no notion of subcommands.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import ShrinkError, user_error
from shrink.config import CONF_DIR, compose, quiet_import_noise, register_configs, register_resolvers

log = logging.getLogger("shrink")


def hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    register_configs()
    register_resolvers()

    # An absolute path: Hydra would otherwise read "../conf" as a Python module path.
    conf_dir = str(CONF_DIR)
    try:
        check_jobs(sys.argv[1:], conf_dir)
    except Exception as exc:
        fail_or_raise(exc)
    sys.argv[1:] = hydra_dirs(sys.argv[1:])

    failed: list[str] = []  # points of a -m sweep that failed: the others still run

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="config")
    def _run(cfg: DictConfig) -> None:
        from hydra.types import RunMode

        from shrink.pipeline import run_pipeline

        logging.getLogger().setLevel(cfg.log_level)
        out = Path(cfg.out) if cfg.out else Path(HydraConfig.get().runtime.output_dir)
        try:
            metrics = run_pipeline(cfg, out)
        except KeyboardInterrupt as exc:
            kept = f"; {out} keeps the finished stages (rerun with resume=true)" if (out / "progress.json").is_file() else ""
            fail(f"{stopped(exc)}{kept}")
        except Exception as exc:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                fail_or_raise(exc)
            message = user_error(exc)
            if message is None:
                raise
            failed.append(f"{HydraConfig.get().job.num}: {message}")
            record_failure(out, message)
            log.error("sweep point %s failed (the others go on): %s", out, message)
            return
        for name, ppl in metrics.get("ppl", {}).items():
            base = metrics.get("baseline_ppl", {}).get(name)
            bpb = metrics.get("bits_per_byte", {}).get(name)
            print(f"ppl[{name}] = {ppl:.3f}" + (f" (baseline {base:.3f})" if base is not None else "")
                  + (f", {bpb:.4f} bits/byte" if bpb is not None else ""))
        for name, figures in (metrics.get("tasks") or {}).items():
            before = (metrics.get("baseline_tasks") or {}).get(name, {})
            for key in [k for k in ("acc", "acc_norm") if k in figures]:
                was = f" (baseline {before[key]:.3f})" if key in before else ""
                print(f"{key}[{name}] = {figures[key]:.3f} ± {figures.get(key + '_stderr', 0.0):.3f}{was}")
        print(f"out: {out}")

    _run()
    if failed:
        fail(f"sweep: {len(failed)} point{'s' if len(failed) > 1 else ''} failed ({'; '.join(failed)}); "
             f"each folder holds failed.json, and `shrink report` lists them")


def record_failure(out: Path, message: str) -> None:
    """failed.json in a sweep point's folder (Hydra's own, made for this point), for `shrink report`."""
    from engine.files import atomic_write_json
    from shrink.resume import FAILED

    try:
        atomic_write_json(out / FAILED, {"error": message})
    except OSError as exc:  # the failure itself may be a full disk: the console line still says it
        log.warning("could not write %s: %s", out / FAILED, exc)


def fail(message: str) -> NoReturn:
    """The one way the CLI reports a bad input: one line on stderr, exit status 2."""
    print(f"shrink: error: {' '.join(message.split()) or 'failed'}", file=sys.stderr)
    sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, torchrun stopping the other ranks), raised in the main
    thread so that it ends a run as Ctrl-C does: out keeps what is resumable, and one line."""


def on_sigterm_raise() -> Any:
    """Handle SIGTERM by raising Terminated; returns the handler it replaced."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()
    return signal.signal(signal.SIGTERM, handler)


def stopped(exc: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def fail_or_raise(exc: Exception) -> NoReturn:
    """fail() with the user's one line (engine.errors.user_error); a bug is raised again."""
    message = user_error(exc)
    if message is None:
        raise exc
    fail(message)


def hydra_dirs(argv: list[str]) -> list[str]:
    """With out= given, Hydra's own run folder (outputs/DATE/TIME with .hydra/ and a log file)
    is not made: the run's record is out/recipe.yaml, and logging goes to the console."""
    plain = [a.lstrip("+~") for a in argv]
    given_out = any(a.startswith("out=") and a not in ("out=", "out=null") for a in plain)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    own = any(a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=")) for a in plain)
    if not given_out or multirun or own:
        return argv
    return argv + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def check_jobs(argv: list[str], conf_dir: str) -> None:
    """Compose and check every job Hydra is about to run (each of a -m sweep) before Hydra
    creates any folder: a value of the wrong type or an unknown method in the last value
    of a sweep must neither cost the runs before it nor leave a sweep folder behind.
    Composition is Hydra's own (its parser, sweep expansion and compose API)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from shrink.config import hydra_error_message
    from shrink.pipeline import check_config

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        return  # Hydra only prints something
    primary = str(Path(args.config_path).resolve()) if args.config_path else conf_dir
    extra = []
    if args.config_dir:  # searched first, as Hydra does (e.g. a run folder holding recipe.yaml)
        primary, extra = str(Path(args.config_dir).resolve()), [f"hydra.searchpath=[file://{primary}]"]
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        jobs = ([job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
                if args.multirun else [list(args.overrides)])
    except HydraException as exc:
        raise ShrinkError(hydra_error_message(exc)) from None
    for cfg in compose(extra, primary, args.config_name or "config", jobs=jobs):
        check_config(cfg)


def import_gguf_command(argv: list[str]) -> None:
    from engine.gguf_import import import_gguf
    from engine.modeling import resolve_dtype

    parser = argparse.ArgumentParser(prog="shrink import-gguf",
                                     description="Convert a GGUF causal LM into a safetensors HF folder.")
    parser.add_argument("gguf", help="path to a .gguf file, or pkg:<package>/<file>")
    parser.add_argument("out", help="folder to write (reused if it exists)")
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args(argv)
    print(import_gguf(args.gguf, args.out, resolve_dtype(args.dtype)))


def export_gguf_command(argv: list[str]) -> None:
    from engine.modeling import check_model_folder
    from quant.gguf_export import write_gguf

    parser = argparse.ArgumentParser(prog="shrink export-gguf",
                                     description="Write a quantized export (a run's model/) as one GGUF file for "
                                                 "llama.cpp / Ollama: 4-bit groups as Q4_0 (symmetric) or Q4_1, "
                                                 "symmetric 8-bit as Q8_0, everything else f16/f32.")
    parser.add_argument("model_dir", type=Path, help="a quantized model folder written by shrink")
    parser.add_argument("out", type=Path, help="the .gguf file to write (must not exist)")
    parser.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                        help="llama.cpp's name of the pre-tokenizer (default: detected; 'default' if unknown)")
    args = parser.parse_args(argv)
    print(write_gguf(check_model_folder(args.model_dir, "export-gguf"), args.out, args.tokenizer_pre))


def report_command(argv: list[str]) -> None:
    from shrink.report import write_report

    parser = argparse.ArgumentParser(prog="shrink report",
                                     description="Gather every run (metrics.json + recipe.yaml) under DIRs into "
                                                 "report.md, report.csv and report.png.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="sweep or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the report (default: the first DIR)")
    args = parser.parse_args(argv)
    out = write_report(args.dirs, args.out)
    print(f"report: {out / 'report.md'} {out / 'report.csv'} {out / 'report.png'}")


def publish_command(argv: list[str]) -> None:
    from shrink.publish import publish

    parser = argparse.ArgumentParser(prog="shrink publish",
                                     description="Validate an exported model folder and upload it to the Hugging Face Hub.")
    parser.add_argument("dir", type=Path, help="the exported model folder (a run's model/)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the files; no network access")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    args = parser.parse_args(argv)
    publish(args.dir, args.repo_id, dry_run=args.dry_run, private=args.private, token=args.token)


def plan_command(argv: list[str]) -> None:
    from shrink.plan import run_plan

    parser = argparse.ArgumentParser(
        prog="shrink plan",
        description="Memory plan and device_map from a config alone: shrink plan model.path=DIR_OR_CONFIG "
                    "target=4xA100-80GB [batch=1 context=2048 dtype=bfloat16 reserve=0.1 out=plan "
                    "recipe=RUN/recipe.yaml pipeline=quantize quant.bits=4 quant.group_size=128 prune.pattern=2:4]")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    run_plan(parser.parse_args(argv).settings)


SUBCOMMANDS = {"import-gguf": import_gguf_command, "export-gguf": export_gguf_command, "report": report_command,
               "publish": publish_command, "plan": plan_command}


def main() -> None:
    previous = on_sigterm_raise()
    try:
        run_command(sys.argv[1:])
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(argv: list[str]) -> None:
    quiet_import_noise()
    if argv and argv[0] in SUBCOMMANDS:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        try:
            SUBCOMMANDS[argv[0]](argv[1:])
        except KeyboardInterrupt as exc:
            fail(stopped(exc))
        except Exception as exc:
            fail_or_raise(exc)
        return
    try:
        hydra_main()
    except KeyboardInterrupt as exc:  # outside a run (composing, importing): nothing was written
        fail(stopped(exc))


if __name__ == "__main__":
    main()
