"""How a step's batched LoRA is computed, chosen once at start-up: the torch path (the CPU's,
and the reference) or the Triton SGMV kernels (server/lora/triton_ops.py).

Both implement LoRAOps (server/lora/batch.py) with one semantics (server/lora/ops.py):
out += each token's adapter delta for one packed linear of one layer.
"""

from __future__ import annotations

import torch

from server.lora.batch import Linear, LoRABatch, LoRAOps
from server.lora.ops import lora_apply


class TorchLoRA:
    """Per segment, one matmul shrinks all slices through the stacked A (a view into the pool),
    and one addmm_ per slice expands in place."""

    name = "torch"
    graph_safe = False

    def add(self, batch: LoRABatch, x: torch.Tensor, out: torch.Tensor, linear: Linear) -> None:
        key = (linear.layer, linear.module)
        segments = [
            (r.start, r.length, w)
            for r in batch.segments
            if (w := r.weights.modules.get(key)) is not None
        ]
        lora_apply(x, out, segments, linear.slices.offsets, linear.slices.widths)


class TritonLoRA:
    """SGMV shrink and expand kernels over (token tile, segment, slice), reading each segment's
    weights at its own pool offsets; a decode graph replays them over the segment tables."""

    name = "triton"
    graph_safe = True

    def add(self, batch: LoRABatch, x: torch.Tensor, out: torch.Tensor, linear: Linear) -> None:
        key = (linear.layer, linear.module)
        if batch.static or any(key in r.weights.slices for r in batch.segments):
            from server.lora.triton_ops import lora_triton

            meta = batch.segment_tensors(linear.layer, linear.module)
            lora_triton(x, batch.pool, meta, out, linear.slices.offsets, linear.slices.widths)


LORA_OPS: dict[str, LoRAOps] = {"torch": TorchLoRA(), "triton": TritonLoRA()}
