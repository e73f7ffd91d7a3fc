"""The shared layer-wise engine: captured inputs, Hessians, grouping, true-sequential."""
from __future__ import annotations

import logging

import pytest
import torch

from engine.calibration import (LinearJob, LayerOutputs, accumulate, calibrating, calibration_autocast,
                                calibration_dtype, capture_layer_calls, compress_model, input_groups, run_layer)
from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers, set_weight_matrix, weight_matrix
from engine.experts import split_experts
from tests.conftest import FAMILIES, MOE_FAMILIES, tiny_model

CPU = torch.device("cpu")


def windows(n: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8192, (n, seq), generator=torch.Generator().manual_seed(seed))


def mixed_attention_model(family: str) -> torch.nn.Module:
    """2-layer models whose layers get different kwargs: a sliding-window layer (window 4, shorter
    than the 16-token windows) and a full-attention one."""
    import transformers

    if family == "qwen2-sliding":
        config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                          use_sliding_window=True, sliding_window=4, max_window_layers=1)
    else:  # gemma3: other masks AND other rotary embeddings per layer type
        config = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               vocab_size=8192, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"])
    assert len(set(config.layer_types)) == 2
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES + ["qwen2-sliding", "gemma3"])
def test_replaying_layers_from_captured_calls_matches_the_full_model(family: str) -> None:
    """Captured args+kwargs let each layer be replayed alone, exactly, layer after layer, also
    where layers get different masks or position embeddings; MoE layers replay with their
    experts split into Linears as the engine runs them, against the fused model's forward."""
    known = FAMILIES + MOE_FAMILIES
    model = tiny_model(family) if family in known else mixed_attention_model(family)
    x = windows()
    with torch.no_grad():
        reference = model(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
    assert split_experts(model) == (family in MOE_FAMILIES) * (1 if family == "deepseek_v3" else 2)
    calls = capture_layer_calls(model, x, batch_size=2, device=CPU, store=CPU)
    _, layers = find_decoder_layers(model)
    assert len(calls) == len(layers) == 2 and all(len(c) == 2 for c in calls)
    hidden = [b.hidden() for b in calls[0]]
    torch.testing.assert_close(torch.cat(hidden), reference[0])
    for i, layer in enumerate(layers[:-1]):  # the last layer's output is normed in hidden_states
        hidden = run_layer(layer, [c.with_hidden(h) for c, h in zip(calls[i], hidden)], CPU, CPU)
        torch.testing.assert_close(torch.cat(hidden), reference[i + 1], rtol=1e-4, atol=1e-5)
    if family in known:
        return
    # replaying layer 1 with layer 0's kwargs (what a layer-0-only capture did) is measurably wrong
    h0 = run_layer(layers[0], calls[0], CPU, CPU)
    wrong = run_layer(layers[1], [c.with_hidden(h) for c, h in zip(calls[0], h0)], CPU, CPU)
    right = run_layer(layers[1], [c.with_hidden(h) for c, h in zip(calls[1], h0)], CPU, CPU)
    assert not torch.allclose(torch.cat(wrong), torch.cat(right), atol=1e-3)


def test_inputs_are_grouped_by_shared_input_in_execution_order() -> None:
    model = tiny_model("llama")
    batches = capture_layer_calls(model, windows(), 4, CPU, CPU)[0]
    _, layers = find_decoder_layers(model)
    groups = input_groups(layers[0], batches[0], CPU)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_hessian_is_two_over_n_xtx_of_the_linear_inputs() -> None:
    model = tiny_model("llama")
    x = windows()
    _, layers = find_decoder_layers(model)
    seen = []
    handle = layers[1].mlp.down_proj.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    handle.remove()
    X = torch.cat(seen)
    calls = capture_layer_calls(model, x, 1, CPU, CPU)
    batches = [b.with_hidden(o) for b, o in zip(calls[1], run_layer(layers[0], calls[0], CPU, CPU))]
    H = accumulate(layers[1], [["mlp.down_proj"]], batches, CPU)["mlp.down_proj"].H
    torch.testing.assert_close(H, 2 / X.shape[0] * X.T @ X, rtol=1e-4, atol=1e-5)


def test_identity_compressor_leaves_model_unchanged_and_reports_every_linear() -> None:
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[LinearJob] = []
    report = compress_model(model, windows(), lambda job: calls.append(job) or {}, CPU)
    assert len(report) == len(calls) == 2 * 4
    assert all(r["rel_error"] == 0 for r in report)
    assert all(job.hessian is not None and job.hessian.n == 4 * 16 for job in calls)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("sequential", [True, False])
def test_true_sequential_feeds_compressed_outputs_to_later_groups(sequential: bool) -> None:
    """Zeroing v_proj makes the attention output zero: with true-sequential, o_proj must see it."""
    model = tiny_model("llama")
    seen: dict[str, torch.Tensor] = {}

    def compressor(job: LinearJob) -> dict:
        seen[f"{job.layer_index}.{job.name}"] = job.hessian.H.clone()
        if job.name == "self_attn.v_proj":
            with torch.no_grad():
                set_weight_matrix(job.module, torch.zeros_like(weight_matrix(job.module)))
        return {}

    compress_model(model, windows(), compressor, CPU, true_sequential=sequential)
    o_proj_H = seen["0.self_attn.o_proj"]
    assert (float(o_proj_H.abs().max()) == 0) == sequential


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bfloat16_autocast_computes_the_products_in_bfloat16_and_hessians_and_solves_in_float32(family) -> None:
    """data.calib.dtype=bfloat16-autocast: float32 weights and stream, the layer's matmuls in bfloat16
    (a Linear after the attention or MLP reads a bfloat16 input), Hessians and the compressor outside
    autocast in float32; afterwards every layer is as it was (its forward and dtypes)."""
    model = tiny_model(family)
    assert calibration_dtype("bfloat16-autocast", CPU) == torch.float32
    assert calibration_autocast("bfloat16-autocast", CPU) == torch.bfloat16
    assert calibration_autocast("float32", CPU) is None and calibration_autocast("auto", CPU) is None
    inputs: dict[str, set] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.setdefault(n, set()).add(i[0].dtype))
             for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj", "c_proj"))]
    solved: list[tuple] = []

    def compressor(job: LinearJob) -> dict:
        solved.append((job.hessian.H.dtype, torch.is_autocast_enabled("cpu")))
        return {}

    for true_sequential in (True, False):  # the lockstep's threads and the rerun path
        inputs.clear()
        compress_model(model, windows(), compressor, CPU, true_sequential=true_sequential, dtype=torch.float32,
                       autocast=torch.bfloat16)
        # (layer 0 also runs once outside calibration, in float32: capturing its inputs' structure)
        assert inputs and all(seen == {torch.bfloat16} for n, seen in inputs.items() if ".0." not in n), inputs
        assert all(torch.bfloat16 in seen for seen in inputs.values())
    for h in hooks:
        h.remove()
    assert solved and set(solved) == {(torch.float32, False)}
    for layer in find_decoder_layers(model)[1]:
        assert "forward" not in layer.__dict__
        assert {p.dtype for p in layer.parameters()} == {torch.float32}


