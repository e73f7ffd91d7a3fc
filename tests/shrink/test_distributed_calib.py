"""Compression over torch.distributed: `torchrun --nproc_per_node 2 -m shrink` (gloo on CPU)
gives the 1-process result, a dying rank stops the others with one line, and the work split
(windows, owners) is what engine/distributed_calib.py says."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.calibration import compress_model
from engine.distributed_calib import CalibComm
from engine.errors import ShrinkError
from engine.hessian import HessianAccumulator
from engine.modeling import find_decoder_layers, find_linears
from tests.conftest import ROOT, run_shrink, tiny_data_overrides, tiny_model


def comm(rank: int, world: int) -> CalibComm:
    """A communicator without a process group: for the parts that need none."""
    return CalibComm(rank, world, None, None, [])


def torchrun(overrides: list[str], out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "shrink", *overrides, f"out={out}"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def single(overrides: list[str], out: Path) -> dict:
    """The 1-process run, on one thread as each torchrun rank (the same GEMM kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_shrink(overrides, out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("family,extra", [("llama", []), ("mixtral", []),
                                          # quant=best's calibration (its refinement is one process only)
                                          ("llama", ["data.calib.dtype=bfloat16-autocast",
                                                     "quant.true_sequential=false", "quant.scale_search=mse"])])
def test_two_ranks_quantize_as_one_process(tmp_path: Path, tiny_model_dir, family: str, extra: list[str]) -> None:
    folder = tiny_model_dir(family)
    common = ["pipeline=quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.group_size=32", *extra]
    one = single(common, tmp_path / "one")
    proc = torchrun(common, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    # the Hessian sums handed along the ranks in window order: on the lockstep path (llama) and
    # on the expert layers' re-run path (mixtral) alike
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = next(iter(one["ppl"]))
    assert two["ppl"][name] == pytest.approx(one["ppl"][name], rel=1e-3)
    # the same model on split windows: equal up to summation order (MoE batches differ in shape)
    assert two["baseline_ppl"][name] == pytest.approx(one["baseline_ppl"][name], rel=1e-5)
    one_layers, two_layers = one["stages"]["quantize"]["layers"], two["stages"]["quantize"]["layers"]
    assert [r["full_name"] for r in one_layers] == [r["full_name"] for r in two_layers]
    if family == "mixtral":  # routed tokens summed over the ranks' shares
        assert two["stages"]["quantize"]["moe"] == one["stages"]["quantize"]["moe"]
    assert not list((tmp_path / "two").glob("*.tmp*"))


@pytest.mark.slow
def test_two_ranks_prune_and_quantize_as_one_process(tmp_path: Path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    common = ["pipeline=prune_quantize", f"model.path={folder}", *tiny_data_overrides(), "quant.group_size=32",
              "eval.baseline=false"]
    one = single(common, tmp_path / "one")
    proc = torchrun(common, tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # every Linear's figure reached rank 0, whichever rank pruned it
    assert two["stages"]["prune"]["per_linear"] == one["stages"]["prune"]["per_linear"]
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    name = next(iter(one["ppl"]))
    # the same weights; eval batches of other shapes (the windows split): float rounding only
    assert two["ppl"][name] == pytest.approx(one["ppl"][name], rel=1e-5)


DIE = """
import os, sys
from engine.distributed_calib import CalibComm
share = CalibComm.share
calls = []
def dying(self, *a, **k):
    calls.append(1)
    if self.rank == 1 and len(calls) == 3:
        os._exit(9)  # as if killed: no error message, no clean-up
    return share(self, *a, **k)
CalibComm.share = dying
from shrink.launch import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_one_line_naming_it(tmp_path: Path, tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SHRINK_DIST_TIMEOUT": "60"}
        procs.append(subprocess.Popen([sys.executable, "-c", DIE, "pipeline=quantize", f"model.path={folder}",
                                       *tiny_data_overrides(), "quant.group_size=32", f"out={out}"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == 9
    assert procs[0].returncode == 2, results[0][1][-3000:]
    last = results[0][1].strip().splitlines()[-1]
    assert last.startswith("shrink: error: torchrun: rank 1 stopped during layer "), last
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


DIE_WHILE_PEER_IS_BUSY = """
import os, sys, time
from engine.distributed_calib import CalibComm
share = CalibComm.share
calls = []
def dying(self, *a, **k):
    calls.append(1)
    if len(calls) == 3:
        if self.rank == 1:
            os._exit(9)
        time.sleep(60)  # rank 0 is busy, in no collective, when torchrun sees rank 1 gone
    return share(self, *a, **k)
CalibComm.share = dying
from shrink.launch import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_under_torchrun_a_dead_rank_is_named_when_torchrun_stops_the_others(tmp_path: Path, tiny_model_dir) -> None:
    """torchrun ends the surviving ranks with SIGTERM: rank 0 says which rank stopped, in the README's
    one line, before torchrun's own summary; the fresh out is left as it was (absent)."""
    script = tmp_path / "die.py"
    script.write_text(DIE_WHILE_PEER_IS_BUSY)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "pipeline=quantize", f"model.path={tiny_model_dir('llama')}",
                             *tiny_data_overrides(), "quant.group_size=32", f"out={out}"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("shrink: error:")]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("shrink: error: torchrun: rank 1 stopped; rank 0 stops too"), lines
    assert not out.exists()


def test_more_ranks_than_linears_in_a_layer_is_one_error_before_any_weight_changes() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 100, (8, 16))
    with pytest.raises(ShrinkError, match=r"^torchrun: 8 ranks but decoder layer 0 has only 7 Linears"):
        compress_model(model, windows, lambda job: {}, torch.device("cpu"), comm=comm(0, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_windows_split_into_contiguous_shares_covering_all_once() -> None:
    windows = torch.arange(11).unsqueeze(1)
    shares = [comm(r, 3).shard(windows, "data.calib.num_samples") for r in range(3)]
    assert torch.equal(torch.cat(shares), windows) and sorted(len(s) for s in shares) == [3, 4, 4]
    with pytest.raises(ShrinkError, match="data.calib.num_samples: 2 windows cannot be split over 3 ranks"):
        comm(0, 3).shard(windows[:2], "data.calib.num_samples")


def test_owners_balance_the_sweep_cost_the_same_on_every_rank() -> None:
    model = tiny_model("llama")
    _, layers = find_decoder_layers(model)
    linears = find_linears(layers[0])
    names = list(linears)
    owners = [comm(r, 2).owners(names, linears) for r in range(2)]
    assert owners[0] == owners[1] and set(owners[0].values()) == {0, 1}
    cost = {n: m.weight.shape[1] ** 2 * m.weight.shape[0] for n, m in linears.items()}
    load = [sum(cost[n] for n, r in owners[0].items() if r == rank) for rank in range(2)]
    # greedy largest-first: the loads differ by at most the largest single cost
    assert abs(load[0] - load[1]) <= max(cost.values())


def test_partial_hessian_sums_add_up_to_the_whole() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 24, generator=g) for _ in range(6)]
    whole = HessianAccumulator(24)
    whole.add_all(xs)
    parts = [HessianAccumulator(24), HessianAccumulator(24)]
    parts[0].add_all(xs[:2])
    parts[1].add_all(xs[2:])
    total = parts[0].raw_sum() + parts[1].raw_sum()  # what dist.reduce computes
    parts[0].raw_sum().copy_(total)
    parts[0].n = parts[0].n + parts[1].n
    assert torch.allclose(parts[0].H, whole.H, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already read"):
        parts[0].raw_sum()


@pytest.mark.parametrize("rows", [40, 3000])  # staged (< MIN_GEMM_ROWS rows per input) and direct
def test_a_running_sum_handed_on_continues_bit_for_bit(rows: int) -> None:
    """What add_in_order sends from rank to rank (sum, staging block, counts) lets the next
    accumulator go on exactly as one accumulator over all inputs would."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(rows, 24, generator=g) for _ in range(5)]
    whole = HessianAccumulator(24)
    whole.add_all(xs)
    first, second = HessianAccumulator(24), HessianAccumulator(24)
    first.add_all(xs[:2])
    for mine, theirs in zip(second.chain_buffers(), first.chain_buffers()):
        mine.copy_(theirs)  # dist.send / dist.recv
    second.n, second.staged = first.n, first.staged
    second.add_all(xs[2:])
    assert second.n == whole.n and torch.equal(second.H, whole.H)
