"""What a run checks once its model has loaded and before it writes anything into `out`:
the refusals that would otherwise come after the baseline evaluation (or hours of
calibration) and leave a half-begun run behind.

- quantize / prune: the model is not already quantized (a GPTQ folder as input), the stage
  reaches min_coverage of the decoder-layer weights, and every float tensor the export
  narrows to quant.export_dtype fits its range (engine.weights.narrow);
- distill / pretrain: the student's layers exist in the teacher and the layer map fits both;
- the pipeline's order: nothing compresses a model that an earlier stage already quantized.

The stages call the same checks again where they act (a streamed model, a later stage on
another model); these only move the refusal before the first write.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from engine.config import FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges
from engine.coverage import compression_targets
from engine.errors import ShrinkError
from engine.experts import split_experts
from engine.modeling import find_decoder_layers, is_packed_linear, linear_dims, resolve_device, resolve_dtype
from engine.weights import check_narrowing, embedding_names

if TYPE_CHECKING:
    from engine.state import RunState


@dataclass(frozen=True, order=True)
class Need:
    """What a stage reads from a data file: `tokens` at least (0: only that it is a good file)."""
    tokens: int = 0
    why: str = ""


# The numeric keys of the run itself (each stage's group checks its own: quant.config.RANGES, ...).
RUN_RANGES: dict[str, Range] = {"min_coverage": FRACTION, "data.calib.num_samples": POSITIVE,
                                "data.calib.seq_len": Range(2), "eval.batch_size": POSITIVE,
                                "eval.num_fewshot": NON_NEGATIVE, "eval.limit": POSITIVE,
                                "moe.min_tokens": NON_NEGATIVE}


def check_run(cfg: DictConfig, stages: list[str]) -> None:
    """The run's own numeric keys, model.dtype and model.device, and the stages' order: no stage
    compresses a model that an earlier stage quantized (a joint prune+quantize's quantize stage is skipped, as the stage
    itself says)."""
    check_ranges(cfg, "", RUN_RANGES)
    resolve_dtype(cfg.model.dtype)  # known names, and a CUDA device only where there is one
    resolve_device(cfg.model.device)
    quantized_by = None
    for name in stages:
        if quantized_by and (name == "prune" or (name == "quantize" and quantized_by == "quantize")):
            raise ShrinkError(f"pipeline.stages: {name} after {quantized_by}: the model is quantized by then "
                              f"(order the stages prune, quantize)")
        if name == "quantize" or (name == "prune" and cfg.prune.joint_quant):
            quantized_by = quantized_by or name


def refuse_quantized(state: "RunState", stage: str) -> None:
    packed = [name for name, module in state.model.named_modules() if is_packed_linear(module)]
    if not packed:
        return
    qcfg = getattr(state.model.config, "quantization_config", None) or {}
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    what = f"{qcfg.get('quant_method', 'quantized')}, {qcfg.get('bits', '?')}-bit"
    raise ShrinkError(f"model.path: {state.cfg.model.path} is already quantized ({what}: {len(packed)} packed "
                      f"Linears); {stage} needs the floating-point model it was made from")


def check_export_range(state: "RunState", targets: set[str]) -> None:
    """Every float tensor a GPTQ export writes in quant.export_dtype (all but the weights of the
    Linears it packs: `targets`, and the ends quant.lm_head / quant.embed_bits pack) fits that dtype."""
    from quant.export import EXPORT_DTYPE_HINT, export_float_dtype

    dtype = export_float_dtype(state.cfg.quant)
    if dtype is None:
        return
    packed = {f"{name}.weight" for name in targets}
    ends = embedding_names(state.model)
    if ends is not None:
        packed |= {ends[1]} if state.cfg.quant.lm_head else set()
        packed |= {ends[0]} if state.cfg.quant.embed_bits is not None else set()
    tensors = [(n, t) for n, t in state.model.state_dict().items() if n not in packed]
    check_narrowing(tensors, dtype, "quant.export_dtype", EXPORT_DTYPE_HINT)


def ready_compression(state: "RunState", stage: str, skip: Any, label: str, quantizes: bool) -> dict[str, Any]:
    """The model is not quantized yet, the stage reaches min_coverage, and (quantizes) the export's
    float tensors fit quant.export_dtype; returns the Linears the stage compresses, by full name."""
    refuse_quantized(state, stage)
    split_experts(state.model)  # as the stage will: coverage counts the experts it reaches
    parent, targets = compression_targets(state.model, list(skip), state.cfg.min_coverage, label)
    linears = {f"{parent}.{i}.{n}": module for i, layer in enumerate(targets) for n, module in layer.items()}
    if quantizes:
        check_export_range(state, set(linears))
    return linears


def ready_quantize(state: "RunState") -> None:
    quant = state.cfg.quant
    if state.quantization_config is None:  # else skipped: a joint prune+quantize did it
        ready_compression(state, "quantize", quant.skip, f"{quant.method} {quant.bits}-bit", quantizes=True)


def ready_prune(state: "RunState") -> None:
    """ready_compression, and an N:M pattern's M divides every pruned Linear's inputs."""
    from prune.config import check_pattern_fits

    prune = state.cfg.prune
    targets = ready_compression(state, "prune", prune.skip, f"{prune.method} {prune.pattern}",
                                quantizes=prune.joint_quant)
    for name, module in targets.items():
        check_pattern_fits(name, linear_dims(module)[0], prune.pattern)


def ready_distill(state: "RunState") -> None:
    """The student's depth against the teacher's, and the layer map against both (a pretrained
    student's depth is known once it loads)."""
    from distill.layer_map import parse_layer_map
    from distill.student import kept_layers

    distill = state.cfg.distill
    n_teacher = len(find_decoder_layers(state.model)[1])
    init = distill.student.init
    if init in ("skip", "width"):
        n_student = len(kept_layers(distill.student, n_teacher))
    elif init == "scratch":
        n_student = distill.student.num_layers or n_teacher
    else:
        return
    if "distill" in state.cfg.pipeline.stages and n_student > 0:
        parse_layer_map(distill.layer_map, n_student, n_teacher)
