"""One eviction policy for everything in the pool that can give its pages back.

Two kinds of pages are reclaimable: idle adapters' weights (DeviceAdapterCache) and cached KV
blocks no running request uses (PrefixCache). When free pages run short, PoolReclaimer takes
from whichever holds the lowest priority, across both, so one budget covers KV in use, cached
prefixes and adapter weights.

The priority is GreedyDual-Size's: an item that becomes idle gets H = L + c, where c is what
its pages would cost to bring back, in seconds per page (an adapter: its measured load time
over its page count; a KV block: the measured prefill time of block_size tokens), and L is
the clock: the H of the last item evicted. Among items idle since the same moment the cheaper
to rebuild goes first; an item unused for long goes eventually however dear, because every
eviction raises L past it. With equal costs this is plain LRU. Ties go to the item made idle
first (a sequence's blocks are made idle last block first, so a prefix loses its tail first:
a middle block going first would strand every block after it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Protocol


class EvictionSource(Protocol):
    """Something holding idle pages it can give back, one item at a time."""

    def reclaimable_pages(self) -> int: ...

    def peek(self) -> tuple[float, int] | None:
        """(priority, tie-break) of the item it would evict next, None if none."""
        ...

    def evict_one(self) -> int:
        """Evict that item; the pages it freed."""
        ...


class _Ewma:
    """Exponentially weighted mean; None until the first sample."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = (
            sample if self.value is None else self.value + self.weight * (sample - self.value)
        )


@dataclass
class EvictionClock:
    """GreedyDual's L, a tie-break counter, and the measured costs of rebuilding pages."""

    value: float = 0.0
    adapter_seconds_per_page: _Ewma = field(default_factory=_Ewma)
    prefill_seconds_per_token: _Ewma = field(default_factory=_Ewma)
    _ticks: itertools.count = field(default_factory=itertools.count)

    def stamp(self, cost_per_page: float) -> tuple[float, int]:
        """The priority of an item that becomes idle now."""
        return self.value + cost_per_page, next(self._ticks)

    def adapter_cost(self) -> float:
        return self.adapter_seconds_per_page.value or 0.0

    def kv_block_cost(self, block_size: int) -> float:
        return block_size * (self.prefill_seconds_per_token.value or 0.0)


class PoolReclaimer:
    """The page pool's Reclaimer over several sources, lowest priority first."""

    def __init__(self, clock: EvictionClock, sources: list[EvictionSource]) -> None:
        self.clock = clock
        self.sources = sources

    def reclaimable_pages(self) -> int:
        return sum(s.reclaimable_pages() for s in self.sources)

    def reclaim(self, num_pages: int) -> int:
        freed = 0
        while freed < num_pages:
            best: tuple[tuple[float, int], EvictionSource] | None = None
            for source in self.sources:
                key = source.peek()
                if key is not None and (best is None or key < best[0]):
                    best = key, source
            if best is None:
                break
            self.clock.value = max(self.clock.value, best[0][0])
            freed += best[1].evict_one()
        return freed
