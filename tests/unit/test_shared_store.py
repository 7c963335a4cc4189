"""The shared adapter store: what one replica adds or deletes, the others see; a half-written
adapter is never listed. Over file:// and an S3-compatible server (moto)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters import (
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterRegistry,
    AdapterSpec,
    read_adapter_spec,
)
from adapters.faults import set_fault_points
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapters.shared_store import SharedAdapterStore, storage_options
from server.config import ConfigError, ServerConfig
from tests.s3_server import moto_s3, new_bucket
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files, tiny_weights

BASE = tiny_base()


def validate(path: Path) -> AdapterSpec:
    return read_adapter_spec(path, BASE, MAX_RANK)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """A fresh shared location and its fsspec options."""
    if request.param == "file":
        return f"file://{tmp_path / 'shared'}", {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{new_bucket(endpoint)}/prefix", storage_options("s3://x", endpoint)


def replica(url: tuple[str, dict], data_dir: Path) -> SharedAdapterStore:
    return SharedAdapterStore(url[0], data_dir, durable=False, options=url[1])


def test_an_adapter_added_through_one_replica_serves_from_another(url, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path / "a"), replica(url, tmp_path / "b")
    files = tiny_files(rank=4)
    record = a.add("team/one", "upload", validate, files=files)
    assert b.get("team/one") is None  # not until it polls
    changes = b.refresh()
    assert [r.name for r in changes.added] == ["team/one"]
    assert b.get("team/one") == record
    assert not (tmp_path / "b" / "adapters").joinpath("team%2Fone").exists()  # fetched on use
    assert (b.path("team/one") / WEIGHTS_FILE).read_bytes() == files[WEIGHTS_FILE]


def test_a_delete_through_one_replica_is_seen_by_another(url, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path / "a"), replica(url, tmp_path / "b")
    a.add("one", "upload", validate, files=tiny_files())
    b.refresh()
    b.path("one")
    assert a.delete("one")
    assert a.get("one") is None
    assert b.refresh().removed == ("one",)
    assert [r.name for r in b.list()] == []
    assert (b.cache.path("one") / WEIGHTS_FILE).is_file()  # for requests still running
    b.evict("one")
    assert not (tmp_path / "b" / "adapters" / "one").exists()


def test_a_name_taken_on_another_replica_is_refused(url, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path / "a"), replica(url, tmp_path / "b")
    a.add("one", "upload", validate, files=tiny_files())
    with pytest.raises(AdapterExistsError):
        b.add("one", "upload", validate, files=tiny_files(rank=4))


def test_a_write_failing_before_its_manifest_is_never_listed(url, tmp_path: Path) -> None:
    a, b = replica(url, tmp_path / "a"), replica(url, tmp_path / "b")
    set_fault_points("store.shared.manifest=enospc")
    try:
        with pytest.raises(OSError):
            a.add("one", "upload", validate, files=tiny_files())
    finally:
        set_fault_points(None)
    assert a.get("one") is None
    assert b.refresh().added == () and b.list() == []
    assert a.fs.ls(f"{a.root}/blobs")  # the blobs were written; nothing refers to them


def test_an_invalid_adapter_publishes_nothing(url, tmp_path: Path) -> None:
    a = replica(url, tmp_path / "a")
    with pytest.raises(AdapterError):
        a.add("bad", "upload", validate, files={"adapter_config.json": b"{}"})
    assert a.refresh() == a.refresh().__class__()
    assert not a.fs.exists(f"{a.root}/blobs") or not a.fs.ls(f"{a.root}/blobs")


def test_a_corrupted_blob_is_refused_when_fetched(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a = SharedAdapterStore(f"file://{shared}", tmp_path / "a", durable=False)
    b = SharedAdapterStore(f"file://{shared}", tmp_path / "b", durable=False)
    record = a.add("one", "upload", validate, files=tiny_files())
    (shared / "blobs" / record.sha256).write_bytes(b"not the weights")
    b.refresh()
    with pytest.raises(AdapterError, match="does not match its sha256"):
        b.path("one")
    assert not b.cache.path("one").exists()


def test_a_replica_restarted_later_sees_the_store_as_it_is(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'shared'}"
    b = SharedAdapterStore(url, tmp_path / "b", durable=False)
    b.close()
    a = SharedAdapterStore(url, tmp_path / "a", durable=False)
    a.add("kept", "upload", validate, files=tiny_files())
    manifest = json.loads((tmp_path / "shared" / "manifests" / "kept.json").read_text())
    assert set(manifest["files"]) == {"adapter_config.json", WEIGHTS_FILE}
    b = SharedAdapterStore(url, tmp_path / "b", durable=False)
    assert [r.name for r in b.list()] == ["kept"]


def shared_registry(url: str, data_dir: Path) -> AdapterRegistry:
    store = SharedAdapterStore(url, data_dir, durable=False)
    registry = AdapterRegistry(store, BASE, MAX_RANK, 1 << 20)
    registry.load_index()
    return registry


def test_registry_sync_registers_other_replicas_adds_and_reports_their_deletes(
    tmp_path: Path,
) -> None:
    url = f"file://{tmp_path / 'shared'}"
    a, b = shared_registry(url, tmp_path / "a"), shared_registry(url, tmp_path / "b")
    a.register_files("one", tiny_files(rank=4))
    assert b.sync().deleted == []
    assert b.get("one") is not None and b.get("one").spec.rank == 4
    assert b.weights(b.get("one").adapter_id).nbytes > 0  # files fetched on first use
    a.unregister("one")
    assert b.sync().deleted == ["one"]  # still registered: the engine removes it, then evict
    b.forget("one")
    b.store.evict("one")
    assert b.sync().deleted == [] and b.get("one") is None


def test_registry_sync_does_not_bring_back_an_adapter_being_deleted(tmp_path: Path) -> None:
    a = shared_registry(f"file://{tmp_path / 'shared'}", tmp_path / "a")
    a.register_files("one", tiny_files())
    a.forget("one")  # the engine dropped it; store.delete has not run yet
    assert a.sync().deleted == [] and a.get("one") is None
    a.store.delete("one")
    a.register_files("one", tiny_files(rank=4))  # the name can be used again
    assert a.sync().deleted == [] and a.get("one").spec.rank == 4


def test_an_adapter_store_that_is_not_file_or_s3_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--adapter-store must be a file:// or s3:// URL"):
        ServerConfig(adapter_store="http://example.com/adapters")
    with pytest.raises(ConfigError, match="--adapter-store-poll-s must be > 0"):
        ServerConfig(adapter_store_poll_s=0)


# ---- in-place reload on a shared store ----------------------------------------------------


def registry_on(url: tuple[str, dict], data_dir: Path) -> AdapterRegistry:
    registry = AdapterRegistry(replica(url, data_dir), BASE, MAX_RANK, 1 << 20)
    registry.load_index()
    return registry


def lora_a(registry: AdapterRegistry, adapter_id: int) -> torch.Tensor:
    return registry.weights(adapter_id).lora[0, "q_proj"][0]


def reference(seed: int) -> torch.Tensor:
    return tiny_weights(seed=seed).lora[0, "q_proj"][0]


def test_a_reload_through_one_replica_is_taken_by_another_at_its_next_sync(
    url, tmp_path: Path
) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    a.register_files("one", tiny_files(seed=1))
    b.sync()
    old = b.get("one")
    assert old is not None and torch.equal(lora_a(b, old.adapter_id), reference(1))
    new_files = {**tiny_files(seed=2), "chat_template.jinja": b"{{ messages }}"}
    a_new, _ = a.reload_files("one", new_files)
    assert torch.equal(lora_a(a, a_new.adapter_id), reference(2))
    assert b.get("one") == old  # not until it polls
    changes = b.sync()
    assert changes.deleted == []
    [(new, retired)] = changes.replaced
    assert retired == old and b.get("one") == new and new.version == 2
    assert new.record == a_new.record and new.spec.chat_template is not None
    assert torch.equal(lora_a(b, new.adapter_id), reference(2))
    assert torch.equal(lora_a(b, old.adapter_id), reference(1))  # held for its requests
    b.drop_retired(old.adapter_id)
    assert b.sync().replaced == []  # reported once


def test_an_old_version_never_used_here_is_fetched_by_its_own_digests_when_retired(
    url, tmp_path: Path
) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    a.register_files("one", tiny_files(seed=1))
    b.sync()
    old = b.get("one")
    assert old is not None and not b.store.cache.path("one").exists()
    a.reload_files("one", tiny_files(seed=2))
    [(new, _)] = b.sync().replaced
    assert torch.equal(lora_a(b, old.adapter_id), reference(1))
    assert torch.equal(lora_a(b, new.adapter_id), reference(2))


def test_a_replica_started_after_a_reload_serves_the_new_version(url, tmp_path: Path) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    a.register_files("one", tiny_files(seed=1))
    b.sync()
    lora_a(b, b.get("one").adapter_id)  # type: ignore[union-attr]  (files now cached in b)
    b.store.close()
    a.reload_files("one", tiny_files(seed=2))
    restarted = registry_on(url, tmp_path / "b")
    assert torch.equal(lora_a(restarted, restarted.get("one").adapter_id), reference(2))  # type: ignore[union-attr]


def test_a_reload_failing_before_its_manifest_changes_nothing_anywhere(url, tmp_path: Path) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    old = a.register_files("one", tiny_files(seed=1))
    b.sync()
    set_fault_points("store.shared.manifest=enospc")
    try:
        with pytest.raises(OSError):
            a.reload_files("one", tiny_files(seed=2))
    finally:
        set_fault_points(None)
    assert a.get("one") == old and torch.equal(lora_a(a, old.adapter_id), reference(1))
    assert b.sync().replaced == []
    assert torch.equal(lora_a(b, b.get("one").adapter_id), reference(1))  # type: ignore[union-attr]


def test_an_invalid_reload_publishes_nothing(url, tmp_path: Path) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    old = a.register_files("one", tiny_files(seed=1))
    b.sync()
    with pytest.raises(AdapterError):
        a.reload_files("one", {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"x"})
    assert a.get("one") == old and b.sync().replaced == []


def test_a_reload_of_an_adapter_deleted_elsewhere_is_refused(url, tmp_path: Path) -> None:
    a, b = registry_on(url, tmp_path / "a"), registry_on(url, tmp_path / "b")
    a.register_files("one", tiny_files(seed=1))
    b.sync()
    a.unregister("one")
    with pytest.raises(AdapterNotFoundError):
        b.reload_files("one", tiny_files(seed=2))


def test_a_restarted_replica_reads_only_the_manifests_rewritten_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = (f"file://{tmp_path / 'shared'}", {})
    a = registry_on(url, tmp_path / "a")
    a.register_files("kept", tiny_files(seed=1))
    a.register_files("reloaded", tiny_files(seed=1))
    replica(url, tmp_path / "b").close()
    a.reload_files("reloaded", tiny_files(seed=2))
    read: list[str] = []
    original = SharedAdapterStore._read_manifest

    def counting(self: SharedAdapterStore, path: str) -> dict | None:
        read.append(path.rsplit("/", 1)[-1])
        return original(self, path)

    monkeypatch.setattr(SharedAdapterStore, "_read_manifest", counting)
    b = registry_on(url, tmp_path / "b")
    assert read == ["reloaded.json"]
    assert torch.equal(lora_a(b, b.get("reloaded").adapter_id), reference(2))  # type: ignore[union-attr]
