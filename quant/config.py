"""Schema of the `quant` config group."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.config import NON_NEGATIVE, OPEN_FRACTION, POSITIVE, ROUTER_PATTERNS, Range, check_ranges
from engine.errors import ShrinkError
from quant.grid import SUPPORTED_BITS, ScaleSearch


@dataclass
class QuantConfig:
    method: str = "gptq"  # gptq | rtn
    bits: int = 4  # 2 | 3 | 4 | 8
    group_size: int = 128  # -1 = one grid per output channel
    sym: bool = False
    act_order: bool = False  # GPTQ desc_act: columns by descending diag(H)
    static_groups: bool = False  # with act_order: groups fitted before permuting
    true_sequential: bool = True  # quantize attention before MLP inside a layer
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # lazy-update block of the column sweep
    # Keep calibration activations on the CPU: true | false | null (auto: when they would
    # take more than half of the free device memory).
    offload_activations: Optional[bool] = None
    # Decoder-layer modules kept in full precision (fnmatch on the name inside the layer or its
    # last part); MoE routers by default.
    skip: list[str] = field(default_factory=lambda: list(ROUTER_PATTERNS))
    # dtype of the tensors a GPTQ export keeps in floating point (embeddings, lm_head, norms,
    # routers, biases): float16 as gptqmodel/AutoGPTQ write them | bfloat16 | float32 |
    # null (model.dtype). The model is rounded to it right after quantizing, so what is
    # evaluated is what is exported.
    export_dtype: Optional[str] = "float16"
    # The checkpoint layout of the export (quant/layout.py): gptq | awq (asymmetric 4-bit as vLLM
    # reads it) | auto: awq where it holds the grids exactly and vLLM reads nothing else (4-bit,
    # asymmetric, groups, no act-order g_idx, no packed ends), gptq otherwise.
    export_format: str = "auto"
    # The model's ends (quant/ends.py; read by gptqmodel and shrink's loader, the embedding not
    # by transformers + optimum): lm_head quantized like the decoder Linears (GPTQ calibrated
    # on the quantized model's final hidden states), and the input embedding rounded to
    # embed_bits in groups of embed_group_size tokens (null: kept in floating point).
    lm_head: bool = False
    embed_bits: Optional[int] = None
    embed_group_size: int = 32
    # Each group's clipping range chosen by grid search (quant/grid.py): null (min/max) | mse (the
    # shrunk range with the least sum |w - q|^scale_norm, as gptqmodel's mse) | hessian (GPTQ only:
    # each column's error weighted by the sweep's OBS cost 1/[Hinv]_jj^2). Candidates: the min/max
    # range times p = 1 - k/scale_steps, k < scale_max_shrink * scale_steps. Same packing.
    scale_search: Optional[str] = None
    scale_steps: int = 100
    scale_max_shrink: float = 0.8
    scale_norm: float = 2.0
    # GPTAQ (asymmetric calibration, GPTQ only): each Linear also sees its inputs in the
    # full-precision model and takes on, with strength gptaq_alpha, the error the compressed
    # layers before it put into its inputs. Costs a second stream of activations and 3x the
    # x^T x products.
    gptaq: bool = False
    gptaq_alpha: float = 0.25
    # Block-output refinement (quant/refine.py, GPTQ only, one process): after each decoder
    # layer's GPTQ solve, refine_steps signed-gradient steps on every weight's rounding and every
    # group's scale for the layer's output error against the full-precision model's, on
    # refine_windows calibration windows a step, the step size decaying from refine_lr to 0.
    # 0 steps: off. Same packing.
    refine_steps: int = 0
    refine_lr: float = 0.005
    refine_windows: int = 2


def packs_ends(quant: "QuantConfig") -> bool:
    """Whether the quantize stage also packs the model's ends (quant/ends.py); takes the
    dataclass or the composed DictConfig."""
    return bool(quant.lm_head) or quant.embed_bits is not None


METHODS = ("gptq", "rtn")
SCALE_SEARCHES = ("mse", "hessian")
EXPORT_DTYPES = ("float16", "bfloat16", "float32")
RANGES: dict[str, Range] = {
    "damp": OPEN_FRACTION,  # transformers and gptqmodel refuse a checkpoint whose damp_percent is outside (0, 1)
    "block_size": POSITIVE, "gptaq_alpha": Range(0, 1, open_low=True), "refine_steps": NON_NEGATIVE,
    "refine_lr": Range(0, 0.5, open_low=True), "refine_windows": Range(1)}
EXPORT_FORMATS = ("auto", "gptq", "awq")


def check_quant_config(quant: QuantConfig) -> None:
    if quant.method not in METHODS:
        raise ShrinkError(f"quant.method: unknown method {quant.method!r} (gptq | rtn)")
    if quant.bits not in SUPPORTED_BITS:
        raise ShrinkError(f"quant.bits: {quant.bits} is not supported ({' | '.join(map(str, SUPPORTED_BITS))})")
    if quant.group_size != -1 and quant.group_size <= 0:
        raise ShrinkError(f"quant.group_size: {quant.group_size} must be -1 (per channel) or positive")
    if quant.static_groups and quant.group_size == -1:
        raise ShrinkError("quant.static_groups: needs a group size (quant.group_size > 0)")
    if quant.export_dtype is not None and quant.export_dtype not in EXPORT_DTYPES:
        raise ShrinkError(f"quant.export_dtype: {quant.export_dtype!r} is not one of {' | '.join(EXPORT_DTYPES)} | null")
    if quant.embed_bits is not None and quant.embed_bits not in SUPPORTED_BITS:
        raise ShrinkError(f"quant.embed_bits: {quant.embed_bits} is not supported "
                          f"({' | '.join(map(str, SUPPORTED_BITS))} | null)")
    if quant.embed_group_size != -1 and quant.embed_group_size <= 0:
        raise ShrinkError(f"quant.embed_group_size: {quant.embed_group_size} must be -1 or positive")
    check_ranges(quant, "quant", RANGES)
    check_export_format(quant)
    check_scale_search(quant)
    for key in ("gptaq", "refine_steps"):  # both work on the calibration data GPTQ gets
        if getattr(quant, key) and quant.method != "gptq":
            raise ShrinkError(f"quant.{key}: needs calibration (quant.method=gptq, not {quant.method})")


def awq_refusal(quant: QuantConfig) -> Optional[str]:
    """Why AWQ's GEMM layout cannot hold these settings' result exactly (None: it can)."""
    if quant.bits != 4:
        return f"awq holds 4-bit codes only (quant.bits={quant.bits}); use gptq"
    if quant.group_size <= 0:
        return "awq needs groups (quant.group_size > 0)"
    if quant.act_order and quant.method == "gptq" and not quant.static_groups:
        return "awq has no g_idx for act-order groups; set quant.static_groups=true or use gptq"
    if packs_ends(quant):
        return "awq cannot hold packed ends (quant.lm_head / quant.embed_bits); use gptq"
    return None


def check_export_format(quant: QuantConfig) -> None:
    """quant.export_format=awq only where AWQ's GEMM layout holds the result exactly."""
    fmt = quant.export_format
    if fmt not in EXPORT_FORMATS:
        raise ShrinkError(f"quant.export_format: {fmt!r} is not one of {' | '.join(EXPORT_FORMATS)}")
    refusal = awq_refusal(quant) if fmt == "awq" else None
    if refusal is not None:
        raise ShrinkError(f"quant.export_format: {refusal}")


