"""The ONE layer-by-layer calibration engine, shared by pruning and quantization.

1. Capture the inputs of decoder layer 0 with ALL their call kwargs (attention mask,
   position ids/embeddings, cache flags), and every later layer's own kwargs (sliding-
   window layers get other masks), by running the base model with layer 0 and
   recording stand-ins for the others (so no lm_head and no other layer runs).
2. Per layer: move it to the device; find which Linears read the same input tensor
   (q/k/v, gate/up) so they share ONE Hessian; hook them, run the calibration
   batches, hand each Linear and its Hessian to the compressor; with true-sequential
   the groups are done in execution order, each seeing the already-compressed ones:
   in ONE forward per layer (engine/lockstep.py: every batch pauses before each group
   until all have got there, the group is compressed, the forwards go on and end with
   the next layer's inputs), bitwise equal to re-running the layer per group, which
   remains (whole forwards, never stopped half-way) for expert layers and layers that
   call a Linear twice or not at all;
   otherwise re-run the compressed layer so its outputs feed the next layer; move it back.
Mixture-of-experts blocks are first split into per-expert Linears (engine/experts.py), so
each expert gets its own Hessian from the tokens routed to it, captured inside the block's
own forward; with moe.all_experts every token also runs through every expert for the
statistics only (the block output keeps the true top-k routing). The experts of one block
are independent problems: with true-sequential all their gate/up Linears share one pass and
all their down Linears the next. An expert whose statistics saw fewer than moe.min_tokens
tokens is handed to the compressor without a Hessian (`fallback`: RTN / magnitude).
Only one layer and the activations are on the device at a time, so peak device
memory does not grow with depth. The engine knows no algorithm: a compressor edits
the weights in place and returns its own stats.
"""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn

from engine.config import AUTOCAST_SETTING, MoeConfig
from engine.coverage import compression_targets, coverage
from engine.distributed_calib import CalibComm
from engine.errors import ShrinkError
from engine.fingerprint import fingerprint
from engine.experts import SplitExperts, split_experts, split_modules
from engine.hessian import HessianAccumulator, HessianError
from engine.layer_checkpoint import LayerCheckpoint
from engine.lockstep import Lockstep, available_memory
from engine.modeling import find_decoder_layers, find_linears, weight_matrix
from engine.weights import MODEL_DTYPE_HINT, narrow
from engine.reference import ReferenceInputs, reference_of

log = logging.getLogger(__name__)


@dataclass
class LinearJob:
    layer_index: int
    num_layers: int
    name: str  # qualified name inside the decoder layer, e.g. "self_attn.q_proj"
    full_name: str  # qualified name inside the model
    module: nn.Module
    hessian: Optional[HessianAccumulator]  # None when the compressor needs no data
    # An expert that saw fewer than moe.min_tokens tokens: no Hessian, use the method's
    # calibration-free fallback (RTN / magnitude).
    fallback: bool = False
    # Jobs of the same pass that may be solved together with this one (every expert of one
    # block in the same role, same shape, each with its own Hessian); [self] otherwise. A
    # compressor may solve them all at the first and write each when its own job comes.
    batch: Optional[list["LinearJob"]] = None
    stat_tokens: Optional[int] = None  # rows its Hessian was accumulated from

    @property
    def cross(self) -> Optional[torch.Tensor]:
        """With the reference stream (compress_model(paired=True)): 2/n sum (x~ - x) x^T over the
        tokens, x~ this Linear's input in the uncompressed model, x its input here; else None."""
        return reference_of(self.hessian)


Compressor = Callable[[LinearJob], dict[str, Any]]


@dataclass
class LayerOutputs:
    """What an after-layer hook gets once every Linear of a decoder layer is compressed: the layer,
    its calibration inputs (from the compressed layers before it) and the outputs the uncompressed
    layer gave on the reference stream (targets[b]: batch b's first rows only when
    compress_model's `reference_rows` says so). The hook may change the layer's weights; the engine then
    recomputes its outputs for the next layer."""
    index: int
    layer: nn.Module
    inputs: list["LayerBatch"]
    targets: list[torch.Tensor]
    linears: dict[str, nn.Module]  # the compressed Linears, by name inside the layer
    full_names: dict[str, str]  # name inside the layer -> full name
    device: torch.device


AfterLayer = Callable[[LayerOutputs], dict[str, Any]]


@dataclass
class LayerBatch:
    """The recorded call of a decoder layer for one calibration batch."""
    args: tuple
    kwargs: dict[str, Any]

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, h: torch.Tensor) -> "LayerBatch":
        if self.args:
            return LayerBatch((h, *self.args[1:]), self.kwargs)
        return LayerBatch(self.args, {**self.kwargs, "hidden_states": h})

    def to(self, device: torch.device) -> "LayerBatch":
        return LayerBatch(tuple(_move(a, device) for a in self.args),
                          {k: _move(v, device) for k, v in self.kwargs.items()})

    def select(self, rows: slice) -> "LayerBatch":
        """The call for some of the batch's windows: every tensor whose first dimension is the
        batch's (hidden states, per-window masks and position embeddings) sliced; tensors shared
        by every window (a [1, ...] mask or rotary table) kept whole."""
        n = self.hidden().shape[0]
        return LayerBatch(tuple(_rows(a, n, rows) for a in self.args),
                          {k: _rows(v, n, rows) for k, v in self.kwargs.items()})


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


def _rows(value: Any, n: int, rows: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_rows(v, n, rows) for v in value)
    return value


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _CallRecorder(nn.Module):
    """Stands in for decoder layer i >= 1 during capture: records the call's kwargs (masks and
    position embeddings may differ per layer, e.g. sliding-window layers) and passes the hidden
    states through untouched, in the structure layer 0 returned. Attributes the model's loop
    may read are looked up on the real layer (kept out of the module tree, so it stays put)."""

    def __init__(self, layer: nn.Module, record: Callable[[tuple, dict], None], template: list[Any]) -> None:
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_record"], self.__dict__["_template"] = layer, record, template

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._record(args, kwargs)
        h = args[0] if args else kwargs["hidden_states"]
        out = self._template[-1]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)


