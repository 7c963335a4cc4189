"""Linears whose weights oneDNN reorders once into its blocked layout: the CPU's GEMM path.

PyTorch's default float32 GEMM on x86 is MKL's sgemm over the weight as stored; oneDNN's
matmul over a weight reordered once for it ran 1.8-2.7x faster at SmolLM2's shapes from 2 to
64 rows (equal at one row) on this project's CPUs (AMD EPYC, AVX-512; `bench/profile_step.py`
measures both). vLLM's CPU build multiplies the same way. The
swap is a transform of the built serving model made by the torch kernels backend's adapt()
(server/engine/backends.py), like NF4 and LoRA; the model's code never sees it, and training
builds its own model (PrepackedLinear has no backward).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# oneDNN packs for an expected number of rows; any number works, this one is a decode batch.
_ROWS_HINT = 64


def prepackable(linear: nn.Module) -> bool:
    """A plain float32 nn.Linear on the CPU, where PyTorch was built with oneDNN
    (x86 and Arm builds are); NF4 modules and any weight on a GPU keep their own path."""
    return (
        type(linear) is nn.Linear
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class PrepackedLinear(nn.Linear):
    """An nn.Linear that multiplies by a oneDNN-prepacked copy of its weight.

    `weight` stays the dense parameter (state dicts, merges and a tied embedding read it); the
    packed copy is derived from it once, so the weight must not change afterwards (serving
    never changes base weights).
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), _ROWS_HINT
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def prepack_linears(model: nn.Module) -> int:
    """Swap every prepackable linear of a built serving model for a PrepackedLinear, in
    place; returns how many were swapped."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if prepackable(child)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PrepackedLinear(child))
    if swaps:
        logger.info("%d linears multiply through oneDNN with prepacked weights", len(swaps))
    return len(swaps)
