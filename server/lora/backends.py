"""How a step's batched LoRA is computed, chosen once at start-up: the torch path (the CPU's,
and the reference) or the Triton SGMV kernels (server/lora/triton_ops.py).

Both implement LoRAOps (server/lora/batch.py) with one semantics (server/lora/ops.py):
out += each token's adapter delta for one packed linear of one layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server.lora.batch import Linear, LoRABatch, LoRAOps
from server.lora.ops import lora_apply
from server.model.config import PackedSlices

if TYPE_CHECKING:
    from server.kernels.cpu_kernels import CPUKernels


class TorchLoRA:
    """Per segment, one matmul shrinks all slices through the stacked A (a view into the pool),
    and one addmm_ per slice expands in place. On a CPU in float32, segments of at most
    SHORT_SEGMENT tokens (decodes) all go through one call of our C kernel per linear instead
    (server/kernels/cpu/lora_segments.c): the same semantics, without a dispatch per segment
    and slice."""

    name = "torch"
    graph_safe = False
    SHORT_SEGMENT = 16

    def __init__(self) -> None:
        self._slice_tables: dict[PackedSlices, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, batch: LoRABatch, x: torch.Tensor, out: torch.Tensor, linear: Linear) -> None:
        key = (linear.layer, linear.module)
        segments = [
            (r.start, r.length, w)
            for r in batch.segments
            if (w := r.weights.modules.get(key)) is not None
        ]
        short = self.SHORT_SEGMENT
        kernels = self._kernels(x, out, batch.pool)
        if kernels is not None and any(length <= short for _, length, _ in segments):
            offsets, widths = self._slices(linear.slices)
            meta = batch.segment_tensors(linear.layer, linear.module)
            kernels.lora_short_segments(x, out, batch.pool, meta, offsets, widths, short)
            segments = [s for s in segments if s[1] > short]
        lora_apply(x, out, segments, linear.slices.offsets, linear.slices.widths)

    @staticmethod
    def _kernels(x: torch.Tensor, out: torch.Tensor, pool: torch.Tensor) -> CPUKernels | None:
        """The C kernels where they apply: float32 on a CPU, in contiguous tensors."""
        tensors = (x, out, pool)
        if x.device.type != "cpu" or any(t.dtype != torch.float32 for t in tensors):
            return None
        if not all(t.is_contiguous() for t in tensors):
            return None
        from server.kernels import cpu_kernels

        return cpu_kernels.load()

    def _slices(self, slices: PackedSlices) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._slice_tables.get(slices)
        if tables is None:
            tables = (torch.tensor(slices.offsets), torch.tensor(slices.widths))
            self._slice_tables[slices] = tables
        return tables


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
