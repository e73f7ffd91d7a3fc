"""GPTQ through the lockstep true-sequential engine gives exactly the packed checkpoint
tensors of the full re-run path (one whole-layer forward per input group)."""
from __future__ import annotations

import pytest
import torch

from engine.calibration import LinearJob, compress_model
from engine.modeling import set_weight_matrix, weight_matrix
from quant.config import QuantConfig
from quant.pack import pack_result
from quant.stage import quantize_linear
from tests.conftest import tiny_model


def gptq_packed(family: str, q: QuantConfig, rerun: bool,
                memory: int | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict]]:
    model = tiny_model(family)
    packed: dict[str, dict[str, torch.Tensor]] = {}

    def compressor(job: LinearJob) -> dict:
        W = weight_matrix(job.module)
        result = quantize_linear(W.float(), job.hessian.H, q)
        set_weight_matrix(job.module, result.Q.to(W.dtype))
        packed[job.full_name] = pack_result(result, job.module)
        return {}

    x = torch.randint(0, 8192, (6, 16), generator=torch.Generator().manual_seed(1))
    profile: list[dict] = []
    compress_model(model, x, compressor, torch.device("cpu"), batch_size=2, profile=profile, lockstep_memory=memory,
                   _rerun=rerun)
    return packed, profile


@pytest.mark.parametrize("family,q", [
    ("llama", QuantConfig(bits=4, group_size=32, sym=True)),
    ("gpt_neox", QuantConfig(bits=3, group_size=32, act_order=True)),
    ("gpt2", QuantConfig(bits=4, group_size=-1)),
])
def test_packed_gptq_codes_equal_the_rerun_path(family: str, q: QuantConfig) -> None:
    (new, profile), (ref, ref_profile) = gptq_packed(family, q, False), gptq_packed(family, q, True)
    assert list(new) == list(ref) and len(new) >= 8
    for name, tensors in new.items():
        assert set(tensors) == set(ref[name])
        for key, value in tensors.items():
            assert torch.equal(value, ref[name][key]), f"{name}.{key}"
    # the point of the lockstep path: a layer costs one forward (+ the 1-batch discovery), not 1 + groups
    assert all(p["forwards"] < 1.5 < 3 < r["forwards"] for p, r in zip(profile, ref_profile))


def test_packed_gptq_codes_equal_the_rerun_path_within_a_memory_cap() -> None:
    """One waiting batch of three: the other two are recomputed at every pause, codes unchanged."""
    q = QuantConfig(bits=4, group_size=32, sym=True)
    (new, profile), (ref, _) = gptq_packed("llama", q, False, memory=1), gptq_packed("llama", q, True)
    assert list(new) == list(ref) and len(new) >= 8
    for name, tensors in new.items():
        for key, value in tensors.items():
            assert torch.equal(value, ref[name][key]), f"{name}.{key}"
    assert all(p["forwards"] > 2 for p in profile)
