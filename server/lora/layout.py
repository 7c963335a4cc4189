"""Where an adapter's tensors go in its pool pages, and which packed slice each LoRA feeds.

Every LoRA matrix (A: [rank, in], Bt: [rank, out]) lands whole inside one page, so kernels and
the torch path read it as one contiguous block at a known offset; different matrices of one
adapter sit on different, non-adjacent pages. Pages are the pool's own (shared with KV blocks),
so an adapter's cost in pages grows with its rank, never padded to a maximum rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.model.config import PACKED_LINEARS, ModelConfig

# Packed linear (module index) -> the checkpoint modules feeding its slices, in column order.
LORA_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(PACKED_LINEARS.items())
MAX_SLICES = max(len(parts) for _, parts in LORA_MODULES)
# Checkpoint module -> (module index, slice index).
SLICE_OF: dict[str, tuple[int, int]] = {
    name: (m, s) for m, (_, names) in enumerate(LORA_MODULES) for s, name in enumerate(names)
}
ALIGN = 64  # elements; keeps every matrix start aligned for vectorized loads


@dataclass(frozen=True)
class Placement:
    key: tuple  # ("A"|"B", layer, module) | ("norm", name) | ("embed", chunk)
    page: int  # index into the adapter's own page list
    offset: int  # element offset within that page
    numel: int


@dataclass(frozen=True)
class Layout:
    num_pages: int
    placements: tuple[Placement, ...]
    embed_rows_per_chunk: int = 0


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_layout(
    tensors: list[tuple[tuple, int]], page_numel: int, embed_rows: int = 0, hidden: int = 0
) -> Layout:
    """Pack (key, numel) tensors, plus an optional [embed_rows, hidden] embedding split into
    page-sized row chunks, into as few pages as first-fit decreasing finds."""
    items = list(tensors)
    rows_per_chunk = 0
    if embed_rows:
        rows_per_chunk = min(embed_rows, page_numel // hidden)
        for c, start in enumerate(range(0, embed_rows, rows_per_chunk)):
            items.append((("embed", c), min(rows_per_chunk, embed_rows - start) * hidden))
    items.sort(key=lambda kv: -kv[1])
    free: list[int] = []  # next free offset per page
    placements = []
    for key, numel in items:
        assert numel <= page_numel, f"{key} ({numel} elements) does not fit a page ({page_numel})"
        page = next((i for i, used in enumerate(free) if used + numel <= page_numel), len(free))
        if page == len(free):
            free.append(0)
        placements.append(Placement(key, page, free[page], numel))
        free[page] = min(page_numel, _aligned(free[page] + numel))
    return Layout(len(free), tuple(placements), rows_per_chunk)


def offset_alignment(cfg: ModelConfig, page_numel: int) -> int:
    """What every LoRA matrix offset in the pool is a multiple of: placements start at ALIGN
    multiples within a page, pages at page_numel multiples, and the slices of a stacked A at
    multiples of its row length (an in_features)."""
    in_features = {shape[0] for shape in cfg.linear_shapes().values()}
    return math.gcd(ALIGN, page_numel, *in_features)
