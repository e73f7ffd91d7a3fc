"""AutoRound (intel/auto-round) as a peer of benchmarks/quant_frontier.py, in /work/venvs/autoround.
Signed-gradient rounding and min/max tuning per decoder block (`--iters 50 --lr 5e-3`: the
"light" setting), symmetric, batches of 8 windows, exported in the GPTQ format (auto_gptq)."""
from __future__ import annotations

import shutil
from pathlib import Path

import common


def main() -> None:
    args = common.arguments(lambda p: (p.add_argument("--iters", type=int, default=50),
                                       p.add_argument("--lr", type=float, default=5e-3)))
    import auto_round
    from auto_round import AutoRound

    model, tokenizer, windows = common.load(args)
    ar = AutoRound(model, tokenizer=tokenizer, bits=args.bits, group_size=args.group_size, sym=True,
                   iters=args.iters, lr=args.lr, nsamples=windows.shape[0], seqlen=windows.shape[1], batch_size=8,
                   dataset=[w[None] for w in windows], device_map="cpu", seed=0)
    staging = Path(args.out + ".autoround")
    _, row = common.timed(lambda: ar.quantize_and_save(str(staging), format="auto_gptq"))
    # it writes into a subfolder named after the model and scheme: that folder becomes --out
    saved = next(p.parent for p in staging.rglob("config.json"))
    shutil.move(str(saved), args.out)
    shutil.rmtree(staging, ignore_errors=True)
    common.finish(args, {**row, "tool": f"auto-round {auto_round.__version__}"})


if __name__ == "__main__":
    main()
