"""A byte-bounded LRU of adapter weights in host memory (bookkeeping only; callers lock)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from adapters.format import AdapterWeights


@dataclass(frozen=True)
class HostCacheStats:
    """A snapshot of the host cache's size and traffic."""

    host_bytes: int
    num_host_resident: int
    host_loads: int  # reads from disk
    host_evictions: int
    disk_load_seconds: float


class HostCache:
    """Adapter weights by adapter id, evicting the least recently used beyond capacity_bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"host cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[int, AdapterWeights] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, adapter_id: int) -> bool:
        return adapter_id in self._entries

    def get(self, adapter_id: int) -> AdapterWeights | None:
        """The cached weights, marked most recently used, or None."""
        weights = self._entries.get(adapter_id)
        if weights is not None:
            self._entries.move_to_end(adapter_id)
        return weights

    def can_hold(self, weights: AdapterWeights) -> bool:
        """Whether these weights fit at all (after evicting everything else)."""
        return weights.nbytes <= self.capacity_bytes

    def put(self, adapter_id: int, weights: AdapterWeights) -> list[int]:
        """Insert as most recently used and return the ids evicted to make room."""
        assert self.can_hold(weights), "caller checks can_hold first"
        self.pop(adapter_id)
        self._entries[adapter_id] = weights
        self.num_bytes += weights.nbytes
        evicted = []
        while self.num_bytes > self.capacity_bytes:
            old_id, old = self._entries.popitem(last=False)
            self.num_bytes -= old.nbytes
            evicted.append(old_id)
        self.evictions += len(evicted)
        return evicted

    def pop(self, adapter_id: int) -> bool:
        """Drop one entry (not counted as an eviction); False if absent."""
        weights = self._entries.pop(adapter_id, None)
        if weights is None:
            return False
        self.num_bytes -= weights.nbytes
        return True