@torch.no_grad()
def capture_layer_calls(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                        store: torch.device, dtype: Optional[torch.dtype] = None) -> list[list[LayerBatch]]:
    """calls[i][j]: the args and kwargs decoder layer i receives for calibration batch j.

    Only the embeddings run, plus layer 0 on the first batch (to learn the structure of a
    layer's output); otherwise every layer is a stand-in that records its own kwargs (so
    per-layer masks/positions are right) and passes the hidden states on. Layers >= 1 are
    stored without hidden states (None): the engine feeds each layer the previous layer's
    compressed outputs. A tensor passed to
    several layers (the usual case) is stored once per batch; floating ones in `dtype` if given."""
    parent_name, layers = find_decoder_layers(model)
    parent = model.get_submodule(parent_name.rsplit(".", 1)[0]) if "." in parent_name else model
    attr = parent_name.rsplit(".", 1)[-1]
    calls: list[list[LayerBatch]] = [[] for _ in layers]
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, stored copy), one batch
    template: list[Any] = []

    def keep(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in stored:
                wide = dtype is not None and value.is_floating_point()
                stored[id(value)] = (value, value.to(store, dtype) if wide else value.to(store))
            return stored[id(value)][1]
        return tuple(keep(v) for v in value) if isinstance(value, tuple) else value

    def recorder(i: int) -> Callable[[tuple, dict], None]:
        def record(args: tuple, kwargs: dict) -> None:
            batch = LayerBatch(args, kwargs) if i == 0 else LayerBatch(args, kwargs).with_hidden(None)
            calls[i].append(LayerBatch(tuple(keep(a) for a in batch.args),
                                       {k: keep(v) for k, v in batch.kwargs.items()}))
        return record

    stand_ins = [_CallRecorder(layer, recorder(i), template) for i, layer in enumerate(layers)]
    setattr(parent, attr, nn.ModuleList([layers[0], *stand_ins[1:]]))
    handles = [layers[0].register_forward_pre_hook(lambda _m, a, kw: recorder(0)(a, kw), with_kwargs=True),
               layers[0].register_forward_hook(lambda _m, _i, out: template.append(out))]
    base = model.base_model
    try:
        base.to(device)
        for start in range(0, windows.shape[0], batch_size):
            stored.clear()
            if start:  # layer 0's output structure is known now: it need not run again
                setattr(parent, attr, nn.ModuleList(stand_ins))
            base(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        base.to("cpu")
        setattr(parent, attr, layers)
        stored.clear()
    return calls


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch], device: torch.device,
              store: torch.device | None) -> list[torch.Tensor] | None:
    """Run every batch through the layer; keep outputs (on `store`) unless store is None."""
    outputs = []
    for batch in batches:
        moved = batch.to(device)
        out = _first(layer(*moved.args, **moved.kwargs))
        if store is not None:
            outputs.append(out.to(store))
    return outputs if store is not None else None


def discover(layer: nn.Module, batch: LayerBatch, device: torch.device,
             linears: Optional[dict[str, nn.Module]] = None) -> tuple[list[list[str]], bool, float]:
    """(input groups, irregular, FLOPs of this batch's forward).

    Groups are the Linears that read the same input tensor, in execution order; a Linear the
    batch did not reach (an expert no token was routed to) forms a group of its own.
    Irregular: a Linear ran more than once, or not at all (it may run for other batches), so
    the groups' order need not be the same in every forward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    linears = find_linears(layer) if linears is None else linears
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    calls: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # keeps inputs alive so their ids stay unique during the pass

    def hook(name: str):
        def fn(_m: nn.Module, inp: tuple, _out: Any) -> None:
            keep.append(inp[0])
            calls[name] = calls.get(name, 0) + 1
            key = id(inp[0])
            if key not in seen:
                seen[key] = []
                order.append(key)
            if name not in seen[key]:
                seen[key].append(name)
        return fn

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    # the CPU's fused attention kernel has no formula of its own in torch's counter
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *_a, out_shape=None, **_k: sdpa_flop_count(q, k, v)}
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
            run_layer(layer, [batch], device, None)
    finally:
        for h in handles:
            h.remove()
    groups = [seen[k] for k in order]
    missing = [n for n in linears if not any(n in g for g in groups)]
    irregular = bool(missing) or any(c > 1 for c in calls.values())
    return groups + [[n] for n in missing], irregular, float(counter.get_total_flops())


def input_groups(layer: nn.Module, batch: LayerBatch, device: torch.device,
                 linears: Optional[dict[str, nn.Module]] = None) -> list[list[str]]:
    """Linears grouped by the input tensor they read, in execution order."""
    return discover(layer, batch, device, linears)[0]


def accumulate(layer: nn.Module, groups: list[list[str]], batches: list[LayerBatch],
               device: torch.device, full: bool = True,
               linears: Optional[dict[str, nn.Module]] = None,
               clock: Optional["LayerProfile"] = None,
               chain: Optional[Callable[[HessianAccumulator, list[torch.Tensor]], None]] = None,
               refs: Optional[ReferenceInputs] = None) -> dict[str, HessianAccumulator]:
    """One Hessian per input group, shared by the Linears of the group (only its
    diagonal unless `full`), from whole forwards of the layer over every batch (the
    reference path: nothing stops a forward half-way). With `chain` (torchrun), each
    group's inputs are kept and handed to chain(acc, inputs) after the forwards, group
    after group: the ranks then add them in window order, as one process adds them."""
    linears = find_linears(layer) if linears is None else linears
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    kept: dict[int, list[torch.Tensor]] = {}
    clock = clock if clock is not None else LayerProfile(-1)
    start, hessian_before = time.perf_counter(), clock.hessian_seconds

    current = [0]  # the batch being run

    def hook(acc: HessianAccumulator, name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, inp: tuple, _o: Any) -> None:
            x = refs.pair(acc, name, current[0], inp[0]) if refs is not None else inp[0]
            if chain is not None:
                kept[id(acc)].append(x)
                return
            with clock.timing("hessian_seconds", device):
                acc.add(x)
        return fn

    accs = _accumulators(linears, groups, device, full, refs)
    for group, acc in zip(groups, accs):
        kept[id(acc)] = []
        for name in group:
            hessians[name] = acc
        handles.append(linears[group[0]].register_forward_hook(hook(acc, group[0])))
    try:
        for b, batch in enumerate(batches):
            current[0] = b
            run_layer(layer, [batch], device, None)
    finally:
        for h in handles:
            h.remove()
    clock.forward_seconds += time.perf_counter() - start - (clock.hessian_seconds - hessian_before)
    clock.forwards += 1
    for acc in accs if chain is not None else []:
        with clock.timing("hessian_seconds", device):
            chain(acc, kept.pop(id(acc)))
    return hessians


def accumulator_dtype(linear: nn.Module) -> torch.dtype:
    """Hessians are summed in float64 when the layer computes in float64 (an fp64 calibration, see
    `calibrating`), else in float32."""
    return torch.float64 if weight_matrix(linear).dtype == torch.float64 else torch.float32


def new_accumulator(linear: nn.Module, device: torch.device, full: bool) -> HessianAccumulator:
    """The Hessian of a Linear's inputs, in accumulator_dtype."""
    return HessianAccumulator(weight_matrix(linear).shape[1], device, full, accumulator_dtype(linear))


