"""Device slot tables: where each resident adapter's LoRA matrices sit in the pool, per slot."""

from __future__ import annotations

import torch

from server.lora.layout import LORA_MODULES, MAX_SLICES
from server.lora.ops import SliceWeights


class SlotTables:
    """Every slot's LoRA offsets, ranks and scalings on the device: [layers, modules, slots, 3].

    Written when an adapter becomes resident or leaves, never per step; a step only gathers the
    rows of the slots it uses.
    """

    def __init__(
        self, num_layers: int, max_loras: int, device: torch.device, offset_align: int = 1
    ) -> None:
        shape = (num_layers, len(LORA_MODULES), max_loras, MAX_SLICES)
        # Every offset written is a multiple of this (layout.offset_alignment): kernels take it
        # as an alignment hint, so fill() refuses an offset that breaks it.
        self.offset_align = offset_align
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
                    assert w.a_offset % self.offset_align == 0, "A offset breaks the alignment"
                    assert w.b_offset % self.offset_align == 0, "Bt offset breaks the alignment"
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
