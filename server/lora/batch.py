"""Per-step LoRA metadata: runs of tokens per adapter, and the device tables kernels read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.lora.layout import LORA_MODULES, MAX_SLICES
from server.lora.ops import SegmentTensors, SliceWeights, lora_apply

if TYPE_CHECKING:
    from server.memory.adapter_cache import ResidentAdapter


class SlotTables:
    """Every slot's LoRA offsets, ranks and scalings on the device: [layers, modules, slots, 3].

    Written when an adapter becomes resident or leaves, never per step; a step only gathers the
    rows of the slots it uses.
    """

    def __init__(self, num_layers: int, max_loras: int, device: torch.device) -> None:
        shape = (num_layers, len(LORA_MODULES), max_loras, MAX_SLICES)
        self.a_offsets = torch.zeros(shape, dtype=torch.int64, device=device)
        self.b_offsets = torch.zeros(shape, dtype=torch.int64, device=device)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(shape, dtype=torch.float32, device=device)

    def fill(self, slot: int, slices: dict[tuple[int, int], list[SliceWeights | None]]) -> None:
        """Write the slot's whole column (zeros where the adapter has no slice)."""
        host = {
            name: torch.zeros(t.shape[0], t.shape[1], MAX_SLICES, dtype=t.dtype)
            for name, t in self._named().items()
        }
        for (layer, module), per_slice in slices.items():
            for s, w in enumerate(per_slice):
                if w is not None:
                    host["a_offsets"][layer, module, s] = w.a_offset
                    host["b_offsets"][layer, module, s] = w.b_offset
                    host["ranks"][layer, module, s] = w.rank
                    host["scalings"][layer, module, s] = w.scaling
        for name, t in self._named().items():
            t[:, :, slot].copy_(host[name])

    def clear(self, slot: int) -> None:
        for t in self._named().values():
            t[:, :, slot] = 0

    def _named(self) -> dict[str, torch.Tensor]:
        return {
            "a_offsets": self.a_offsets,
            "b_offsets": self.b_offsets,
            "ranks": self.ranks,
            "scalings": self.scalings,
        }


@dataclass
class Run:
    """Consecutive tokens of the flat batch that use one resident adapter."""

    start: int
    length: int
    adapter: ResidentAdapter

    @property
    def end(self) -> int:
        return self.start + self.length


class LoRABatch:
    """What the LoRA-aware layers need to know about this step's tokens and adapters."""

    def __init__(
        self, runs: list[Run], pool: torch.Tensor, tables: SlotTables, backend: str
    ) -> None:
        self.runs = runs
        self.pool = pool  # [P] flat view of the page pool
        self.tables = tables
        self.backend = backend
        self._module_tensors: dict[int, tuple[torch.Tensor, ...]] = {}
        self._run_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
            if any((layer, module) in r.adapter.weights.slices for r in self.runs):
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
        if self._run_tensors is None:  # once per step, shared by every module
            dev = self.pool.device
            self._run_tensors = (
                torch.tensor([r.adapter.slot for r in self.runs], device=dev),
                torch.tensor([r.start for r in self.runs], dtype=torch.int64, device=dev),
                torch.tensor([r.length for r in self.runs], dtype=torch.int64, device=dev),
            )
        slots, starts, lens = self._run_tensors
        cached = self._module_tensors.get(module)
        if cached is None:
            num_slices = len(LORA_MODULES[module][1])
            t = self.tables
            cached = tuple(
                table[:, module][:, slots, :num_slices].contiguous()  # [layers, G, S]
                for table in (t.a_offsets, t.b_offsets, t.ranks, t.scalings)
            )
            self._module_tensors[module] = cached
        a, b, ranks, scalings = cached
        max_rank = max(
            (
                w.rank
                for r in self.runs
                for w in r.adapter.weights.slices.get((layer, module), ())
                if w
            ),
            default=0,
        )
        return SegmentTensors(
            starts,
            lens,
            a[layer],
            b[layer],
            ranks[layer],
            scalings[layer],
            max_rank,
            max(r.length for r in self.runs),
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
