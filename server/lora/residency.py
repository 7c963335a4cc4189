"""Device residency of adapters: which adapters have weights in the page pool, in which slot.

A request is admitted only once its adapter's weights are in host memory (`is_ready`; the
AdapterLoader reads them on its own thread meanwhile, so the step thread never waits on a
disk). Admission makes the adapter resident (one copy of the host weights into the pool;
kernels then read them in place) and pins it; it stays pinned while any running request uses
it, and afterwards sits idle until its pages are wanted, by KV blocks or by another adapter.
Idle adapters and idle cached KV blocks are evicted by one policy, GreedyDual-Size
(server.memory.reclaim): lowest priority first, an adapter's cost being its measured load time
per page. Only the step thread calls in here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.lora.batch import NO_ADAPTER, AdapterSegment, LoRABatch, LoRAOps, SegmentBuffers
from server.lora.layout import Layout, offset_alignment
from server.lora.loader import AdapterLoader, AdapterLoadError
from server.lora.pooled import PooledWeights, layout_adapter, write_to_pool
from server.lora.slots import SlotTables
from server.memory.page_pool import ADAPTER, PagePool, Reclaimer
from server.memory.reclaim import EvictionClock, PoolReclaimer
from server.model.config import ModelConfig

if TYPE_CHECKING:
    from adapters.config import AdapterSpec
    from adapters.registry import AdapterRegistry

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
    """Running totals of adapters moved into and out of the pool."""

    loads: int = 0
    evictions: int = 0


class DeviceAdapterCache:
    """Adapters resident in the page pool: the scheduler's admission gate, prefetch, and the
    idle adapters the pool's one GreedyDual-Size policy may evict (not plain LRU: an adapter
    dearer to bring back per page stays longer; with equal costs the policy is LRU).

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
        lora_ops: LoRAOps,
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
        self.lora_ops = lora_ops
        self.prefetch_depth = prefetch_depth
        self.max_rank = max_rank
        align = offset_alignment(cfg, pool.page_numel)
        self.tables = SlotTables(cfg.num_layers, max_loras, pool.buffer.device, align)
        self.segment_buffers = SegmentBuffers(max_loras, pool.buffer.device)
        self.stats = ResidencyStats()
        self._resident: OrderedDict[int, ResidentAdapter] = OrderedDict()
        self._free_slots = list(range(max_loras - 1, -1, -1))
        self._layouts: dict[int, Layout] = {}
        self._load_times: list[float] = []
        self.loader = AdapterLoader(registry, prefetch_depth)
        self._load_errors: dict[int, str] = {}  # adapter id -> why its weights are unreadable

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

    def pages_for(self, spec: AdapterSpec) -> int:
        """Pages an adapter with this spec takes: computed, nothing kept, so any thread may
        ask (the layouts kept above belong to the step thread)."""
        return layout_adapter(spec, self.cfg, self.pool.page_numel).num_pages

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

    def is_resident(self, adapter_id: int) -> bool:
        """True when a request for this adapter needs no load (none, or already in the pool)."""
        return adapter_id == NO_ADAPTER or adapter_id in self._resident

    def is_ready(self, adapter_id: int) -> bool:
        """Whether a request for this adapter may be admitted as far as its weights go: in the
        pool, or in host memory. If not, the loader reads them meanwhile; a read that fails
        is reported once by take_load_errors()."""
        if self.is_resident(adapter_id):
            return True
        try:
            return self.loader.ready(adapter_id)
        except AdapterLoadError as exc:
            self._load_errors[adapter_id] = str(exc)
            return False

    def take_load_errors(self) -> dict[int, str]:
        """Adapters whose weights could not be read since the last call, and why."""
        errors, self._load_errors = self._load_errors, {}
        return errors

    def can_admit(self, adapter_id: int, kv_blocks: int) -> bool:
        """Whether a slot and pages are free or reclaimable for the adapter (once is_ready)."""
        if adapter_id == NO_ADAPTER:
            return True
        r = self._resident.get(adapter_id)
        if r is not None:
            # Admission pins an idle adapter: its pages stop being reclaimable for KV blocks.
            return r.refcount > 0 or kv_blocks <= self.pool.available(self.reclaimer) - len(r.pages)
        if not self._free_slots and not self._idle():
            return False
        return self.pages_needed(adapter_id) + kv_blocks <= self.pool.available(self.reclaimer)

    def admit(self, adapter_id: int) -> None:
        if adapter_id == NO_ADAPTER:
            return
        r = self._ensure_resident(adapter_id)
        r.refcount += 1
        self._resident.move_to_end(r.adapter_id)

    def release(self, adapter_id: int) -> None:
        r = self._resident.get(adapter_id)
        if r is not None:
            assert r.refcount > 0, f"adapter {r.name} released more often than admitted"
            r.refcount -= 1
            if r.refcount == 0:
                r.key = self.clock.stamp(self.clock.adapter_cost())

    def prefetch(self, waiting: Iterable[int]) -> None:
        """Ready the adapters of the next waiting requests (their adapter ids, in queue order):
        into host memory on the loader's thread, and into the pool now if a slot and free
        pages (no eviction) allow. Held weights no request near the head wants are let go."""
        wanted: list[int] = []
        for aid in waiting:
            if len(wanted) >= self.prefetch_depth:
                break
            if aid == NO_ADAPTER or aid in self._resident or aid in wanted:
                continue
            wanted.append(aid)
            if not self.is_ready(aid):
                continue
            if self._free_slots and self.pages_needed(aid) <= self.pool.num_free:
                self._ensure_resident(aid)
        self.loader.keep_only(set(wanted))

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
        layout = self._layout(adapter_id)
        slot = self._take_slot()
        try:
            pages = self.pool.allocate(layout.num_pages, ADAPTER, self.reclaimer)
        except Exception:
            self._free_slots.append(slot)
            raise
        weights = self.loader.take(adapter_id)  # in host memory: is_ready() said so
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
        self.loader.discard(adapter_id)
        self._load_errors.pop(adapter_id, None)
        r = self._resident.get(adapter_id)
        if r is None:
            return True
        if r.refcount:
            return False
        self._evict(r)
        return True

    def lora_batch(self, token_counts: Iterable[tuple[int, int]]) -> LoRABatch | None:
        """The step's segments from (adapter_id, num_tokens) per sequence, in batch order (grouped
        by adapter: group_by_adapter); None when no token uses an adapter."""
        segments: list[AdapterSegment] = []
        start = 0
        for adapter_id, num_tokens in token_counts:
            if adapter_id != NO_ADAPTER:
                if segments and segments[-1].adapter_id == adapter_id and segments[-1].end == start:
                    segments[-1].length += num_tokens
                else:
                    assert all(r.adapter_id != adapter_id for r in segments), (
                        "a step's sequences must be grouped by adapter (group_by_adapter)"
                    )
                    r = self._resident.get(adapter_id)
                    assert r is not None, f"adapter {adapter_id} is not resident"
                    segments.append(
                        AdapterSegment(start, num_tokens, adapter_id, r.slot, r.weights)
                    )
            start += num_tokens
        if not segments:
            return None
        return LoRABatch(
            segments,
            self.pool.buffer.view(-1),
            self.tables,
            self.lora_ops,
            self.segment_buffers.fill(segments),
            self.max_rank,
        )

    def take_load_times(self) -> list[float]:
        """Durations of the loads since the last call (for the load-latency histogram)."""
        times, self._load_times = self._load_times, []
        return times

    def shutdown(self) -> None:
        self.loader.shutdown()