def _accumulators(linears: dict[str, nn.Module], groups: list[list[str]], device: torch.device,
                  full: bool, refs: Optional[ReferenceInputs] = None) -> list[HessianAccumulator]:
    """One accumulator per input group (paired with the reference stream where `refs` pairs it)."""
    if refs is not None:
        return [refs.accumulator(g[0], weight_matrix(linears[g[0]]).shape[1], device, full,
                                 accumulator_dtype(linears[g[0]])) for g in groups]
    return [new_accumulator(linears[g[0]], device, full) for g in groups]


@dataclass
class LayerProfile:
    """Where one decoder layer's calibration time went, next to the arithmetic it needed."""
    layer: int
    forward_seconds: float = 0.0  # the layer's forwards over the calibration batches
    hessian_seconds: float = 0.0  # the x^T x products
    compress_seconds: float = 0.0  # the compressor (its own stats split it further)
    after_layer_seconds: float = 0.0  # the compressor's after-layer hook (compress_model(after_layer=))
    after_layer: dict[str, Any] = field(default_factory=dict)  # and the figures it returned
    forwards: float = 0.0  # forwards over all batches run, in units of one full pass
    forward_flops: float = 0.0  # FLOPs of ONE forward over all calibration windows
    hessian_flops: float = 0.0  # 2 n cols^2 per input group (the full product's count)

    @contextmanager
    def timing(self, key: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":  # time the work, not the queueing
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            setattr(self, key, getattr(self, key) + time.perf_counter() - start)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def add_compressor_seconds(profile: list[dict[str, Any]], report: list[dict[str, Any]],
                           keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The per-layer profile with the compressor's own timings (e.g. its sweep and packing
    seconds, per Linear in `report`) summed per layer next to the engine's."""
    for entry in profile:
        rows = [r for r in report if r["layer"] == entry["layer"]]
        entry.update({key: sum(r.get(key, 0.0) for r in rows) for key in keys})
    return profile


def linear_fingerprint(module: nn.Module, acc: Optional[HessianAccumulator]) -> dict[str, Optional[str]]:
    """Fingerprints of the statistic a Linear was compressed with (H, or diag(H) where only that
    is kept; None without data) and of its weights after compression (engine/fingerprint.py)."""
    stat = None if acc is None else (acc.H if acc.H is not None else acc.diagonal())
    return {"hessian": fingerprint(stat) if stat is not None else None, "weights": fingerprint(weight_matrix(module))}


def relative_error(W0: torch.Tensor, W1: torch.Tensor, acc: Optional[HessianAccumulator]) -> float:
    """||(W0-W1) X^T||^2 / ||W0 X^T||^2 = tr(D H D^T) / tr(W H W^T); with only diag(H)
    kept, the same with H replaced by its diagonal (Wanda's own error model); in weight
    space if there is no data at all."""
    dtype = acc.dtype if acc is not None else torch.float32
    D, W = (W0 - W1).to(dtype), W0.to(dtype)
    if acc is None:
        return float((D * D).sum() / (W * W).sum().clamp_min(1e-30))
    if acc.H is None:
        h = acc.diagonal()
        return float((D * D * h).sum() / (W * W * h).sum().clamp_min(1e-30))
    num = (D @ acc.H * D).sum()
    den = (W @ acc.H * W).sum().clamp_min(1e-30)
    return float(num / den)


def activation_store(model: nn.Module, windows: torch.Tensor, device: torch.device, offload: Optional[bool],
                     dtype: Optional[torch.dtype] = None, streams: int = 1) -> torch.device:
    """Where calibration activations live: on the device unless asked otherwise or they
    would take more than half of its free memory (inputs + outputs of one layer, in the
    calibration's dtype (None: the model's), for each of `streams`: 2 with the reference stream)."""
    if offload is not None or device.type != "cuda":
        return torch.device("cpu") if offload else device
    hidden = model.config.get_text_config().hidden_size
    dtype_bytes = (torch.empty((), dtype=dtype) if dtype is not None else next(model.parameters())).element_size()
    needed = 2 * streams * windows.numel() * hidden * dtype_bytes
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free / 2:
        log.info("calibration activations (%.1f GiB) offloaded to the CPU", needed / 2**30)
        return torch.device("cpu")
    return device


@contextmanager
def expert_mode(layer: nn.Module, all_tokens: bool, count: bool) -> Iterator[None]:
    """Split experts of the layer run every token through every expert (statistics only)
    and/or count the tokens routed to each, for the duration of the block."""
    blocks = split_modules(layer)
    for block in blocks:
        block.all_tokens, block.count = all_tokens, count
    try:
        yield
    finally:
        for block in blocks:
            block.all_tokens = block.count = False


def expert_roles(layer: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Linear name inside the layer -> (experts block name, expert index, role 0 gate/1 up/2 down)."""
    roles = {}
    for block_name, block in layer.named_modules():
        if isinstance(block, SplitExperts):
            for e, expert in enumerate(block):
                for role, child in enumerate(expert.names):
                    if hasattr(expert, child):
                        roles[f"{block_name}.{e}.{child}"] = (block_name, e, role)
    return roles


def sequential_passes(groups: list[list[str]], roles: dict[str, tuple[str, int, int]]) -> list[list[list[str]]]:
    """True-sequential passes: one per input group, except that the groups of one experts
    block and one role (every expert's gate/up, then every expert's down) share a pass,
    since no expert's input depends on another expert's weights."""
    passes: list[list[list[str]]] = []
    slot: dict[tuple[str, bool], int] = {}
    for group in groups:
        keys = {(roles[n][0], roles[n][2] == 2) for n in group if n in roles}
        key = next(iter(keys)) if len(keys) == 1 and all(n in roles for n in group) else None
        if key is not None and key in slot:
            passes[slot[key]].append(group)
            continue
        if key is not None:
            slot[key] = len(passes)
        passes.append([group])
    return passes


def calibration_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """data.calib.dtype as compress_model's `dtype`: auto is float64 on the CPU (see `calibrating`),
    the model's own elsewhere (GPUs compute float64 far slower, and have less memory for it);
    bfloat16-autocast keeps float32 (its products' precision is calibration_autocast's)."""
    if setting == "auto":
        return torch.float64 if device.type == "cpu" else None
    if setting == AUTOCAST_SETTING:
        return torch.float32
    return None if setting == "model" else getattr(torch, setting)



def calibration_autocast(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """data.calib.dtype as compress_model's `autocast`: bfloat16 for bfloat16-autocast, else None.
    A CPU without native bfloat16 (no AVX512-BF16 or AMX) emulates it, slower than float32: a warning says so."""
    if setting != AUTOCAST_SETTING:
        return None
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("data.calib.dtype=%s: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so the "
                    "products are emulated and slower than data.calib.dtype=float32", setting)
    return torch.bfloat16


def calibration_facts(dtype: Optional[torch.dtype], device: torch.device,
                      autocast: Optional[torch.dtype] = None) -> dict[str, Any]:
    """What besides its inputs decides a calibration's rounding, for the stage's report: the
    precision, and the kernels' instruction set and thread count (which decide it in float32)."""
    return {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else "model", "device": device.type,
            **({"autocast": str(autocast).removeprefix("torch.")} if autocast is not None else {}),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


@contextmanager
def calibrating(layer: nn.Module, device: torch.device, dtype: Optional[torch.dtype],
                autocast: Optional[torch.dtype] = None) -> Iterator[Callable[[nn.Module, str], None]]:
    """The layer on `device` while it is calibrated, its floating parameters and buffers in `dtype`
    (None: as they are), its forwards (on any thread: the lockstep's, refinement's) under
    torch.autocast to `autocast` when given (the Hessian sums opt out, see engine.hessian.add_gram_);
    after, on the CPU, each in its own dtype again. Yields settle(module, name),
    which rounds a module's parameters to the dtypes they are stored in (refusing, in one line
    naming the tensor, a value beyond that dtype's range): a compressed Linear's
    new weights, before the forwards go on through it, are then exactly those the model keeps.

    Why float64 (the default on the CPU): the BLAS and ATen kernels a machine picks (AVX-512 or
    AVX2 code paths, its thread count) round float32 differently, and GPTQ's rounding decisions
    amplify any such difference: one flipped code moves its row's later columns, the layer's
    outputs, and every later layer's Hessian. Computed in float64, the differences stay about
    1e-16 and no decision flips, so the codes depend on the model and the data only.
    """
    layer.to(device)  # first: moving a layer replaces its buffers
    tensors = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()]
    own = {id(t): t.dtype for t in tensors}
    if dtype is not None:
        for t in tensors:
            t.data = t.data.to(dtype)

    def settle(module: nn.Module, name: str) -> None:
        for leaf, p in module.named_parameters():
            stored = own.get(id(p), p.dtype)
            if stored != p.dtype:
                p.data.copy_(narrow(p.data, stored, f"{name}.{leaf}", "model.dtype", MODEL_DTYPE_HINT))

    # the instance's own forward (accelerate's hooks set one) comes back after; else the class's
    own_forward = layer.__dict__.get("forward")
    if autocast is not None:
        layer.forward = _autocast_forward(layer.forward, device.type, autocast)
    try:
        yield settle
    finally:
        if autocast is not None:
            del layer.forward
            if own_forward is not None:
                layer.forward = own_forward
        for t in tensors:
            t.data = t.data.to(own[id(t)])
        layer.to("cpu")


def _autocast_forward(forward: Callable[..., Any], device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
    """forward under its own torch.autocast (autocast's state is per thread: each call enters it)."""
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)
    return run


def compress_model(model: nn.Module, windows: Optional[torch.Tensor], compressor: Compressor,
                   device: torch.device, true_sequential: bool = True, batch_size: int = 8,
                   offload_activations: Optional[bool] = None, label: str = "compress",
                   full_hessian: bool = True, skip: Sequence[str] = (), moe: Optional[MoeConfig] = None,
                   min_coverage: float = 0.0, profile: Optional[list[dict[str, Any]]] = None,
                   comm: Optional[CalibComm] = None, lockstep_memory: Optional[int] = None,
                   checkpoint: Optional[LayerCheckpoint] = None, stream: Optional["LayerStream"] = None,
                   dtype: Optional[torch.dtype] = None, autocast: Optional[torch.dtype] = None,
                   paired: bool = False, after_layer: Optional[AfterLayer] = None,
                   reference_rows: Optional[Callable[[list[int]], int]] = None,
                   _rerun: bool = False) -> list[dict[str, Any]]:
    """Compress every Linear of every decoder layer (fused experts split first; names matching
    `skip` left alone); returns a per-Linear report. `full_hessian=False` hands the compressor
    accumulators holding only diag(H). Fails before touching a weight if the Linears reached
    hold under `min_coverage` of the decoder-layer weights. `profile`, when given, receives
    one LayerProfile dict per layer. `lockstep_memory`: bytes the paused lockstep forwards may
    keep (None: half of the memory available when a layer starts); batches beyond it are
    recomputed, with the same results. `_rerun` makes true-sequential run one forward per input
    group (the reference path) instead of one lockstep forward per layer. With `comm` (torchrun)
    this rank calibrates on its share of the windows and the Linears are compressed by their
    owner ranks (engine/distributed_calib.py). `checkpoint` (engine/layer_checkpoint.py), when
    given, restores the layers a killed run finished and goes on from there, and is handed
    every finished layer with the next layer's inputs (one process only: under torchrun the
    ranks would have to restore together, so the pipeline gives none). `stream` (a lazy model,
    engine/streaming.py) reads each layer in before its turn and takes it when done. `dtype`: the
    precision the calibration computes in (the captured inputs, each layer while it is calibrated,
    the Hessians in float64 when it is float64; see `calibrating`); None: the model's own. `autocast`:
    the dtype of the layer forwards' matrix products (torch.autocast), None: `dtype`.
    `paired` or `after_layer` keep the reference stream (engine/reference.py: the uncompressed
    model's layer inputs, each layer run on them before it is compressed): with `paired` every
    Linear's statistics pair its inputs with its reference inputs (LinearJob.cross); `after_layer`
    is called with each compressed layer, its inputs and its reference outputs (LayerOutputs),
    may change its weights, and its figures go into the layer's profile (one process only).
    `reference_rows` (an after-layer hook that reads the head of each batch only, without `paired`):
    from the batches' sizes, how many windows at the head of each the reference stream keeps: its
    forwards then cost that share of a pass, and LayerOutputs.targets hold those rows."""
    if comm is not None and after_layer is not None:
        raise ValueError("compress_model: an after-layer hook sees one rank's windows only (not under torchrun)")
    moe = moe or MoeConfig()
    split_experts(model)
    parent_name, layers = find_decoder_layers(model)
    targets = compression_targets(model, skip, min_coverage, label)[1]
    if comm is not None:  # distributed: this rank's share of the windows
        comm.check_layers(targets)
        windows = comm.shard(windows, "data.calib.num_samples") if windows is not None else None
    # the reference stream: the uncompressed model's inputs of each layer (layer 0's are the same)
    reference = windows is not None and (paired or after_layer is not None)
    store = activation_store(model, windows, device, offload_activations, dtype, 2 if reference else 1) \
        if windows is not None else device
    calls = capture_layer_calls(model, windows, batch_size, device, store, dtype) if windows is not None else None
    hidden = [b.hidden() for b in calls[0]] if calls is not None else None
    ref_rows = reference_rows([h.shape[0] for h in hidden]) if reference and reference_rows and not paired else None
    ref_hidden = [h[:ref_rows] for h in hidden] if reference else None
    report: list[dict[str, Any]] = []
    resumed = checkpoint.restore(layers) if checkpoint is not None else None
    first_layer = 0
    if resumed is not None:  # the layers a killed run finished, and the next one's inputs
        first_layer, hidden = resumed.start, [h.to(store) for h in resumed.hidden] if calls is not None else None
        if reference:  # saved as one list: the compressed stream's batches, then the reference's
            hidden, ref_hidden = hidden[:len(calls[0])], hidden[len(calls[0]):]
        report += resumed.report
        if profile is not None:
            profile.extend(resumed.profile)
    total = time.time()
    for i, layer in enumerate(layers):
        if i < first_layer:
            if calls is not None:
                calls[i] = []
            continue
        start = time.time()
        if stream is not None:
            stream.load(i, layer)
        with calibrating(layer, device, dtype, autocast) as settle:
            job = _LayerJob(i, len(layers), parent_name, targets[i], expert_roles(layer), compressor, moe, device,
                            report, comm, lockstep_memory=lockstep_memory, settle=settle)
            first = len(report)
            routed_before = comm.routed_before(layer) if comm is not None else None
            if calls is None:
                job.compress([list(job.linears)], {})
            else:
                # layer i's own kwargs, fed the previous layer's (compressed) outputs
                batches = [c.with_hidden(h) for c, h in zip(calls[i], hidden)]
                refs = None
                if reference:  # the uncompressed layer on its own inputs, before it is compressed
                    heads = [b.select(slice(0, ref_rows)) if ref_rows is not None else b for b in batches]
                    refs, ref_hidden = _reference_pass(layer, [b.with_hidden(h) for b, h in zip(heads, ref_hidden)],
                                                       job, store, paired, sum(h.shape[0] for h in hidden))
                hidden = _calibrate_layer(layer, batches, job, true_sequential, full_hessian, store, _rerun, refs,
                                          want_outputs=after_layer is None)
                if after_layer is not None:
                    hidden = _after_layer(after_layer, job, layer, batches, ref_hidden, store)
                    _refingerprint(report[first:], job.linears)
                calls[i] = []  # this layer's kwargs are no longer needed
            if comm is not None:
                comm.sum_routed(layer, routed_before, f"layer {i}'s routed-token counts")
            _add_routing(report[first:], job.roles, layer, f"{parent_name}.{i}")
        if stream is not None:
            stream.done(i, layer)
        # the finished layer's Linears are not needed: a streamed layer's originals, swapped out
        # for QuantLinears, would otherwise stay in memory through every later layer
        targets[i] = job.linears = {}
        if profile is not None:
            profile.append(job.clock.as_dict())
        if checkpoint is not None:
            checkpoint.save(i, layer, hidden + ref_hidden if reference else hidden, report[first:],
                            job.clock.as_dict())
        errors = [r["rel_error"] for r in report[first:]] or [0.0]
        elapsed = time.time() - total
        log.info("%s layer %d/%d: %.1fs (forward %.1fs, Hessians %.1fs, compressor %.1fs), mean rel. error %.4g, "
                 "max %.4g, ETA %.0fs", label, i + 1, len(layers), time.time() - start, job.clock.forward_seconds,
                 job.clock.hessian_seconds, job.clock.compress_seconds, sum(errors) / len(errors), max(errors),
                 elapsed / (i + 1 - first_layer) * (len(layers) - i - 1))
    return report


class LayerStream(Protocol):
    """Decoder layers that live elsewhere (shards on disk): read in before, handed over after."""

    def load(self, i: int, layer: nn.Module) -> None: ...

    def done(self, i: int, layer: nn.Module) -> None: ...


@dataclass
class _LayerJob:
    """One decoder layer being compressed: its Linears (and expert roles), the compressor,
    the report and the clock."""
    index: int
    num_layers: int
    parent: str
    linears: dict[str, nn.Module]
    roles: dict[str, tuple[str, int, int]]
    compressor: Compressor
    moe: MoeConfig
    device: torch.device
    report: list[dict[str, Any]]
    comm: Optional[CalibComm] = None  # torchrun: Hessians summed onto owners, results shared
    lockstep_memory: Optional[int] = None  # bytes paused forwards may keep (None: automatic)
    settle: Optional[Callable[[nn.Module, str], None]] = None  # rounds a compressed Linear to its stored dtype

    def __post_init__(self) -> None:
        self.clock = LayerProfile(self.index)

    def compress(self, groups: list[list[str]], hessians: dict[str, HessianAccumulator]) -> None:
        """Compress the Linears of one pass (its groups' Hessians complete); with `comm`, the
        Hessians are first summed over the ranks and each rank compresses the Linears it owns."""
        names = [n for group in groups for n in group]
        mine = names
        if self.comm is not None:
            owner = self.comm.owners(names, self.linears)
            self.comm.reduce(groups, hessians, owner, f"layer {self.index}'s Hessian sums")
            mine = [n for n in names if owner[n] == self.comm.rank]
        for group in groups:
            acc = hessians.get(group[0])
            if acc is not None:
                self.clock.hessian_flops += 2.0 * acc.n * acc.columns ** 2
        with self.clock.timing("compress_seconds", self.device):
            jobs = {n: _make_job(self.index, self.num_layers, self.parent, n, self.linears[n], hessians.get(n),
                                 self.min_tokens(n)) for n in mine}
            for members in _expert_batches(mine, self.roles, jobs).values():
                for n in members:
                    jobs[n].batch = [jobs[m] for m in members]
            entries = {name: compress_one(jobs[name], self.compressor, self.min_tokens(name), self.settle)
                       for name in mine}
        for job in jobs.values():  # job.batch holds the job itself: a cycle that would keep each Linear and
            job.batch = None       # Hessian alive until a full gc pass, through every later layer
        if self.comm is not None:
            entries = self.comm.share(entries, self.linears, f"layer {self.index}'s compressed Linears")
        self.report.extend(entries[name] for name in names)

    def add_in_order(self, acc: HessianAccumulator, inputs: list[torch.Tensor]) -> None:
        """torchrun: acc += every rank's inputs, in window order (CalibComm.add_in_order)."""
        self.comm.add_in_order(acc, inputs, f"layer {self.index}'s Hessian sums")

    def min_tokens(self, name: str) -> int:
        return self.moe.min_tokens if name in self.roles else 0


def _reference_pass(layer: nn.Module, batches: list[LayerBatch], job: "_LayerJob", store: torch.device,
                    paired: bool, windows: int) -> tuple[Optional[ReferenceInputs], list[torch.Tensor]]:
    """The uncompressed layer over the reference stream: its Linears' inputs when `paired` (expert
    Linears only when every token runs through every expert: routed tokens differ between the two
    models, so they would not pair) and its outputs, the next layer's reference inputs. `windows`:
    the compressed stream's (the profile counts the share of a forward this pass is)."""
    names = [n for n in job.linears if job.moe.all_experts or n not in job.roles] if paired else []
    refs = ReferenceInputs(set(names)) if paired else None
    current, kept = [0], {}  # the batch being run; id -> (input, stored copy) within it

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, inp: tuple, _o: Any) -> None:
            x = inp[0]
            if id(x) not in kept:  # Linears reading one tensor (q/k/v, gate/up) keep one copy
                kept[id(x)] = (x, x.detach().to(store))
            refs.record(name, current[0], kept[id(x)][1])
        return fn

    handles = [job.linears[n].register_forward_hook(hook(n)) for n in names]
    outputs = []
    try:
        with job.clock.timing("forward_seconds", job.device), \
                expert_mode(layer, job.moe.all_experts and paired, count=False):
            for b, batch in enumerate(batches):
                current[0] = b
                outputs.append(run_layer(layer, [batch], job.device, store)[0])
                kept.clear()
    finally:
        for h in handles:
            h.remove()
    job.clock.forwards += sum(b.hidden().shape[0] for b in batches) / windows
    return refs, outputs


def _after_layer(hook: AfterLayer, job: "_LayerJob", layer: nn.Module, batches: list[LayerBatch],
                 targets: list[torch.Tensor], store: torch.device) -> list[torch.Tensor]:
    """The compressor's after-layer hook, then the layer's outputs again (its weights may have changed)."""
    with job.clock.timing("after_layer_seconds", job.device):
        job.clock.after_layer = hook(LayerOutputs(job.index, layer, batches, targets, job.linears,
                                                  {n: f"{job.parent}.{job.index}.{n}" for n in job.linears},
                                                  job.device))
    if job.settle is not None:  # the hook's new weights as the model stores them, before the forwards
        for name, linear in job.linears.items():
            job.settle(linear, f"{job.parent}.{job.index}.{name}")
    with job.clock.timing("forward_seconds", job.device):
        outputs = run_layer(layer, batches, job.device, store)
    job.clock.forwards += 1
    if not all(torch.isfinite(o).all() for o in outputs):
        raise ShrinkError(f"layer {job.index}: NaN/inf activations after the after-layer step")
    return outputs


def _refingerprint(entries: list[dict[str, Any]], linears: dict[str, nn.Module]) -> None:
    """The weights an after-layer hook left, in its Linears' report entries: the fingerprint names
    the weights the model keeps (so `shrink report` can point at a part only the hook made), and
    `weights_before_hook` the compressor's, which rel_error still measures."""
    for entry in entries:
        after = fingerprint(weight_matrix(linears[entry["name"]]))
        if entry["fingerprint"]["weights"] != after:
            entry["fingerprint"] = {**entry["fingerprint"], "weights": after,
                                    "weights_before_hook": entry["fingerprint"]["weights"]}


def _calibrate_layer(layer: nn.Module, batches: list[LayerBatch], job: _LayerJob, true_sequential: bool,
                     full: bool, store: torch.device, rerun: bool, refs: Optional[ReferenceInputs] = None,
                     want_outputs: bool = True) -> list[torch.Tensor]:
    """Hessians, compression and the compressed layer's outputs (the next layer's inputs); without
    `want_outputs` (an after-layer hook changes the weights again) the rerun path spares its last
    forward and returns none (the lockstep forward has them anyway)."""
    device, clock, roles = job.device, job.clock, job.roles
    with clock.timing("forward_seconds", device), expert_mode(layer, job.moe.all_experts, count=False):
        groups, irregular, flops = discover(layer, batches[0], device, job.linears)
    if job.comm is not None:  # every rank takes rank 0's view (an expert may see no token of a share)
        groups, irregular = job.comm.agree((groups, irregular), f"layer {job.index}'s input groups")
    share = batches[0].hidden().shape[0] / sum(b.hidden().shape[0] for b in batches)
    clock.forward_flops = flops / share
    clock.forwards += share  # (+=: the reference stream's forward may have run already)
    # The lockstep forwards keep every batch's intermediate activations on the device at once:
    # not where the activations themselves had to be offloaded for want of device memory.
    # Expert layers keep their own passes (all experts' gate/up in one, routed tokens counted).
    if true_sequential and not rerun and not irregular and not roles and store == device:
        outputs = _lockstep_layer(layer, batches, groups, job, full, store, refs)
    else:
        # torchrun: each Hessian summed along the ranks in window order (one process's sum, bit for bit)
        chain = job.add_in_order if job.comm is not None else None
        counted = False
        for pass_groups in (sequential_passes(groups, roles) if true_sequential else [groups]):
            # every token through every expert only where an expert's statistics are taken; the
            # routed tokens are counted in the first such pass (the router runs before experts)
            has_experts = any(n in roles for group in pass_groups for n in group)
            count = has_experts and not counted
            with expert_mode(layer, job.moe.all_experts and has_experts, count=count):
                hessians = accumulate(layer, pass_groups, batches, device, full, job.linears, clock=clock,
                                      chain=chain, refs=refs)
            counted = counted or has_experts
            job.compress(pass_groups, hessians)
            if refs is not None:
                refs.drop([n for group in pass_groups for n in group])
        if not want_outputs:
            return []
        with clock.timing("forward_seconds", device):
            outputs = run_layer(layer, batches, device, store)
        clock.forwards += 1
    if not all(torch.isfinite(o).all() for o in outputs):
        raise ShrinkError(f"layer {job.index}: NaN/inf activations after compression (check the input model and calibration data)")
    return outputs


def _lockstep_layer(layer: nn.Module, batches: list[LayerBatch], groups: list[list[str]], job: _LayerJob,
                    full: bool, store: torch.device, refs: Optional[ReferenceInputs] = None) -> list[torch.Tensor]:
    """True-sequential in one forward per batch: each group is compressed when every batch
    has reached its first Linear (engine.lockstep); the forwards then end with the layer's
    compressed outputs. Each pause observes the batches in order, so with `refs` the b-th
    input a group sees pairs with batch b's reference input."""
    accs = _accumulators(job.linears, groups, job.device, full, refs)
    clock = job.clock

    seen: dict[int, list[torch.Tensor]] = {}  # torchrun: this rank's inputs, summed in order over the ranks
    observed = [0.0]  # seconds of x^T x inside the batches' forwards
    arrived = [0] * len(groups)  # batches observed so far at each pause

    def observe(stage: int, x: torch.Tensor) -> None:
        if refs is not None:
            x = refs.pair(accs[stage], groups[stage][0], arrived[stage], x)
            arrived[stage] += 1
        if job.comm is not None:
            seen.setdefault(stage, []).append(x)
            return
        start = clock.hessian_seconds
        with clock.timing("hessian_seconds", job.device):
            accs[stage].add(x)
        observed[0] += clock.hessian_seconds - start

    def at_pause(stage: int) -> None:
        if job.comm is not None:  # torchrun: one process's order of the sum, over the ranks
            with clock.timing("hessian_seconds", job.device):
                job.add_in_order(accs[stage], seen.pop(stage, []))
        job.compress([groups[stage]], {name: accs[stage] for name in groups[stage]})
        if refs is not None:
            refs.drop(groups[stage])

    def forward(batch: LayerBatch) -> Callable[[], torch.Tensor]:
        return lambda: run_layer(layer, [batch], job.device, store)[0]

    hold = lockstep_hold(batches, [job.linears[g[0]] for g in groups], job.device, job.lockstep_memory)
    if hold is not None:
        log.info("layer %d: at most %d of %d calibration batches wait at a pause (memory), the others are "
                 "recomputed", job.index, hold, len(batches))
    stepper = Lockstep([job.linears[group[0]] for group in groups], observe, hold)
    outputs = stepper.run([forward(b) for b in batches], at_pause, job.device)
    # the x^T x products ran inside the batches' forwards
    clock.forward_seconds += stepper.forward_seconds - observed[0]
    rows = [b.hidden().shape[0] for b in batches]
    clock.forwards += 1 + sum(r * n for r, n in zip(stepper.restarts, rows)) / sum(rows)
    return outputs


def lockstep_hold(batches: list[LayerBatch], pauses: list[nn.Module], device: torch.device,
                  budget: Optional[int]) -> Optional[int]:
    """How many batches may wait at a pause at once within `budget` bytes (None: half of what is
    available now); None when all of them fit. A waiting batch keeps about its pause input and
    four hidden-sized tensors (residual, normed input, attention's q/k/v or the MLP's input)."""
    hidden = batches[0].hidden()
    widest = max(weight_matrix(m).shape[1] for m in pauses)
    tokens = max(b.hidden().numel() // hidden.shape[-1] for b in batches)
    per_batch = tokens * (widest + 4 * hidden.shape[-1]) * hidden.element_size()
    budget = available_memory(device) // 2 if budget is None else budget
    hold = max(1, budget // per_batch)
    return None if hold >= len(batches) else int(hold)


def _add_routing(entries: list[dict[str, Any]], roles: dict[str, tuple[str, int, int]], layer: nn.Module,
                 prefix: str) -> None:
    """Tokens routed to its expert (counted in the layer's first calibration pass), per expert Linear."""
    for entry in entries:
        if entry["name"] in roles:
            block_name, e, _ = roles[entry["name"]]
            entry.update(block=f"{prefix}.{block_name}", expert=e,
                         routed_tokens=int(layer.get_submodule(block_name).routed[e]))


def expert_summary(report: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens routed to each expert of each block, and the expert Linears that fell back."""
    tokens: dict[str, dict[int, int]] = {}
    for entry in report:
        if "block" in entry:
            tokens.setdefault(entry["block"], {})[entry["expert"]] = entry["routed_tokens"]
    return {"tokens_per_expert": {b: [t[e] for e in sorted(t)] for b, t in tokens.items()},
            "fallbacks": [r["full_name"] for r in report if r.get("fallback")]}


def _expert_batches(names: list[str], roles: dict[str, tuple[str, int, int]],
                    jobs: dict[str, LinearJob]) -> dict[tuple, list[str]]:
    """Expert Linears of one block, role and shape, all with Hessians: solvable as one batch."""
    out: dict[tuple, list[str]] = {}
    for n in names:
        job = jobs[n]
        if n in roles and job.hessian is not None:
            key = (roles[n][0], roles[n][2] == 2, tuple(weight_matrix(job.module).shape))
            out.setdefault(key, []).append(n)
    return out


def _make_job(i: int, n: int, parent: str, name: str, module: nn.Module, acc: Optional[HessianAccumulator],
              min_tokens: int) -> LinearJob:
    full = f"{parent}.{i}.{name}"
    seen = acc.n if acc is not None else None
    fallback = seen is not None and seen < min_tokens
    if fallback:
        log.warning("%s: only %d calibration tokens (moe.min_tokens=%d): calibration-free fallback",
                    full, acc.n, min_tokens)
        acc = None
    if acc is not None and not acc.finite():
        raise ShrinkError(f"{full}: NaN/inf in calibration activations")
    job = LinearJob(i, n, name, full, module, acc, fallback, stat_tokens=seen)
    job.batch = [job]
    return job


def compress_one(job: LinearJob, compressor: Compressor, min_tokens: int = 0,
                 settle: Optional[Callable[[nn.Module, str], None]] = None) -> dict[str, Any]:
    """Run the compressor on one job; its report entry (error relative to the data, seconds, the
    compressor's figures). A non-positive-definite Hessian or a kernel's refusal is one ShrinkError.
    `settle(module, name)` then rounds the new weights to the dtype they are stored in (see `calibrating`)."""
    i, name, full, module, acc = job.layer_index, job.name, job.full_name, job.module, job.hessian
    seen, fallback = job.stat_tokens, job.fallback
    W0 = weight_matrix(module).clone()
    start = time.time()
    try:
        stats = compressor(job)
    except HessianError as exc:
        raise ShrinkError(f"{full}: {exc}") from exc
    except ValueError as exc:  # kernels validate shapes/options with ValueError
        raise ShrinkError(f"{full}: {exc}") from exc
    if settle is not None:
        settle(module, full)
    rel = relative_error(W0, weight_matrix(module), acc)
    entry = {"layer": i, "name": name, "full_name": full, "seconds": time.time() - start, "rel_error": rel, **stats,
             "fingerprint": linear_fingerprint(module, acc)}
    if min_tokens:
        entry.update(stat_tokens=seen, fallback=fallback)
    return entry


def record_coverage(state: Any, report: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage's coverage (into state.metrics["coverage"]) and its MoE summary, for its report."""
    cov = coverage(state.model, [r["full_name"] for r in report])
    state.metrics["coverage"] = cov
    summary = expert_summary(report)
    return {"coverage": cov, **({"moe": summary} if summary["tokens_per_expert"] else {})}
