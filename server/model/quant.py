"""4-bit NF4 quantization (bitsandbytes) as a module swap on a built model."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64


def import_bitsandbytes():  # type: ignore[no-untyped-def]
    """bitsandbytes, with its import-time chatter about optional CPU kernels kept out of logs."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit (NF4, double quantization) holding `linear`'s weights."""
    bnb = import_bitsandbytes()
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="cpu",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to("cpu", compute_dtype),
        requires_grad=False,
        compress_statistics=True,
        quant_type="nf4",
        blocksize=NF4_BLOCKSIZE,
    )
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", compute_dtype), requires_grad=False)
    return q.to(device)  # moving a Params4bit quantizes it


def quantize_nf4(
    model: nn.Module,
    compute_dtype: torch.dtype,
    device: torch.device,
    skip: tuple[str, ...] = ("lm_head",),
) -> int:
    """Swap every nn.Linear except `skip` for an NF4 Linear4bit, in place; returns the count."""
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is nn.Linear and full not in skip:
                setattr(parent, child_name, nf4_linear(child, compute_dtype, device))
                swapped += 1
    logger.debug("quantized %d linears to NF4", swapped)
    return swapped


def is_nf4(module: nn.Module) -> bool:
    bnb = import_bitsandbytes()
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_linear(module: nn.Module) -> nn.Linear:
    """A float nn.Linear with the weights bitsandbytes reconstructs from an NF4 module."""
    bnb = import_bitsandbytes()
    weight = module.weight
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    out = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    out.weight = nn.Parameter(dense.to(module.compute_dtype), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    return out.to(dense.device)
