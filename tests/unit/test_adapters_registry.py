"""The adapter registry: validated registration, lookups at scale, and the host-memory LRU."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import adapters.registry
from adapters import (
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterRegistry,
    AdapterStore,
)
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_config, tiny_files, tiny_weights

BASE = tiny_base()
ADAPTER_BYTES = tiny_weights(rank=2).nbytes  # rank 2 on q_proj and v_proj of 2 layers, float32


def make_registry(data_dir: Path, cache_bytes: int = 1 << 20, **kwargs) -> AdapterRegistry:  # type: ignore[no-untyped-def]
    return AdapterRegistry(AdapterStore(data_dir), BASE, MAX_RANK, cache_bytes, **kwargs)


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return make_registry(tmp_path)


def test_registered_upload_is_found_by_name_and_id(registry: AdapterRegistry) -> None:
    reg = registry.register_files("org/a", tiny_files(rank=4))
    assert registry.get("org/a") == reg
    assert registry.by_id(reg.adapter_id) == reg
    assert reg.spec.max_rank == 4
    assert reg.record.source == "upload"
    assert len(registry) == 1


def test_bad_upload_registers_nothing(registry: AdapterRegistry) -> None:
    files = tiny_files(rank=2)
    files[CONFIG_FILE] = files[CONFIG_FILE].replace(b'"r": 2', b'"r": 3')
    with pytest.raises(AdapterError, match=r"has shape \[2, 64\], expected \[3, 64\]"):
        registry.register_files("bad", files)
    assert registry.get("bad") is None
    assert registry.store.get("bad") is None
    assert list(registry.store.blobs.iterdir()) == []


def test_upload_with_nan_weights_registers_nothing(registry: AdapterRegistry) -> None:
    weights = tiny_weights(rank=2)
    weights.lora[1, "v_proj"][1][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="contains NaN or Inf"):
        registry.register_weights("bad", tiny_config(rank=2), weights)
    assert len(registry) == 0
    assert registry.store.list() == []


def test_pickled_upload_is_refused(registry: AdapterRegistry) -> None:
    files = {CONFIG_FILE: tiny_files()[CONFIG_FILE], "adapter_model.bin": b"\x80\x04"}
    with pytest.raises(AdapterError, match=r"pickled \.bin adapters are refused"):
        registry.register_files("a", files)


def test_existing_name_is_refused(registry: AdapterRegistry) -> None:
    registry.register_files("a", tiny_files())
    with pytest.raises(AdapterExistsError):
        registry.register_files("a", tiny_files())


def test_registered_directory_is_copied_into_the_store(
    registry: AdapterRegistry, tmp_path: Path
) -> None:
    source = tmp_path / "outside"
    source.mkdir()
    for file, data in tiny_files(rank=3).items():
        (source / file).write_bytes(data)
    reg = registry.register_dir("copied", source)
    shutil.rmtree(source)
    assert reg.record.source == "path"
    assert registry.weights(reg.adapter_id).lora[0, "q_proj"][0].shape == (3, 64)


def test_directory_with_only_pickled_weights_is_refused(
    registry: AdapterRegistry, tmp_path: Path
) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(tiny_files()[CONFIG_FILE])
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterError, match=r"pickled \.bin adapters are refused"):
        registry.register_dir("a", tmp_path)


def test_registered_training_result_serves_the_same_weights(registry: AdapterRegistry) -> None:
    weights = tiny_weights(rank=2, seed=3)
    reg = registry.register_weights("tuned", tiny_config(rank=2), weights)
    served = registry.weights(reg.adapter_id)
    assert reg.record.source == "training"
    for key, (a, b) in weights.lora.items():
        torch.testing.assert_close(served.lora[key][0], a)
        torch.testing.assert_close(served.lora[key][1], b)


def test_unregister_removes_from_index_store_and_cache(registry: AdapterRegistry) -> None:
    reg = registry.register_files("a", tiny_files())
    registry.warm(reg.adapter_id)
    assert registry.unregister("a")
    assert registry.get("a") is None
    assert registry.by_id(reg.adapter_id) is None
    assert registry.store.get("a") is None
    assert not registry.is_host_resident(reg.adapter_id)
    assert registry.stats.host_bytes == 0
    assert not registry.unregister("a")


def test_ids_are_not_reused_after_unregister(registry: AdapterRegistry) -> None:
    first = registry.register_files("a", tiny_files())
    registry.unregister("a")
    second = registry.register_files("a", tiny_files())
    assert second.adapter_id != first.adapter_id


def test_load_index_restores_stored_adapters(tmp_path: Path) -> None:
    make_registry(tmp_path).register_files("a", tiny_files(rank=5))
    restarted = make_registry(tmp_path)
    assert restarted.load_index() == 1
    assert restarted.get("a").spec.max_rank == 5


def test_load_index_skips_adapters_that_no_longer_validate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_registry(tmp_path)
    first.register_files("big", tiny_files(rank=8))
    first.register_files("small", tiny_files(rank=2))
    restarted = AdapterRegistry(AdapterStore(tmp_path), BASE, 4, 1 << 20)
    with caplog.at_level(logging.WARNING):
        assert restarted.load_index() == 1
    assert restarted.get("big") is None
    assert "skipping stored adapter big" in caplog.text


def test_host_cache_is_bounded_by_bytes_and_evicts_least_recently_used(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, cache_bytes=int(2.5 * ADAPTER_BYTES))
    a, b, c = (registry.register_files(n, tiny_files()).adapter_id for n in "abc")
    registry.weights(a)
    registry.weights(b)
    registry.weights(a)  # b is now least recently used
    registry.weights(c)
    assert [registry.is_host_resident(i) for i in (a, b, c)] == [True, False, True]
    stats = registry.stats
    assert (stats.host_loads, stats.host_evictions, stats.num_host_resident) == (3, 1, 2)
    assert stats.host_bytes == 2 * ADAPTER_BYTES
    assert stats.disk_load_seconds > 0


def test_cache_hit_does_not_read_from_disk(registry: AdapterRegistry) -> None:
    reg = registry.register_files("a", tiny_files())
    first = registry.weights(reg.adapter_id)
    shutil.rmtree(registry.store.path("a"))
    assert registry.weights(reg.adapter_id) is first
    assert registry.stats.host_loads == 1


def test_adapter_larger_than_the_cache_is_served_uncached(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, cache_bytes=ADAPTER_BYTES - 1)
    reg = registry.register_files("a", tiny_files())
    assert registry.weights(reg.adapter_id).nbytes == ADAPTER_BYTES
    assert not registry.is_host_resident(reg.adapter_id)
    assert registry.stats.host_evictions == 0


def test_weights_are_converted_to_the_registry_dtype(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, dtype=torch.bfloat16)
    reg = registry.register_files("a", tiny_files())
    weights = registry.weights(reg.adapter_id)
    assert {t.dtype for t in weights.tensors()} == {torch.bfloat16}
    assert registry.stats.host_bytes == ADAPTER_BYTES // 2


def test_concurrent_requests_for_one_adapter_read_it_once(
    registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = registry.register_files("a", tiny_files())
    real_read = adapters.registry.read_adapter

    def slow_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(adapters.registry, "read_adapter", slow_read)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.weights(reg.adapter_id)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.stats.host_loads == 1
    assert all(r is results[0] for r in results)


def test_warm_makes_an_adapter_host_resident(registry: AdapterRegistry) -> None:
    reg = registry.register_files("a", tiny_files())
    assert not registry.is_host_resident(reg.adapter_id)
    registry.warm(reg.adapter_id)
    assert registry.is_host_resident(reg.adapter_id)


def test_weights_of_an_unknown_id_raise_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(AdapterNotFoundError, match="adapter id 42 is not registered"):
        registry.weights(42)


def test_ten_thousand_adapters_register_and_reload_quickly(tmp_path: Path) -> None:
    # durable=False skips fsync only (about 2 ms per add on this CI disk); everything else,
    # full validation included, runs as in production.
    n, batch = 10_000, 1000
    registry = AdapterRegistry(AdapterStore(tmp_path, durable=False), BASE, MAX_RANK, 1 << 20)
    files = tiny_files()
    batch_seconds = []
    for start in range(0, n, batch):
        t0 = time.perf_counter()
        for i in range(start, start + batch):
            registry.register_files(f"org/adapter-{i}", files)
        batch_seconds.append(time.perf_counter() - t0)
    # O(n) work per registration would make the last batch ~19x slower than the first.
    assert batch_seconds[-1] < 5 * batch_seconds[0]

    t0 = time.perf_counter()
    restarted = AdapterRegistry(AdapterStore(tmp_path, durable=False), BASE, MAX_RANK, 1 << 20)
    assert restarted.load_index() == n
    assert time.perf_counter() - t0 < 20
    assert len({restarted.get(f"org/adapter-{i}").adapter_id for i in range(n)}) == n
    reg = restarted.get("org/adapter-9999")
    assert restarted.by_id(reg.adapter_id) is reg
    assert (restarted.store.path(reg.name) / WEIGHTS_FILE).exists()
