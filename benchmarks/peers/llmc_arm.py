"""llm-compressor's GPTQModifier as a peer of benchmarks/quant_frontier.py, in /work/venvs/llmc:
weights int, symmetric, groups of --group-size, damp 0.01, lm_head and MoE routers kept. Its
checkpoint format (compressed-tensors) is not one shrink reads, so the folder written is the
dense model with every quantized weight dequantized exactly as the compressed model computes it
(compressed_tensors' fake_quantize with the calibrated scales and zero points)."""
from __future__ import annotations

import common


def main() -> None:
    args = common.arguments()
    import llmcompressor
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, tokenizer, windows = common.load(args)
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*router$"],
                          block_size=128, dampening_frac=0.01)
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    _, row = common.timed(lambda: oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=windows.shape[1],
                                          num_calibration_samples=windows.shape[0], batch_size=8))
    state, quantized = {}, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
                zero = getattr(module, "weight_zero_point", None)
                state[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, zero, scheme.weights)
                quantized += 1
    dense = type(model).from_pretrained(args.model, dtype=torch.float32)
    missing = [k for k in state if k not in dense.state_dict()]
    if missing or not quantized:
        raise SystemExit(f"llm-compressor: {quantized} quantized Linears; names not in the model: {missing[:3]}")
    dense.load_state_dict(state, strict=False)
    dense.save_pretrained(args.out)
    common.finish(args, {**row, "tool": f"llmcompressor {llmcompressor.__version__}", "quantized_linears": quantized})


if __name__ == "__main__":
    main()
