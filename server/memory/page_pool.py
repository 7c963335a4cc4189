"""The unified page pool: one preallocated device tensor; KV blocks and adapter weights share it.

A page holds one KV block for every layer ([layers, 2, block_size, kv_heads, head_dim]) or a
run of adapter weight rows. Both kinds come from the same free list and the same budget, so an
idle adapter's pages can become KV blocks and back without fragmenting two separate pools.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch

from server.model.config import ModelConfig

logger = logging.getLogger(__name__)

KV = "kv"
ADAPTER = "adapter"


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free or reclaimable."""


class Reclaimer(Protocol):
    """Something holding pages it can give back on demand (idle adapters)."""

    def reclaimable_pages(self) -> int: ...

    def reclaim(self, num_pages: int) -> int: ...


@dataclass(frozen=True)
class PageGeometry:
    """Page size, derived from the model and the largest adapter tensor a page must hold."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def page_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @classmethod
    def for_model(cls, cfg: ModelConfig, min_block_size: int, max_lora_rank: int) -> PageGeometry:
        """Grow the KV block (in powers of two) until one page fits the largest LoRA block of
        a rank-max adapter: a Bt of the widest output, or the stacked A of q, k and v."""
        shapes = cfg.linear_shapes()
        widest = max(max(max(shape) for shape in shapes.values()), 3 * cfg.hidden_size)
        block = min_block_size
        while True:
            geom = cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block)
            if geom.page_numel >= max_lora_rank * widest:
                return geom
            block *= 2


class PagePool:
    """Fixed-size pages of one preallocated tensor, handed out from a free list."""

    def __init__(
        self, num_pages: int, geometry: PageGeometry, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_pages < 1:
            raise ValueError("the page pool needs at least one page; raise --pool-mb")
        self.geometry = geometry
        self.num_pages = num_pages
        self.page_numel = geometry.page_numel
        # buffer: [num_pages, page_numel]
        self.buffer = torch.zeros(num_pages, self.page_numel, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))
        self.used_by_kind: Counter[str] = Counter()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def page_bytes(self) -> int:
        return self.page_numel * self.buffer.element_size()

    def available(self, reclaimer: Reclaimer | None = None) -> int:
        """Pages free now plus pages `reclaimer` could give back."""
        extra = reclaimer.reclaimable_pages() if reclaimer is not None else 0
        return self.num_free + extra

    def allocate(self, num_pages: int, kind: str, reclaimer: Reclaimer | None = None) -> list[int]:
        """Take pages off the free list, first asking `reclaimer` for any that are short."""
        if num_pages > self.num_free and reclaimer is not None:
            reclaimer.reclaim(num_pages - self.num_free)
        if num_pages > self.num_free:
            raise OutOfPagesError(f"asked for {num_pages} pages, {self.num_free} free")
        pages = [self._free.pop() for _ in range(num_pages)]
        self.used_by_kind[kind] += num_pages
        return pages

    def clear(self, pages: list[int]) -> None:
        """Zero pages (no sync: one fill per page, queued on the device)."""
        for page in pages:
            self.buffer[page].zero_()

    def free(self, pages: list[int], kind: str) -> None:
        self._free.extend(reversed(pages))
        self.used_by_kind[kind] -= len(pages)
        assert self.used_by_kind[kind] >= 0, f"freed more {kind} pages than allocated"

    def kv_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's K and V caches as views: [num_pages, block_size, kv_heads, head_dim] each."""
        g = self.geometry
        pages = self.buffer.view(
            self.num_pages, g.num_layers, 2, g.block_size, g.num_kv_heads, g.head_dim
        )
        return pages[:, layer, 0], pages[:, layer, 1]
