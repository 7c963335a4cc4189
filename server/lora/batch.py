"""Per-step LoRA metadata: segments of tokens per adapter.

The batched LoRA ops work on segments: consecutive tokens of the flat batch sharing one adapter.
`group_by_adapter` orders a step's sequences so that every adapter's tokens form exactly one
segment; the residency's `lora_batch` relies on that order and checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from server.lora.layout import LORA_MODULES
from server.lora.ops import SegmentTensors
from server.lora.pooled import PooledWeights
from server.lora.slots import SlotTables
from server.model.config import PackedSlices

NO_ADAPTER = -1
T = TypeVar("T")


def group_by_adapter(items: list[T], adapter_id: Callable[[T], int]) -> None:
    """Sort a step's sequences in place (stable) so each adapter's tokens are one segment."""
    items.sort(key=adapter_id)


@dataclass
class AdapterSegment:
    """Consecutive tokens of the flat batch that use one resident adapter."""

    start: int
    length: int
    adapter_id: int
    slot: int
    weights: PooledWeights  # where the adapter's tensors sit in the pool

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Linear:
    """Which packed linear a LoRA delta is for, and its output slices (q/k/v, gate/up)."""

    layer: int
    module: int  # index into LORA_MODULES
    slices: PackedSlices


class LoRAOps(Protocol):
    """Batched LoRA over a step's segments of tokens, one per adapter."""

    name: str
    # Whether it reads the step's segments from the device tables alone (a decode CUDA graph
    # replays it without the host knowing the segments).
    graph_safe: bool

    def add(self, batch: LoRABatch, x: torch.Tensor, out: torch.Tensor, linear: Linear) -> None:
        """out += each token's adapter delta for one packed linear of one layer.
        x: [T, in]  out: [T, sum(linear.slices.widths)]"""
        ...


class SegmentBuffers:
    """Per-step segment tables on the device, allocated once at their maximum (one segment per
    resident adapter) and filled in place, so their addresses never change between steps."""

    def __init__(self, max_segments: int, device: torch.device) -> None:
        # [3, max_segments] int64: slot, first token, length of each segment
        self.table = torch.zeros(3, max_segments, dtype=torch.int64, device=device)
        self._host = torch.zeros(3, max_segments, dtype=torch.int64)
        if device.type == "cuda":
            self._host = self._host.pin_memory()

    def fill(
        self, segments: list[AdapterSegment]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the segments (one host-to-device copy); views [G] of slots, starts, lengths."""
        num_segments = len(segments)
        assert num_segments <= self.table.shape[1], "more segments than resident adapters"
        host = self._host[:, :num_segments]
        host[0] = torch.tensor([r.slot for r in segments])
        host[1] = torch.tensor([r.start for r in segments])
        host[2] = torch.tensor([r.length for r in segments])
        self.table[:, :num_segments].copy_(host, non_blocking=True)
        slots, starts, lens = self.table[:, :num_segments]
        return slots, starts, lens

    def clear_from(self, num_segments: int) -> None:
        """Zero the lengths of segments [num_segments, max): a graph reads every segment, and
        these are empty (their kernels' programs exit at once)."""
        self.table[2, num_segments:].zero_()


class LoRABatch:
    """What the LoRA-aware layers need to know about this step's tokens and adapters.

    Everything the forward reads is on the device before it starts: the segment tables
    (filled by the residency's lora_batch), the slot tables, and each adapter's pooled views;
    no layer copies from the host or waits for the device.
    """

    def __init__(
        self,
        segments: list[AdapterSegment],
        pool: torch.Tensor,
        tables: SlotTables,
        ops: LoRAOps,
        seg_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        max_rank: int,
    ) -> None:
        self.segments = segments
        self.pool = pool  # [P] flat view of the page pool
        self.tables = tables
        self.ops = ops
        self.seg_slots, self.seg_starts, self.seg_lens = seg_tensors  # [G] each, on the device
        self.max_rank = max_rank  # the engine's --max-lora-rank: fixed, never read from segments
        self.max_seg_len = max((r.length for r in segments), default=0)
        # A CUDA-graph batch reads every segment of the buffers and launches for every module; the
        # host does not know the segments of a replay.
        self.static = False
        self._module_tensors: dict[int, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def for_graph(
        cls,
        pool: torch.Tensor,
        tables: SlotTables,
        ops: LoRAOps,
        buffers: SegmentBuffers,
        max_rank: int,
        max_seg_len: int,
    ) -> LoRABatch:
        """The batch a decode graph captures: all of the segment buffers, whatever they hold."""
        slots, starts, lens = buffers.table
        batch = cls([], pool, tables, ops, (slots, starts, lens), max_rank)
        batch.max_seg_len = max_seg_len
        batch.static = True
        return batch

    def add_lora(self, x: torch.Tensor, out: torch.Tensor, linear: Linear) -> None:
        """out += each token's adapter delta for one packed linear of one layer."""
        # x: [T, in]  out: [T, sum(linear.slices.widths)]
        self.ops.add(self, x, out, linear)

    def segment_tensors(self, layer: int, module: int) -> SegmentTensors:
        """The kernels' per-segment tables for one linear (all segments take part; a segment
        whose adapter skips this layer has rank 0 there)."""
        cached = self._module_tensors.get(module)
        if cached is None:  # once per step and module, by device-side gathers
            num_slices = len(LORA_MODULES[module][1])
            t = self.tables
            cached = tuple(
                table[:, module][:, self.seg_slots, :num_slices].contiguous()  # [layers, G, S]
                for table in (t.a_offsets, t.b_offsets, t.ranks, t.scalings)
            )
            self._module_tensors[module] = cached
        a, b, ranks, scalings = cached
        return SegmentTensors(
            self.seg_starts,
            self.seg_lens,
            a[layer],
            b[layer],
            ranks[layer],
            scalings[layer],
            self.max_rank,
            self.max_seg_len,
            self.tables.offset_align,
        )

    def norm_segments(self, name: str) -> list[tuple[int, int, torch.Tensor]]:
        """(start, length, weight [hidden]) of segments whose adapter replaces norm `name`."""
        return [
            (r.start, r.length, w)
            for r in self.segments
            if (w := r.weights.norms.get(name)) is not None
        ]

    def embed_segments(self) -> list[AdapterSegment]:
        """Runs whose adapter brings its own embedding table."""
        return [r for r in self.segments if r.weights.embed_chunks]
