"""Copies of the engine's state (server.engine.snapshot), built on the step thread: the only
place that reads the engine's parts for anyone outside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.engine.snapshot import (
    AdapterCounts,
    AdapterUsage,
    EngineFacts,
    EngineSnapshot,
    PoolUse,
    PrefixCounts,
)
from server.memory.page_pool import ADAPTER, KV

if TYPE_CHECKING:
    from server.engine.llm_engine import LLMEngine


def engine_facts(llm: LLMEngine) -> EngineFacts:
    """The engine's settings and sizes (fixed once it is built)."""
    cfg, config, pool = llm.model_config, llm.config, llm.pool
    cache = llm.adapter_cache
    return EngineFacts(
        model_path=str(config.model),
        architecture=cfg.architecture,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_parameters=cfg.num_params,
        quantize=config.quantize,
        dtype=str(config.torch_dtype).removeprefix("torch."),
        device=str(llm.device),
        max_model_len=llm.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_lora_rank=config.max_lora_rank,
        max_loras=config.max_loras,
        host_cache_mb=config.host_cache_mb,
        lora_backend=cache.lora_ops.name if cache is not None else None,
        kernel_backend=llm.backends.kernels.name,
        num_pages=pool.num_pages,
        page_bytes=pool.page_bytes,
        block_size=pool.geometry.block_size,
        cache_dtype=str(pool.buffer.dtype).removeprefix("torch."),
        prefix_caching=llm.prefix_cache is not None,
    )


def snapshot(llm: LLMEngine, facts: EngineFacts) -> EngineSnapshot:
    """The engine's state now (step thread)."""
    sched, pool, kv = llm.scheduler, llm.pool, llm.kv
    cached_idle = kv.num_cached_idle
    use = PoolUse(
        kv=pool.used_by_kind[KV] - cached_idle,
        kv_cached=cached_idle,
        adapter=pool.used_by_kind[ADAPTER],
        free=pool.num_free,
        kv_usage=kv.usage,
    )
    prefix = None
    if llm.prefix_cache is not None:
        stats = llm.prefix_cache.stats
        prefix = PrefixCounts(
            llm.prefix_cache.num_cached_blocks,
            stats.queried_tokens,
            stats.hit_tokens,
            stats.reclaimed_blocks + stats.dropped_blocks,
        )
    adapters = None
    cache, registry = llm.adapter_cache, llm.registry
    if cache is not None and registry is not None:
        host = registry.stats
        adapters = AdapterCounts(
            len(registry),
            host.num_host_resident,
            cache.num_resident,
            cache.stats.loads,
            cache.stats.evictions,
            host.host_loads,
            host.host_evictions,
        )
    return EngineSnapshot(
        facts=facts,
        num_running=len(sched.running),
        num_waiting=len(sched.waiting),
        pool=use,
        prefix=prefix,
        adapters=adapters,
        running_adapters=tuple(sorted({s.adapter_name for s in sched.running if s.adapter_name})),
        waiting_adapters=tuple(sorted({s.adapter_name for s in sched.waiting if s.adapter_name})),
    )


def adapter_levels(llm: LLMEngine) -> dict[str, str]:
    """Every registered adapter's residency (step thread): `gpu` (in the device pool), `cpu`
    (weights in the host cache) or `disk` (only in the store)."""
    cache, registry = llm.adapter_cache, llm.registry
    if cache is None or registry is None:
        return {}
    on_device = set(cache.resident_ids())
    levels = {}
    for reg in registry.list():
        if reg.adapter_id in on_device:
            levels[reg.name] = "gpu"
        elif registry.is_host_resident(reg.adapter_id):
            levels[reg.name] = "cpu"
        else:
            levels[reg.name] = "disk"
    return levels


def adapter_usage(llm: LLMEngine, adapter_ids: list[int]) -> list[AdapterUsage]:
    """Requests and device residency of each adapter version (step thread)."""
    cache = llm.adapter_cache
    return [
        AdapterUsage(llm.requests_for_adapter(i), cache is not None and cache.get(i) is not None)
        for i in adapter_ids
    ]
