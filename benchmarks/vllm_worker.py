"""One model through vLLM, run by benchmarks/serve.py inside vLLM's own virtual environment.

    VLLM_PYTHON benchmarks/vllm_worker.py REQUEST.json RESULT.json

Imports only the standard library and vLLM (it runs where shrink is not installed). REQUEST:
{"model": folder, "dtype": "bfloat16" | "float32" | "auto", "windows": [[token ids]...] (perplexity
windows), "prompts": [[token ids]...] (greedy continuations), "max_tokens": n, "speed_prompt":
[token ids], "speed_tokens": n}. RESULT: {"loaded", "error", "load_seconds", "methods" (the
quantization method and kernel of every layer kind), "nll", "tokens", "ppl", "greedy",
"speed": {"tokens", "seconds", "tokens_per_second", "loadavg"}}. A model vLLM refuses is a result
too ("loaded": false with its error), not a crash.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

# vLLM's CPU build, one process, no thread pinning (a shared machine), a small KV cache
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(key, value)


def methods(model: Any) -> dict[str, int]:
    """'QuantMethod/Kernel' -> how many modules use it (what vLLM chose for each layer)."""
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kernel = getattr(method, "kernel", None)
        name = type(method).__name__ + (f"/{type(kernel).__name__}" if kernel is not None else "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def run(request: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    try:
        llm = LLM(request["model"], dtype=request.get("dtype", "auto"), enforce_eager=True,
                  max_model_len=request.get("max_model_len", 1024), seed=0)
    except Exception as exc:  # the finding is that vLLM refuses it: say why
        lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        return {"loaded": False, "error": " ".join(lines[:4])[:500]}
    result: dict[str, Any] = {"loaded": True, "load_seconds": time.perf_counter() - start,
                              "methods": llm.apply_model(methods)[0]}
    windows = request.get("windows") or []
    if windows:
        outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
        nll, tokens = 0.0, 0
        for window, out in zip(windows, outs):
            for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token].logprob
                tokens += 1
        result.update(nll=nll, tokens=tokens, ppl=math.exp(nll / tokens))
    prompts = request.get("prompts") or []
    if prompts:
        greedy = SamplingParams(max_tokens=request.get("max_tokens", 32), temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        result["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
    if request.get("speed_prompt"):
        n = int(request.get("speed_tokens", 128))
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        prompt = [{"prompt_token_ids": request["speed_prompt"]}]
        llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        load = [os.getloadavg()[0]]
        tick = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)
        seconds = time.perf_counter() - tick
        load.append(os.getloadavg()[0])
        made = len(out[0].outputs[0].token_ids)
        result["speed"] = {"tokens": made, "seconds": seconds, "tokens_per_second": made / seconds, "loadavg": load}
    return result


def main() -> None:
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    result = run(request)
    import vllm

    result["vllm_version"] = vllm.__version__
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
