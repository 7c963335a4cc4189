"""In-place reload in the registry and the store: a new version under the same name, the old
one kept in memory for the requests that hold it until the engine drops it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters import AdapterError, AdapterNotFoundError, AdapterRegistry, AdapterStore
from adapters.format import CONFIG_FILE
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

BASE = tiny_base()


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(tmp_path), BASE, MAX_RANK, 1 << 20)


def first_lora_a(registry: AdapterRegistry, adapter_id: int) -> torch.Tensor:
    return registry.weights(adapter_id).lora[0, "q_proj"][0]


def test_reload_gives_the_name_a_new_id_and_version_with_the_new_weights(
    registry: AdapterRegistry,
) -> None:
    old = registry.register_files("a", tiny_files(seed=1))
    old_a = first_lora_a(registry, old.adapter_id).clone()
    new, retired = registry.reload_files("a", tiny_files(seed=2))
    assert retired == old
    assert registry.get("a") == new
    assert new.adapter_id != old.adapter_id
    assert (new.version, old.version) == (2, 1)
    assert new.record.sha256 != old.record.sha256
    assert registry.store.get("a") == new.record
    assert not torch.equal(first_lora_a(registry, new.adapter_id), old_a)
    assert len(registry) == 1


def test_the_retired_version_keeps_its_old_weights_until_dropped(
    registry: AdapterRegistry,
) -> None:
    old = registry.register_files("a", tiny_files(seed=1))
    old_a = first_lora_a(registry, old.adapter_id).clone()
    registry.reload_files("a", tiny_files(seed=2))
    # Not from disk (which holds the new files now), and not evictable from the host cache.
    assert torch.equal(first_lora_a(registry, old.adapter_id), old_a)
    assert registry.is_host_resident(old.adapter_id)
    registry.drop_retired(old.adapter_id)
    assert registry.by_id(old.adapter_id) is None
    with pytest.raises(AdapterNotFoundError):
        registry.weights(old.adapter_id)


def test_a_bad_reload_changes_nothing(registry: AdapterRegistry) -> None:
    old = registry.register_files("a", tiny_files(seed=1))
    files = tiny_files(seed=2)
    files[CONFIG_FILE] = files[CONFIG_FILE].replace(b'"r": 2', b'"r": 3')
    with pytest.raises(AdapterError, match=r"expected \[3, 64\]"):
        registry.reload_files("a", files)
    assert registry.get("a") == old
    assert registry.store.get("a") == old.record
    assert [p.name for p in registry.store.blobs.iterdir()] == ["a"]
    with pytest.raises(AssertionError, match="is not retired"):
        registry.drop_retired(old.adapter_id)


def test_reloading_an_unknown_adapter_is_not_found(registry: AdapterRegistry) -> None:
    with pytest.raises(AdapterNotFoundError, match="'nope' does not exist"):
        registry.reload_files("nope", tiny_files())
    assert registry.store.list() == []


def test_reload_leaves_one_directory_in_the_store(registry: AdapterRegistry) -> None:
    registry.register_files("org/a", tiny_files(seed=1))
    registry.reload_files("org/a", tiny_files(seed=2))
    registry.reload_files("org/a", tiny_files(seed=3))
    assert [p.name for p in registry.store.blobs.iterdir()] == ["org%2Fa"]
    assert registry.get("org/a").version == 3  # type: ignore[union-attr]
