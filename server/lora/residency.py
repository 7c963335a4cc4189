"""Device residency of adapters: which adapters have weights in the page pool, in which slot.

An adapter becomes resident when a request for it is admitted (or ahead of time, by prefetch
for waiting requests); it stays while any running request uses it, and afterwards sits idle
until its pages are wanted, by KV blocks or by another adapter. Idle adapters and idle cached
KV blocks are evicted by one policy (server.memory.reclaim): lowest GreedyDual priority first,
an adapter's cost being its measured load time per page. Residency is
bookkeeping plus one copy of the host weights into the pool; kernels then read them in place.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.lora.batch import NO_ADAPTER, RunBuffers
from server.lora.layout import Layout, offset_alignment
from server.lora.pooled import PooledWeights, layout_adapter, write_to_pool
from server.lora.slots import SlotTables
from server.memory.page_pool import ADAPTER, PagePool, Reclaimer
from server.memory.reclaim import EvictionClock, PoolReclaimer
from server.model.config import ModelConfig

if TYPE_CHECKING:
    from adapters.registry import AdapterRegistry
    from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class ResidentAdapter:
    """An adapter whose weights sit in the pool: its slot, its pages, where each tensor is."""

    adapter_id: int
    name: str
    slot: int
    pages: list[int]
    weights: PooledWeights
    refcount: int = 0
    key: tuple[float, int] = (0.0, 0)  # eviction priority while idle (server.memory.reclaim)


@dataclass
class ResidencyStats:
    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    prefetches: int = 0


class DeviceAdapterCache:
    """Adapters resident in the page pool: admission, LRU eviction, prefetch.

    It is one EvictionSource of the pool's reclaimer (with the prefix cache; the engine builds
    the PoolReclaimer and sets `reclaimer`) and the scheduler's AdapterGate; the pool itself
    knows nothing of adapters.
    """

    def __init__(
        self,
        pool: PagePool,
        registry: AdapterRegistry,
        cfg: ModelConfig,
        max_loras: int,
        max_rank: int,
        backend: str = "torch",
        prefetch_depth: int = 8,
        clock: EvictionClock | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock or EvictionClock()
        # What allocations may evict: idle adapters alone, until the engine installs the
        # PoolReclaimer over this cache and the prefix cache together.
        self.reclaimer: Reclaimer = PoolReclaimer(self.clock, [self])
        self.registry = registry
        self.cfg = cfg
        self.max_loras = max_loras
        self.backend = backend
        self.prefetch_depth = prefetch_depth
        self.max_rank = max_rank
        align = offset_alignment(cfg, pool.page_numel)
        self.tables = SlotTables(cfg.num_layers, max_loras, pool.buffer.device, align)
        self.run_buffers = RunBuffers(max_loras, pool.buffer.device)
        self.stats = ResidencyStats()
        self._resident: OrderedDict[int, ResidentAdapter] = OrderedDict()
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self._layouts: dict[int, Layout] = {}
        self._warming: set[int] = set()
        self._load_times: list[float] = []
        self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-prefetch")

    # ---- queries ------------------------------------------------------------------------

    def get(self, adapter_id: int) -> ResidentAdapter | None:
        return self._resident.get(adapter_id)

    def resident_ids(self) -> list[int]:
        return list(self._resident)

    @property
    def num_resident(self) -> int:
        return len(self._resident)

    def pages_needed(self, adapter_id: int) -> int:
        return self._layout(adapter_id).num_pages

    def _idle(self) -> list[ResidentAdapter]:
        return [r for r in self._resident.values() if r.refcount == 0]

    # ---- Reclaimer ----------------------------------------------------------------------

    def reclaimable_pages(self) -> int:
        return sum(len(r.pages) for r in self._idle())

    # ---- EvictionSource -----------------------------------------------------------------

    def _next_victim(self) -> ResidentAdapter | None:
        return min(self._idle(), key=lambda r: r.key, default=None)

    def peek(self) -> tuple[float, int] | None:
        r = self._next_victim()
        return r.key if r is not None else None

    def evict_one(self) -> int:
        r = self._next_victim()
        if r is None:
            return 0
        self._evict(r)
        return len(r.pages)

    # ---- AdapterGate --------------------------------------------------------------------

    def is_resident(self, seq: Sequence) -> bool:
        """True when the sequence needs no adapter load (none, or already in the pool)."""
        return seq.adapter_id == NO_ADAPTER or seq.adapter_id in self._resident

    def can_admit(self, seq: Sequence, kv_blocks: int) -> bool:
        if seq.adapter_id == NO_ADAPTER:
            return True
        r = self._resident.get(seq.adapter_id)
        if r is not None:
            # Admission pins an idle adapter: its pages stop being reclaimable for KV blocks.
            return r.refcount > 0 or kv_blocks <= self.pool.available(self.reclaimer) - len(r.pages)
        if not self._free_slots and not self._idle():
            return False
        return self.pages_needed(seq.adapter_id) + kv_blocks <= self.pool.available(self.reclaimer)

    def admit(self, seq: Sequence) -> None:
        if seq.adapter_id == NO_ADAPTER:
            return
        r = self._ensure_resident(seq.adapter_id)
        r.refcount += 1
        self._resident.move_to_end(r.adapter_id)

    def release(self, seq: Sequence) -> None:
        r = self._resident.get(seq.adapter_id)
        if r is not None:
            assert r.refcount > 0, f"adapter {r.name} released more often than admitted"
            r.refcount -= 1
            if r.refcount == 0:
                r.key = self.clock.stamp(self.clock.adapter_cost())

    def prefetch(self, waiting: Iterable[Sequence]) -> None:
        """Ready the adapters of the next waiting requests: host cache in the background,
        device pool now if a slot and free pages (no eviction) allow."""
        seen = 0
        for seq in waiting:
            if seen >= self.prefetch_depth:
                break
            aid = seq.adapter_id
            if aid == NO_ADAPTER or aid in self._resident:
                continue
            seen += 1
            if not self.registry.is_host_resident(aid):
                self._warm_in_background(aid)
            elif self._free_slots and self.pages_needed(aid) <= self.pool.num_free:
                self._ensure_resident(aid)
                self.stats.prefetches += 1

    def _warm_in_background(self, adapter_id: int) -> None:
        if adapter_id in self._warming:
            return
        self._warming.add(adapter_id)

        def warm() -> None:
            try:
                self.registry.warm(adapter_id)
            except Exception:  # the admission path reports the error to the request
                logger.exception("prefetching adapter %d failed", adapter_id)
            finally:
                self._warming.discard(adapter_id)

        self._warmer.submit(warm)

    # ---- loading and eviction -----------------------------------------------------------

    def _layout(self, adapter_id: int) -> Layout:
        layout = self._layouts.get(adapter_id)
        if layout is None:
            reg = self.registry.by_id(adapter_id)
            assert reg is not None, f"adapter {adapter_id} is not registered"
            layout = layout_adapter(reg.spec, self.cfg, self.pool.page_numel)
            self._layouts[adapter_id] = layout
        return layout

    def _take_slot(self) -> int:
        if not self._free_slots:
            victim = self._next_victim()
            assert victim, "no adapter slot free or evictable; can_admit should have refused"
            self._evict(victim)
        return self._free_slots.pop()

    def _ensure_resident(self, adapter_id: int) -> ResidentAdapter:
        r = self._resident.get(adapter_id)
        if r is not None:
            return r
        start = time.perf_counter()
        reg = self.registry.by_id(adapter_id)
        assert reg is not None, f"adapter {adapter_id} is not registered"
        weights = self.registry.weights(adapter_id)
        layout = self._layout(adapter_id)
        slot = self._take_slot()
        try:
            pages = self.pool.allocate(layout.num_pages, ADAPTER, self.reclaimer)
        except Exception:
            self._free_slots.append(slot)
            raise
        pooled = write_to_pool(
            self.pool.buffer.view(-1),
            self.pool.page_numel,
            pages,
            layout,
            reg.spec,
            weights,
            self.cfg,
        )
        r = ResidentAdapter(adapter_id, reg.name, slot, pages, pooled)
        r.key = self.clock.stamp(self.clock.adapter_cost())
        self.tables.fill(slot, pooled.slices)
        self._resident[adapter_id] = r
        elapsed = time.perf_counter() - start
        self.stats.loads += 1
        self.stats.load_seconds += elapsed
        self._load_times.append(elapsed)
        self.clock.adapter_seconds_per_page.add(elapsed / max(1, len(pages)))
        logger.debug("adapter %s resident in slot %d (%d pages)", reg.name, slot, len(pages))
        return r

    def _evict(self, r: ResidentAdapter) -> None:
        assert r.refcount == 0, f"evicting adapter {r.name} while in use"
        del self._resident[r.adapter_id]
        self.pool.free(r.pages, ADAPTER)
        self.tables.clear(r.slot)
        self._free_slots.append(r.slot)
        self.stats.evictions += 1
        logger.debug("evicted adapter %s from slot %d", r.name, r.slot)

    def evict_if_idle(self, adapter_id: int) -> bool:
        """Drop an adapter's device copy (it was unregistered); False while requests use it."""
        self._layouts.pop(adapter_id, None)
        r = self._resident.get(adapter_id)
        if r is None:
            return True
        if r.refcount:
            return False
        self._evict(r)
        return True

    def is_in_use(self, adapter_id: int) -> bool:
        r = self._resident.get(adapter_id)
        return r is not None and r.refcount > 0

    def take_load_times(self) -> list[float]:
        """Durations of the loads since the last call (for the load-latency histogram)."""
        times, self._load_times = self._load_times, []
        return times

    def shutdown(self) -> None:
        self._warmer.shutdown(wait=False, cancel_futures=True)
