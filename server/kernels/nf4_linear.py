"""NF4 linears that run the Triton NF4 matmul: a module swap over bitsandbytes' Linear4bit."""

from __future__ import annotations

import logging

import torch
from torch import nn

from server.kernels.nf4_matmul import NF4Weight, nf4_matmul
from server.model.quant import is_nf4

logger = logging.getLogger(__name__)


class TritonNF4Linear(nn.Module):
    """A Linear4bit's packed NF4 storage, multiplied by the Triton kernel without a dense copy."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        assert is_nf4(linear), f"expected a bitsandbytes Linear4bit, got {type(linear).__name__}"
        weight = NF4Weight.from_bnb(linear.weight.data, linear.weight.quant_state)
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.blocksize, self.blocksize2, self.offset = (
            weight.blocksize,
            weight.blocksize2,
            weight.offset,
        )
        # Buffers, so .to() moves them and module_bytes counts them.
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        self.register_buffer("absmax2", weight.absmax2)
        self.register_buffer("code2", weight.code2)
        self.bias = linear.bias

    def nf4_weight(self) -> NF4Weight:
        return NF4Weight(
            packed=self.packed,
            absmax=self.absmax,
            code=self.code,
            absmax2=self.absmax2,
            code2=self.code2,
            offset=self.offset,
            out_features=self.out_features,
            in_features=self.in_features,
            blocksize=self.blocksize,
            blocksize2=self.blocksize2,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        bias = self.bias.data if self.bias is not None else None
        y = nf4_matmul(flat, self.nf4_weight(), bias)
        return y.view(*x.shape[:-1], self.out_features)


def supports_kernel(linear: nn.Module) -> bool:
    """Whether the kernel can run this Linear4bit (NF4, rows a whole number of blocks)."""
    state = linear.weight.quant_state
    return state.quant_type == "nf4" and linear.in_features % state.blocksize == 0


def use_nf4_kernel(model: nn.Module) -> int:
    """Swap every NF4 Linear4bit the kernel supports for a TritonNF4Linear; returns the count."""
    swapped = kept = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_nf4(child):
                continue
            if supports_kernel(child):
                setattr(parent, name, TritonNF4Linear(child))
                swapped += 1
            else:
                kept += 1
    if kept:
        logger.warning("%d NF4 linears keep bitsandbytes' matmul (K not a multiple of 64)", kept)
    logger.debug("%d NF4 linears use the Triton NF4 matmul", swapped)
    return swapped