def test_bfloat16_autocast_on_a_cpu_without_native_bfloat16_says_it_is_emulated(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="engine.calibration"):
        assert calibration_autocast("bfloat16-autocast", CPU) == torch.bfloat16
    assert "no native bfloat16" in caplog.text and "data.calib.dtype=float32" in caplog.text


def test_calibrating_puts_an_instance_forward_back() -> None:
    """accelerate's hooks set a module's forward on the instance: autocast wraps it and then restores it."""
    layer = torch.nn.Linear(4, 4)
    own = layer.forward
    layer.forward = own
    with calibrating(layer, CPU, None, torch.bfloat16):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    assert layer.__dict__["forward"] is own
    assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_the_reference_stream_can_keep_the_head_rows_of_each_batch_only() -> None:
    """compress_model(reference_rows=): the after-layer hook's targets are the first rows of each
    batch, the same values the whole reference stream gives them (kwargs sliced with the rows)."""
    targets: dict[int | None, list[list[torch.Tensor]]] = {}
    for rows in (None, 1):
        model = tiny_model("llama")
        seen = targets.setdefault(rows, [])

        def after(out: LayerOutputs) -> dict:
            seen.append([t.clone() for t in out.targets])
            return {}

        compress_model(model, windows(8), lambda job: {}, CPU, batch_size=3, after_layer=after,
                       reference_rows=(lambda sizes: rows) if rows else None)
    assert [[t.shape[0] for t in layer] for layer in targets[1]] == [[1, 1, 1]] * 2
    assert [[t.shape[0] for t in layer] for layer in targets[None]] == [[3, 3, 2]] * 2
    for full, heads in zip(targets[None], targets[1]):
        for f, h in zip(full, heads):
            torch.testing.assert_close(h, f[:1])


