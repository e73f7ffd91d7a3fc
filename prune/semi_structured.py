"""Run 2:4-pruned Linears through PyTorch's semi-structured sparse tensors (CUDA only).

`to_sparse_semi_structured` stores the kept half of the weights plus 2-bit metadata and
dispatches to cuSPARSELt/CUTLASS sparse GEMMs on Ampere and newer GPUs. Only Linears whose
weights already hold the 2:4 pattern (at least 2 zeros in every 4 consecutive inputs)
and whose shape the sparse kernels accept are converted; others stay dense.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.errors import ShrinkError
from engine.modeling import find_decoder_layers
from prune.baselines import has_nm_pattern

log = logging.getLogger(__name__)


def kernel_accepts(W: torch.Tensor) -> bool:
    """Whether the sparse backend that `to_sparse_semi_structured` picks takes W's dtype and
    shape: both dimensions multiples of its minimum tile (cuSPARSELt 16 x 16 in fp16/bf16,
    CUTLASS 32 x 64), which torch checks with an exception instead of padding."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    backend = (SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
               else SparseSemiStructuredTensorCUSPARSELT)
    limits = backend._DTYPE_SHAPE_CONSTRAINTS.get(W.dtype)
    rows, cols = W.shape
    return (limits is not None and rows >= limits.sparse_min_rows and rows % limits.sparse_min_rows == 0
            and cols >= limits.sparse_min_cols and cols % limits.sparse_min_cols == 0)


def to_semi_structured(model: nn.Module) -> int:
    """Swap the weights of 2:4 Linears in the decoder layers for semi-structured sparse
    tensors in place; returns how many were converted. The model must be on a CUDA GPU
    in fp16 or bf16."""
    if not torch.cuda.is_available():
        raise ShrinkError("eval.sparse_kernels: semi-structured 2:4 kernels need a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    _, layers = find_decoder_layers(model)
    converted = 0
    for layer in layers:
        for module in layer.modules():
            if not isinstance(module, nn.Linear):
                continue
            W = module.weight.data
            if W.device.type != "cuda" or W.dtype not in (torch.float16, torch.bfloat16):
                raise ShrinkError("eval.sparse_kernels: the model must be on CUDA in float16/bfloat16")
            if has_nm_pattern(W, 2, 4) and kernel_accepts(W):
                module.weight = nn.Parameter(to_sparse_semi_structured(W.contiguous()), requires_grad=False)
                converted += 1
    log.info("%d Linears run on semi-structured 2:4 kernels", converted)
    return converted
