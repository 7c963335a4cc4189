"""The merged-adapter cache: one merge per distinct spec, virtual adapters the registry serves
but never lists, LRU eviction that spares busy and just-resolved merges, and no stale merge
after a source is reloaded or deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters import AdapterRegistry, AdapterStore
from adapters.merge import MergeParams, merge_adapters
from server.api.schemas.lorax import MergedAdapters
from server.engine.errors import AdapterBusyError, InvalidRequestError, UnknownAdapterError
from server.serving.merges import MergedAdapterCache
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

FIELD = "merged_adapters"


class FakeEngine:
    """AsyncLLMEngine.remove_adapter's contract: refused while requests use the adapter."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.busy: set[str] = set()

    async def remove_adapter(self, name: str) -> None:
        if self.registry.get(name) is None:
            raise UnknownAdapterError(f"adapter {name!r} does not exist", "name")
        if name in self.busy:
            raise AdapterBusyError(name, 1)
        self.registry.forget(name)


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    reg = AdapterRegistry(AdapterStore(tmp_path, durable=False), tiny_base(), MAX_RANK, 1 << 20)
    for i in range(3):
        reg.register_files(f"src-{i}", tiny_files(rank=2, seed=i))
    return reg


def make_cache(
    registry: AdapterRegistry, engine: FakeEngine | None = None, **kwargs: Any
) -> MergedAdapterCache:
    engine = engine or FakeEngine(registry)
    return MergedAdapterCache(registry, engine.remove_adapter, **kwargs)


def spec(*ids: str, weights: tuple[float, ...] | None = None, **kw: Any) -> MergedAdapters:
    return MergedAdapters(ids=list(ids), weights=list(weights or [1.0] * len(ids)), **kw)


def test_a_merge_is_a_virtual_adapter_with_the_merged_weights(registry: AdapterRegistry) -> None:
    cache = make_cache(registry)
    name = asyncio.run(cache.resolve(spec("src-0", "src-1", weights=(0.5, 2.0)), FIELD))
    reg = registry.get(name)
    assert reg is not None and name.startswith(".merged/")
    sources = [
        (registry.get(n).spec, registry.weights(registry.get(n).adapter_id))
        for n in ("src-0", "src-1")
    ]  # type: ignore[union-attr]
    _, expected = merge_adapters(["src-0", "src-1"], sources, MergeParams((0.5, 2.0)), seed=0)
    served = registry.weights(reg.adapter_id)
    for key, (a, b) in expected.lora.items():
        assert torch.equal(served.lora[key][0], a) and torch.equal(served.lora[key][1], b)
    assert registry.is_host_resident(reg.adapter_id)
    assert name not in {r.name for r in registry.list()} and len(registry) == 3


def test_concurrent_identical_specs_merge_once(registry: AdapterRegistry) -> None:
    cache = make_cache(registry)

    async def resolve_many() -> list[str]:
        return await asyncio.gather(
            *(cache.resolve(spec("src-0", "src-1"), FIELD) for _ in range(5))
        )

    names = asyncio.run(resolve_many())
    assert len(set(names)) == 1
    assert cache.num_merges == 1
    asyncio.run(cache.resolve(spec("src-0", "src-1"), FIELD))
    assert cache.num_merges == 1


def test_different_weights_or_strategy_are_different_merges(registry: AdapterRegistry) -> None:
    cache = make_cache(registry)
    names = {
        asyncio.run(cache.resolve(s, FIELD))
        for s in (
            spec("src-0", "src-1"),
            spec("src-0", "src-1", weights=(1.0, 0.5)),
            spec("src-0", "src-1", merge_strategy="ties", density=0.5),
        )
    }
    assert len(names) == 3 and cache.num_merges == 3


def test_least_recently_used_idle_merge_is_evicted_beyond_the_bound(
    registry: AdapterRegistry,
) -> None:
    cache = make_cache(registry, max_entries=2, grace_s=0.0)
    first = asyncio.run(cache.resolve(spec("src-0"), FIELD))
    second = asyncio.run(cache.resolve(spec("src-1"), FIELD))
    asyncio.run(cache.resolve(spec("src-0"), FIELD))  # first is now the most recent
    third = asyncio.run(cache.resolve(spec("src-2"), FIELD))
    assert registry.get(second) is None
    assert registry.get(first) is not None and registry.get(third) is not None
    assert len(cache) == 2


def test_busy_or_just_used_merges_are_not_evicted(registry: AdapterRegistry) -> None:
    engine = FakeEngine(registry)
    cache = make_cache(registry, engine, max_entries=1, grace_s=0.0)
    busy = asyncio.run(cache.resolve(spec("src-0"), FIELD))
    engine.busy.add(busy)
    asyncio.run(cache.resolve(spec("src-1"), FIELD))
    assert registry.get(busy) is not None and len(cache) == 2
    patient = make_cache(registry, max_entries=1, grace_s=60.0)
    recent = asyncio.run(patient.resolve(spec("src-1", "src-2"), FIELD))
    asyncio.run(patient.resolve(spec("src-2"), FIELD))
    assert registry.get(recent) is not None


def test_a_reloaded_source_gives_a_new_merge_and_drops_the_old(
    registry: AdapterRegistry,
) -> None:
    cache = make_cache(registry)
    old = asyncio.run(cache.resolve(spec("src-0", "src-1"), FIELD))
    registry.reload_files("src-1", tiny_files(rank=2, seed=9))
    new = asyncio.run(cache.resolve(spec("src-0", "src-1"), FIELD))
    assert new != old
    assert registry.get(old) is None and len(cache) == 1


def test_a_deleted_source_drops_its_merges(registry: AdapterRegistry) -> None:
    cache = make_cache(registry)
    merged = asyncio.run(cache.resolve(spec("src-0", "src-2"), FIELD))
    registry.unregister("src-2")
    asyncio.run(cache.drop_stale())
    assert registry.get(merged) is None and len(cache) == 0
    with pytest.raises(InvalidRequestError, match="'src-2' does not exist") as err:
        asyncio.run(cache.resolve(spec("src-0", "src-2"), FIELD))
    assert err.value.param == "merged_adapters.ids"


def test_a_merge_cannot_name_another_merge(registry: AdapterRegistry) -> None:
    cache = make_cache(registry)
    merged = asyncio.run(cache.resolve(spec("src-0"), FIELD))
    with pytest.raises(InvalidRequestError, match="does not exist"):
        asyncio.run(cache.resolve(spec(merged), FIELD))


def test_a_refused_merge_registers_nothing(registry: AdapterRegistry) -> None:
    registry.register_files("rank-4", tiny_files(rank=4, seed=5))
    cache = make_cache(registry)
    with pytest.raises(InvalidRequestError, match="same LoRA rank") as err:
        asyncio.run(cache.resolve(spec("src-0", "rank-4"), FIELD))
    assert err.value.param == "merged_adapters.ids"
    with pytest.raises(InvalidRequestError, match="exceed") as err:
        asyncio.run(cache.resolve(spec("src-0", weights=(1e12,)), FIELD))
    assert err.value.param == "merged_adapters.weights"
    assert len(cache) == 0 and cache.num_merges == 0
    assert len(registry.list()) == 4