def test_diagonal_only_hessians_give_the_same_norms_and_a_diagonal_error_model() -> None:
    """full_hessian=False (Wanda's mode): no [cols, cols] matrix, the same activation norms,
    and rel_error weighted by diag(H) (Wanda's own error model)."""
    def prune_half(job: LinearJob) -> dict:
        W = weight_matrix(job.module)
        stats = {"norm": job.hessian.input_norm().clone(), "H": job.hessian.H}
        with torch.no_grad():
            set_weight_matrix(job.module, W.masked_fill(torch.arange(W.shape[1]) % 2 == 0, 0.0))
        return stats

    full = compress_model(tiny_model("llama"), windows(), prune_half, CPU)
    diag = compress_model(tiny_model("llama"), windows(), prune_half, CPU, full_hessian=False)
    assert all(r["H"] is None for r in diag) and all(r["H"] is not None for r in full)
    for a, b in zip(full, diag):
        torch.testing.assert_close(a["norm"], b["norm"])
        assert 0 < b["rel_error"] < 1 and b["rel_error"] != a["rel_error"]


def test_data_free_compressor_gets_no_hessian_and_layers_end_on_cpu() -> None:
    model = tiny_model("opt")
    report = compress_model(model, None, lambda job: {"had_h": job.hessian is not None}, CPU)
    assert not any(r["had_h"] for r in report)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_nan_activations_name_the_layer() -> None:
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ShrinkError, match="NaN/inf"):
        compress_model(model, windows(), lambda job: {}, CPU)


def test_compressor_value_errors_name_the_linear() -> None:
    def bad(job: LinearJob) -> dict:
        raise ValueError("group size 48 does not divide 64")
    with pytest.raises(ShrinkError, match=r"model.layers.0.self_attn.q_proj: group size"):
        compress_model(tiny_model("llama"), windows(), bad, CPU)


def grid_compressor(seen: dict[str, tuple[torch.Tensor, int]]):
    """Records each group's Hessian and rounds weights onto a coarse grid, so every later
    group's inputs depend on the earlier groups' compression."""
    def compress(job: LinearJob) -> dict:
        seen[job.full_name] = (job.hessian.H.clone(), job.hessian.n)
        W = weight_matrix(job.module)
        step = W.abs().amax() / 3
        with torch.no_grad():
            set_weight_matrix(job.module, torch.round(W / step) * step)
        return {}
    return compress


def lockstep_against_rerun(family: str, memory: int | None) -> tuple[list[dict], list[dict], list[dict]]:
    """Compresses the family's tiny model by the re-run path and by lockstep (paused forwards
    kept within `memory` bytes), asserts equal Hessians, weights and report; the profiles and
    the report."""
    results = []
    for rerun in (True, False):
        model = tiny_model(family) if family in FAMILIES else mixed_attention_model(family)
        seen: dict[str, tuple[torch.Tensor, int]] = {}
        profile: list[dict] = []
        report = compress_model(model, windows(n=5), grid_compressor(seen), CPU, batch_size=2, profile=profile,
                                lockstep_memory=memory, _rerun=rerun)
        results.append((seen, model.state_dict(), report, profile))
    (seen_ref, state_ref, report_ref, prof_ref), (seen, state, report, prof) = results
    assert list(seen) == list(seen_ref) and len(seen) >= 8
    for name, (H, n) in seen.items():
        assert n == seen_ref[name][1] == 5 * 16
        assert torch.equal(H, seen_ref[name][0]), name
    for key, value in state.items():
        assert torch.equal(value, state_ref[key]), key
    assert [r["rel_error"] for r in report] == [r["rel_error"] for r in report_ref]
    return prof, prof_ref, report


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_lockstep_within_a_memory_cap_still_equals_the_rerun_path_bitwise(family: str) -> None:
    """With room for one waiting batch (of 3), the other two pass through every pause and start
    again at the next: more forwards, the same Hessians, weights and report."""
    prof, _, _ = lockstep_against_rerun(family, memory=1)
    for p in prof:
        # batches of 2, 2 and 1 windows: the last two (3/5 of the windows) start again once per group
        restarts = (p["forwards"] - 1 - 2 / 5) / (3 / 5)  # minus the lockstep forward and the discovery
        assert restarts == pytest.approx(round(restarts)) and round(restarts) >= 2


