"""What the engine lets other threads see of itself: copies (built by server.engine.observe).

`EngineFacts` is fixed once the engine is built (safe to read anywhere); an `EngineSnapshot`
is the state between two steps (queues, pool use, adapter counts), built by the step thread
and handed out whole, so metrics and /info never read the engine's live structures.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("gpu", "cpu", "disk")  # an adapter's residency, most to least ready


@dataclass(frozen=True)
class EngineFacts:
    """The engine's settings and sizes, fixed at start-up."""

    model_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_parameters: int
    quantize: str
    dtype: str
    device: str
    max_model_len: int
    max_num_seqs: int
    max_lora_rank: int
    max_loras: int
    host_cache_mb: int
    lora_backend: str | None  # None: the engine serves no adapters
    kernel_backend: str
    num_pages: int
    page_bytes: int
    block_size: int
    cache_dtype: str
    prefix_caching: bool


@dataclass(frozen=True)
class PoolUse:
    """The page pool's pages by use: one budget for KV, cached prefixes and adapters."""

    kv: int  # KV blocks running requests hold
    kv_cached: int  # cached prefix blocks no request holds (given back on demand)
    adapter: int
    free: int
    kv_usage: float  # share of all pages holding KV blocks that requests use


@dataclass(frozen=True)
class PrefixCounts:
    """The prefix cache's size and running totals."""

    cached_blocks: int
    queried_tokens: int
    hit_tokens: int
    reclaimed_blocks: int  # evicted for room or dropped with their adapter version


@dataclass(frozen=True)
class AdapterCounts:
    """Adapters registered and resident, and running totals of their moves."""

    registered: int
    host_resident: int
    device_resident: int
    loads: int  # into the device pool
    evictions: int  # from the device pool
    disk_loads: int  # reads into host memory
    host_evictions: int

    @property
    def moves(self) -> tuple[int, ...]:
        """Counters that change whenever an adapter changes level (or the registry its size)."""
        return (self.loads, self.evictions, self.disk_loads, self.host_evictions, self.registered)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine between two steps."""

    facts: EngineFacts
    num_running: int
    num_waiting: int
    pool: PoolUse
    prefix: PrefixCounts | None  # None: prefix caching is off
    adapters: AdapterCounts | None  # None: the engine serves no adapters
    running_adapters: tuple[str, ...]  # names, sorted, once each
    waiting_adapters: tuple[str, ...]


@dataclass(frozen=True)
class AdapterUsage:
    """One adapter version as the engine sees it now."""

    active_requests: int  # running and waiting
    on_device: bool  # its weights are in the page pool
