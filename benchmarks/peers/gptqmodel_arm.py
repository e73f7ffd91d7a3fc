"""gptqmodel's GPTQ as a peer of benchmarks/quant_frontier.py (in the project's own venv):
symmetric, no act-order (its default group-aware reordering on), damp 0.01, batches of 8;
`--mse 2.0` its scale search, `--gptaq 0.25` its GPTAQ (alpha). Saved as its GPTQ checkpoint."""
from __future__ import annotations

import common


def main() -> None:
    args = common.arguments(lambda p: (p.add_argument("--mse", type=float, default=0.0),
                                       p.add_argument("--gptaq", type=float, default=None)))
    import os

    # gptqmodel sizes its CPU pool to half the cores and its model loader asks for 2 workers:
    # on a 2-core machine that is refused unless the pool is given 2
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig

    _, _, windows = common.load(args, model=False)
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False, damp_percent=0.01,
                            mse=args.mse, gptaq=GPTAQConfig(alpha=args.gptaq) if args.gptaq else None)
    model = GPTQModel.load(args.model, config, device="cpu", dtype=torch.float32)
    data = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    _, row = common.timed(lambda: model.quantize(data, batch_size=8))
    model.save(args.out)
    common.finish(args, {**row, "tool": f"gptqmodel {gptqmodel.__version__}"})


if __name__ == "__main__":
    main()