@pytest.mark.parametrize("family", FAMILIES + ["qwen2-sliding", "gemma3"])
def test_lockstep_true_sequential_equals_the_full_rerun_path_bitwise(family: str) -> None:
    """One lockstep forward per layer gives exactly the Hessians, weights and report of
    re-running the whole layer once per input group (the reference path)."""
    prof, prof_ref, report = lockstep_against_rerun(family, memory=None)
    # the reference runs (1 + number of groups) forwards per layer, the lockstep one
    groups = len({r["name"] for r in report if r["layer"] == 0})
    assert all(p["forwards"] == pytest.approx(1 + 2 / 5) for p in prof)  # + discovery on batch 0 (2 of 5 windows)
    assert all(p["forwards"] > 2 for p in prof_ref) and groups >= 2
    assert all(p["forward_flops"] > 0 and p["hessian_flops"] > 0 for p in prof)


def test_a_forward_error_in_one_batch_is_raised_and_leaves_no_thread_behind() -> None:
    import threading

    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    calls = {"n": 0}

    def fail_third_call(_m, args):
        calls["n"] += 1
        if calls["n"] == 3:  # the discovery pass is the first call; then batches 0 and 1
            raise RuntimeError("boom in batch 1")

    layers[0].mlp.down_proj.register_forward_pre_hook(fail_third_call)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom in batch 1"):
        compress_model(model, windows(), lambda job: {}, CPU, batch_size=2)
    assert threading.active_count() == before


def test_lockstep_threads_compute_with_the_thread_count_the_caller_set() -> None:
    """torch.set_num_threads reaches ATen, OpenMP and MKL in every batch's thread (the GEMMs of
    the forwards and of the Hessians run there)."""
    import threading

    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    seen: set[tuple[str, str]] = set()

    def record(_m, _args):
        if threading.current_thread() is not threading.main_thread():
            info = torch.__config__.parallel_info().splitlines()
            seen.add(tuple(line.split(":")[-1].strip() for line in info if "omp_get_max_threads" in line or "at::get_num_threads()" in line))

    layers[0].mlp.down_proj.register_forward_pre_hook(record)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            seen.clear()
            compress_model(model, windows(), lambda job: {}, CPU, batch_size=2)
            assert seen == {(str(threads), str(threads))}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,streams,offloaded", [(None, 1, False), (torch.float64, 1, True), (None, 2, True)])
def test_activations_are_offloaded_by_what_the_calibration_keeps(dtype, streams, offloaded, monkeypatch) -> None:
    """A GPU whose free memory holds the float32 stream twice over, not a float64 one or a second stream."""
    from engine.calibration import activation_store

    model = tiny_model("llama")  # float32
    windows = torch.zeros(8, 32, dtype=torch.long)
    one_stream = 2 * windows.numel() * model.config.hidden_size * 4  # inputs + outputs of a layer, float32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(2.5 * one_stream), 10 * one_stream))
    cuda = torch.device("cuda")
    store = activation_store(model, windows, cuda, None, dtype, streams)
    assert store == (torch.device("cpu") if offloaded else cuda)
    assert activation_store(model, windows, cuda, True) == torch.device("cpu")  # asked: always
