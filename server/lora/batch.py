"""Per-step LoRA metadata: runs of tokens per adapter.

The batched LoRA ops work on runs: consecutive tokens of the flat batch sharing one adapter.
`group_by_adapter` orders a step's sequences so that every adapter's tokens form exactly one
run; `build_lora_batch` relies on that order and checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from server.lora.layout import LORA_MODULES
from server.lora.ops import SegmentTensors, lora_apply
from server.lora.slots import SlotTables

if TYPE_CHECKING:
    from server.lora.residency import DeviceAdapterCache, ResidentAdapter

NO_ADAPTER = -1
T = TypeVar("T")


def group_by_adapter(items: list[T], adapter_id: Callable[[T], int]) -> None:
    """Sort a step's sequences in place (stable) so each adapter's tokens are one run."""
    items.sort(key=adapter_id)


@dataclass
class Run:
    """Consecutive tokens of the flat batch that use one resident adapter."""

    start: int
    length: int
    adapter: ResidentAdapter

    @property
    def end(self) -> int:
        return self.start + self.length


class RunBuffers:
    """Per-step run tables on the device, allocated once at their maximum (one run per
    resident adapter) and filled in place, so their addresses never change between steps."""

    def __init__(self, max_runs: int, device: torch.device) -> None:
        # [3, max_runs] int64: slot, first token, length of each run
        self.table = torch.zeros(3, max_runs, dtype=torch.int64, device=device)
        self._host = torch.zeros(3, max_runs, dtype=torch.int64)
        if device.type == "cuda":
            self._host = self._host.pin_memory()

    def fill(self, runs: list[Run]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the runs (one host-to-device copy); views [G] of slots, starts, lengths."""
        num_runs = len(runs)
        assert num_runs <= self.table.shape[1], "more runs than resident adapters"
        host = self._host[:, :num_runs]
        host[0] = torch.tensor([r.adapter.slot for r in runs])
        host[1] = torch.tensor([r.start for r in runs])
        host[2] = torch.tensor([r.length for r in runs])
        self.table[:, :num_runs].copy_(host, non_blocking=True)
        slots, starts, lens = self.table[:, :num_runs]
        return slots, starts, lens

    def clear_from(self, num_runs: int) -> None:
        """Zero the lengths of runs [num_runs, max): a graph reads every run, and these are
        empty (their kernels' programs exit at once)."""
        self.table[2, num_runs:].zero_()


class LoRABatch:
    """What the LoRA-aware layers need to know about this step's tokens and adapters.

    Everything the forward reads is on the device before it starts: the run tables (filled
    by build_lora_batch), the slot tables, and each adapter's pooled views; no layer copies
    from the host or waits for the device.
    """

    def __init__(
        self,
        runs: list[Run],
        pool: torch.Tensor,
        tables: SlotTables,
        backend: str,
        run_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        max_rank: int,
    ) -> None:
        self.runs = runs
        self.pool = pool  # [P] flat view of the page pool
        self.tables = tables
        self.backend = backend
        self.run_slots, self.run_starts, self.run_lens = run_tensors  # [G] each, on the device
        self.max_rank = max_rank  # the engine's --max-lora-rank: fixed, never read from runs
        self.max_run_len = max((r.length for r in runs), default=0)
        # A CUDA-graph batch reads every run of the buffers and launches for every module; the
        # host does not know the runs of a replay.
        self.static = False
        self._module_tensors: dict[int, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def for_graph(
        cls,
        pool: torch.Tensor,
        tables: SlotTables,
        backend: str,
        buffers: RunBuffers,
        max_rank: int,
        max_run_len: int,
    ) -> LoRABatch:
        """The batch a decode graph captures: all of the run buffers, whatever they hold."""
        slots, starts, lens = buffers.table
        batch = cls([], pool, tables, backend, (slots, starts, lens), max_rank)
        batch.max_run_len = max_run_len
        batch.static = True
        return batch

    def add_lora(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        layer: int,
        module: int,
        slice_offsets: tuple[int, ...],
        slice_widths: tuple[int, ...],
    ) -> None:
        """out += each token's adapter delta for packed linear `module` of `layer`."""
        # x: [T, in]  out: [T, sum(slice_widths)]
        if self.backend == "triton":
            if self.static or any((layer, module) in r.adapter.weights.slices for r in self.runs):
                from server.lora.triton_ops import lora_triton

                meta = self._segment_tensors(layer, module)
                lora_triton(x, self.pool, meta, out, slice_offsets, slice_widths)
            return
        runs = [
            (r.start, r.length, w)
            for r in self.runs
            if (w := r.adapter.weights.modules.get((layer, module))) is not None
        ]
        lora_apply(x, out, runs, slice_offsets, slice_widths)

    def _segment_tensors(self, layer: int, module: int) -> SegmentTensors:
        # All runs take part; a run whose adapter skips this layer has rank 0 there.
        cached = self._module_tensors.get(module)
        if cached is None:  # once per step and module, by device-side gathers
            num_slices = len(LORA_MODULES[module][1])
            t = self.tables
            cached = tuple(
                table[:, module][:, self.run_slots, :num_slices].contiguous()  # [layers, G, S]
                for table in (t.a_offsets, t.b_offsets, t.ranks, t.scalings)
            )
            self._module_tensors[module] = cached
        a, b, ranks, scalings = cached
        return SegmentTensors(
            self.run_starts,
            self.run_lens,
            a[layer],
            b[layer],
            ranks[layer],
            scalings[layer],
            self.max_rank,
            self.max_run_len,
            self.tables.offset_align,
        )

    def norm_runs(self, name: str) -> list[tuple[int, int, torch.Tensor]]:
        """(start, length, weight [hidden]) of runs whose adapter replaces norm `name`."""
        return [
            (r.start, r.length, w)
            for r in self.runs
            if (w := r.adapter.weights.norms.get(name)) is not None
        ]

    def embed_runs(self) -> list[Run]:
        """Runs whose adapter brings its own embedding table."""
        return [r for r in self.runs if r.adapter.weights.embed_chunks]


def build_lora_batch(
    chunks: Iterable[tuple[int, int]], residency: DeviceAdapterCache
) -> LoRABatch | None:
    """Runs of a step's tokens from (adapter_id, num_tokens) per sequence, in batch order
    (grouped by adapter); None when no token uses an adapter."""
    runs: list[Run] = []
    start = 0
    for adapter_id, num_tokens in chunks:
        if adapter_id != NO_ADAPTER:
            if runs and runs[-1].adapter.adapter_id == adapter_id and runs[-1].end == start:
                runs[-1].length += num_tokens
            else:
                assert all(r.adapter.adapter_id != adapter_id for r in runs), (
                    "a step's sequences must be grouped by adapter (group_by_adapter)"
                )
                resident = residency.get(adapter_id)
                assert resident is not None, f"adapter {adapter_id} is not resident"
                runs.append(Run(start, num_tokens, resident))
        start += num_tokens
    if not runs:
        return None
    return LoRABatch(
        runs,
        residency.pool.buffer.view(-1),
        residency.tables,
        residency.backend,
        residency.run_buffers.fill(runs),
        residency.max_rank,
    )
