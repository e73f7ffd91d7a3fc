"""2:4 semi-structured sparse matmul against dense fp16 at realistic shapes (CUDA only).

    python -m benchmarks.sparse_matmul    # writes benchmarks/results/sparse_matmul.json

Shapes: weight 4096x4096 and 14336x4096 (the Llama-3-8B MLP), batch of 1, 16 and 128
tokens. Each timing is the median of 100 CUDA-event-timed calls after 10 warm-ups.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import Results

SHAPES = [(4096, 4096), (14336, 4096)]  # (out_features, in_features)
BATCHES = [1, 16, 128]


def time_ms(fn, reps: int = 100) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("sparse_matmul needs a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    results = Results("sparse_matmul", {"dtype": "float16", "shapes": SHAPES, "batches": BATCHES,
                                        "timing": "median of 100 CUDA-event-timed calls after 10 warm-ups"},
                      key=("out", "in", "batch"))
    for out_f, in_f in SHAPES:
        W = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        # keep the 2 largest of every 4 inputs: a valid 2:4 pattern
        groups = W.reshape(out_f, in_f // 4, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        W = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(out_f, in_f)
        Ws = to_sparse_semi_structured(W)
        for batch in BATCHES:
            if results.has(out=out_f, **{"in": in_f}, batch=batch):  # measured by an earlier run
                continue
            # The true batch for both: the sparse kernels pad the dense operand to their minimum
            # rows themselves, and that padding is part of what a batch-1 decode step pays.
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            dense = time_ms(lambda: F.linear(x, W))
            sparse = time_ms(lambda: F.linear(x, Ws))
            torch.testing.assert_close(F.linear(x, Ws), F.linear(x, W), rtol=1e-2, atol=1e-1)
            results.add({"out": out_f, "in": in_f, "batch": batch, "dense_ms": dense, "sparse_ms": sparse,
                         "speedup": dense / sparse, "device": torch.cuda.get_device_name(0)})
    print(results.save())


if __name__ == "__main__":
    main()