def export_format(quant: QuantConfig) -> str:
    """gptq or awq: quant.export_format with auto resolved (see the field's comment)."""
    if quant.export_format != "auto":
        return quant.export_format
    return "awq" if not quant.sym and awq_refusal(quant) is None else "gptq"


def check_scale_search(quant: QuantConfig) -> None:
    if quant.scale_search is not None and quant.scale_search not in SCALE_SEARCHES:
        raise ShrinkError(f"quant.scale_search: {quant.scale_search!r} is not one of "
                          f"{' | '.join(SCALE_SEARCHES)} | null")
    if quant.scale_search == "hessian" and quant.method != "gptq":
        raise ShrinkError("quant.scale_search: hessian weights by the GPTQ sweep's Hessian; with "
                          f"quant.method={quant.method} use mse")
    problem = ScaleSearch(quant.scale_steps, quant.scale_max_shrink, quant.scale_norm).problem()
    if problem is not None:
        raise ShrinkError(f"quant.scale_{problem[0]}: {problem[1]}")


def scale_search(quant: "QuantConfig") -> Optional[ScaleSearch]:
    """The grid search quant.scale_search asks for (None: min/max)."""
    if quant.scale_search is None:
        return None
    return ScaleSearch(quant.scale_steps, quant.scale_max_shrink, quant.scale_norm,
                       weighted=quant.scale_search == "hessian")
