"""A compression result that depends on its inputs only: float64 calibration, and the per-Linear
fingerprints (metrics.json) that tell where two runs parted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.calibration import LinearJob, calibration_dtype, compress_model
from engine.fingerprint import fingerprint, first_divergence
from engine.hessian import HessianAccumulator
from engine.modeling import find_decoder_layers, find_linears, set_weight_matrix, weight_matrix
from quant.gptq import gptq_quantize
from tests.conftest import tiny_model

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


def windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8192, (8, 64), generator=torch.Generator().manual_seed(seed))


def gptq(job: LinearJob) -> dict:
    W = weight_matrix(job.module)
    result = gptq_quantize(W.float(), job.hessian.H, 4, 32)
    set_weight_matrix(job.module, result.Q.to(W.dtype))
    return {}


def quantize_tiny(dtype: torch.dtype | None, tokens: torch.Tensor | None = None) -> list[dict]:
    return compress_model(tiny_model("llama"), windows() if tokens is None else tokens, gptq, CPU, batch_size=4,
                          dtype=dtype)


def test_fingerprint_is_bitwise_and_sees_dtype_and_shape() -> None:
    x = torch.linspace(-1, 1, 12)
    assert fingerprint(x) == fingerprint(x.clone()) and len(fingerprint(x)) == 12
    nudged = x.clone()
    nudged[5] = torch.nextafter(nudged[5], torch.tensor(2.0))
    assert fingerprint(nudged) != fingerprint(x)
    assert fingerprint(x.double()) != fingerprint(x)
    assert fingerprint(x.reshape(3, 4)) != fingerprint(x)
    assert fingerprint(x.reshape(3, 4).t()) == fingerprint(x.reshape(3, 4).t().contiguous())


def test_report_fingerprints_name_the_first_linear_where_two_runs_part() -> None:
    ref = quantize_tiny(None)
    assert all(len(r["fingerprint"]["hessian"]) == len(r["fingerprint"]["weights"]) == 12 for r in ref)
    assert first_divergence(ref, quantize_tiny(None)) is None  # one machine, one result

    other_data = windows()
    other_data[7, 40] += 1  # one token of the last window
    part = first_divergence(ref, quantize_tiny(None, other_data))
    assert part == {"full_name": "model.layers.0.self_attn.q_proj", "layer": 0, "hessian_differs": True}

    def rounder_at_layer_1_down(job: LinearJob) -> dict:
        stats = gptq(job)
        if job.full_name == "model.layers.1.mlp.down_proj":
            set_weight_matrix(job.module, weight_matrix(job.module) * 0.5)
        return stats

    solved = compress_model(tiny_model("llama"), windows(), rounder_at_layer_1_down, CPU, batch_size=4)
    assert first_divergence(ref, solved) == {"full_name": "model.layers.1.mlp.down_proj", "layer": 1,
                                             "hessian_differs": False}


# Another machine of the same kind: one thread, MKL's SSE2 code path, ATen's AVX2 kernels.
OTHER_MACHINE = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
REPLAY = """
import json, torch
from tests.engine.test_reproducibility import quantize_tiny
print(json.dumps({str(d): [r["fingerprint"]["weights"] for r in quantize_tiny(d)] for d in (None, torch.float64)}))
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="an x86 CPU")
def test_float64_calibration_gives_the_same_weights_on_another_machine() -> None:
    """The same GPTQ job in a process whose BLAS and ATen kernels round differently: in float64 every
    Linear's weights are bitwise those of this process; in float32 they are not (MKL's code path)."""
    here = {str(d): [r["fingerprint"]["weights"] for r in quantize_tiny(d)] for d in (None, torch.float64)}
    env = {**os.environ, **OTHER_MACHINE, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", REPLAY], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["torch.float64"] == here["torch.float64"]
    if torch.backends.mkl.is_available():
        assert there["None"] != here["None"]


def test_float64_calibration_keeps_each_tensor_dtype_and_forwards_through_the_stored_weights() -> None:
    """A bfloat16 model calibrated in float64: the compressor gets float64 Hessians, the model ends in
    its own dtypes, and the forwards after a compressed Linear run through its weights as stored
    (rounded to bfloat16), not through the compressor's float64 values."""
    model = tiny_model("llama").to(torch.bfloat16)
    seen: dict[str, torch.Tensor] = {}

    def unrounded(job: LinearJob) -> dict:
        seen[job.full_name] = job.hessian.H.clone()
        W = weight_matrix(job.module)
        assert W.dtype == torch.float64
        set_weight_matrix(job.module, W * (1 + 1e-3))  # most entries are no bfloat16
        return {}

    compress_model(model, windows(), unrounded, CPU, batch_size=4, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(H.dtype == torch.float64 for H in seen.values())
    # o_proj's inputs: layer 0's attention as stored (bfloat16 q/k/v), computed in float64
    _, layers = find_decoder_layers(model)
    layer = layers[0].to(torch.float64)
    inputs: list[torch.Tensor] = []
    handle = find_linears(layer)["self_attn.o_proj"].register_forward_hook(lambda _m, a, _o: inputs.append(a[0]))
    with torch.no_grad():
        embedded = model.model.embed_tokens(windows())
        position = tuple(t.double() for t in model.model.rotary_emb(embedded, torch.arange(64)[None]))
        hidden = embedded.double()
        for start in range(0, 8, 4):
            layer(hidden[start:start + 4], position_embeddings=position, attention_mask=None)
    handle.remove()
    X = torch.cat(inputs).reshape(-1, inputs[0].shape[-1])
    assert X.dtype == torch.float64
    torch.testing.assert_close(seen["model.layers.0.self_attn.o_proj"], 2 / X.shape[0] * X.T @ X,
                               rtol=1e-9, atol=1e-12)


def test_float64_accumulator_sums_in_float64_and_other_dtypes_are_refused() -> None:
    X = torch.randn(300, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = HessianAccumulator(24, dtype=torch.float64)
    acc.add(X[:100].float())
    acc.add(X[100:])
    assert acc.H.dtype == torch.float64
    exact = torch.cat([X[:100].float().double(), X[100:]])
    torch.testing.assert_close(acc.H, 2 / 300 * exact.T @ exact, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(4, dtype=torch.float16)


def test_a_float64_hessian_makes_the_gptq_sweep_float64() -> None:
    """W in float32 with an fp64 Hessian is solved in float64: the codes of W as float64."""
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(48, 64, generator=g), torch.randn(512, 64, generator=g, dtype=torch.float64)
    H = 2 / 512 * X.T @ X
    assert torch.equal(gptq_quantize(W, H, 3, 16).codes, gptq_quantize(W.double(), H, 3, 16).codes)


def test_auto_is_float64_on_the_cpu_and_the_model_dtype_on_gpus() -> None:
    assert calibration_dtype("auto", CPU) == torch.float64
    assert calibration_dtype("auto", torch.device("cuda")) is None
    assert calibration_dtype("model", CPU) is None
    assert calibration_dtype("float32", torch.device("cuda")) == torch.float32
