"""The on-disk adapter store: atomic adds, crash leftovers cleaned on restart, safe names."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from adapters import AdapterError, AdapterExistsError, AdapterSpec, AdapterStore, read_adapter_spec
from adapters.format import WEIGHTS_FILE
from adapters.records import COLUMNS, VALUES, record_row
from adapters.store import DB_FILE
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

BASE = tiny_base()


def validate(path: Path) -> AdapterSpec:
    return read_adapter_spec(path, BASE, MAX_RANK)


def fail(path: Path) -> AdapterSpec:
    raise AdapterError("validation failed")


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path)


def leftovers(store: AdapterStore) -> list[str]:
    return sorted(p.name for p in store.blobs.iterdir())


def test_add_records_hash_size_and_spec(store: AdapterStore) -> None:
    files = tiny_files(rank=4)
    record = store.add("a", "upload", validate, files=files)
    assert record.sha256 == hashlib.sha256(files[WEIGHTS_FILE]).hexdigest()
    assert record.size_bytes == sum(len(b) for b in files.values())
    assert (record.rank, record.alpha, record.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert record.spec == validate(store.path("a"))
    assert store.get("a") == record


def test_records_survive_reopening(tmp_path: Path) -> None:
    first = AdapterStore(tmp_path)
    record = first.add("a", "upload", validate, files=tiny_files())
    first.close()
    reopened = AdapterStore(tmp_path)
    assert reopened.get("a") == record
    assert (reopened.path("a") / WEIGHTS_FILE).read_bytes() == tiny_files()[WEIGHTS_FILE]


def test_index_uses_write_ahead_logging(store: AdapterStore) -> None:
    with sqlite3.connect(store.data_dir / DB_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_existing_name_is_refused(store: AdapterStore) -> None:
    store.add("a", "upload", validate, files=tiny_files())
    with pytest.raises(AdapterExistsError, match="adapter 'a' already exists"):
        store.add("a", "upload", validate, files=tiny_files(rank=3))


def test_failed_validation_leaves_nothing(store: AdapterStore) -> None:
    with pytest.raises(AdapterError, match="validation failed"):
        store.add("a", "upload", fail, files=tiny_files())
    assert store.get("a") is None
    assert leftovers(store) == []


def test_failure_after_rename_leaves_nothing(store: AdapterStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def crash_on_store_dir(path: Path) -> None:
        if path == store.blobs:
            assert (store.blobs / "a").exists()  # renamed into place, not yet indexed
            raise OSError("disk gone")

    monkeypatch.setattr(store, "_fsync", crash_on_store_dir)
    with pytest.raises(OSError, match="disk gone"):
        store.add("a", "upload", validate, files=tiny_files())
    assert store.get("a") is None
    assert leftovers(store) == []


def test_leftover_temp_dir_is_removed_on_restart(tmp_path: Path) -> None:
    AdapterStore(tmp_path).close()
    partial = tmp_path / "adapters" / ".tmp-crashed"
    partial.mkdir()
    (partial / WEIGHTS_FILE).write_bytes(b"half")
    store = AdapterStore(tmp_path)
    assert leftovers(store) == []


def test_unindexed_dir_from_a_crash_before_insert_is_removed_on_restart(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    store.add("kept", "upload", validate, files=tiny_files())
    store.add("org/lost", "upload", validate, files=tiny_files())
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("DELETE FROM adapters WHERE name = 'org/lost'")
    store.close()
    reopened = AdapterStore(tmp_path)
    assert [r.name for r in reopened.list()] == ["kept"]
    assert leftovers(reopened) == ["kept"]


def test_delete_removes_row_and_files(store: AdapterStore) -> None:
    store.add("a", "upload", validate, files=tiny_files())
    assert store.delete("a")
    assert store.get("a") is None
    assert leftovers(store) == []


def test_delete_of_unknown_name_returns_false(store: AdapterStore) -> None:
    assert not store.delete("nope")


def test_name_can_be_added_again_after_delete(store: AdapterStore) -> None:
    store.add("a", "upload", validate, files=tiny_files(rank=2))
    store.delete("a")
    assert store.add("a", "upload", validate, files=tiny_files(rank=3)).rank == 3


def test_list_is_ordered_by_creation_then_name(store: AdapterStore) -> None:
    for name in ("b", "a", "c"):
        store.add(name, "upload", validate, files=tiny_files())
    with sqlite3.connect(store.data_dir / DB_FILE) as db:
        db.execute("UPDATE adapters SET created_at = 1 WHERE name = 'c'")
    assert [r.name for r in store.list()] == ["c", "a", "b"]


def test_slashes_in_names_map_to_one_directory_inside_the_store(store: AdapterStore) -> None:
    store.add("org/team:v1", "upload", validate, files=tiny_files())
    version = store.path("org/team:v1")  # one folder per version, inside the name's
    assert version.parent.parent == store.blobs
    assert version.parent.name == "org%2Fteam%3Av1"


@pytest.mark.parametrize(
    "name",
    ["", "x" * 129, "../etc", "/abs", ".hidden", "a..b", "a b", "a\\b", "ä", "a%2Fb", 5],
)
def test_invalid_names_are_refused(store: AdapterStore, name: str) -> None:
    with pytest.raises(AdapterError, match="adapter name"):
        store.add(name, "upload", validate, files=tiny_files())


def test_unknown_source_is_refused(store: AdapterStore) -> None:
    with pytest.raises(ValueError, match="source must be one of"):
        store.add("a", "somewhere", validate, files=tiny_files())


def test_unexpected_file_name_is_refused(store: AdapterStore) -> None:
    files = tiny_files() | {"../escape": b"x"}
    with pytest.raises(AdapterError, match=r"unexpected adapter file '\.\./escape'"):
        store.add("a", "upload", validate, files=files)
    assert leftovers(store) == []


def test_add_copies_from_a_directory(store: AdapterStore, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for file, data in tiny_files().items():
        (source / file).write_bytes(data)
    record = store.add("a", "path", validate, source_dir=source)
    assert record.source == "path"
    assert store.path("a") != source


def test_concurrent_adds_of_one_name_store_it_once(store: AdapterStore) -> None:
    outcomes: list[str] = []

    def add() -> None:
        try:
            store.add("same", "upload", validate, files=tiny_files())
            outcomes.append("added")
        except AdapterExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["added"] + ["exists"] * 5
    assert leftovers(store) == ["same"]


def test_a_reload_keeps_one_version_folder_and_never_reuses_its_name(store: AdapterStore) -> None:
    store.add("a", "upload", validate, files=tiny_files(rank=2))
    first = store.path("a")
    store.replace("a", "upload", validate, files=tiny_files(rank=3))
    second = store.path("a")
    assert second != first and second.parent == first.parent
    assert [p.name for p in first.parent.iterdir()] == [second.name]
    assert (second / WEIGHTS_FILE).read_bytes() == tiny_files(rank=3)[WEIGHTS_FILE]


def test_a_data_dir_from_before_versions_serves_and_reloads(tmp_path: Path) -> None:
    # The earlier layout: no version column, an adapter's files in its own folder.
    record = AdapterStore(tmp_path / "scratch").add("a", "upload", validate, files=tiny_files())
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute(f"CREATE TABLE adapters ({COLUMNS}, PRIMARY KEY (name))")
        db.execute(f"INSERT INTO adapters ({COLUMNS}) VALUES ({VALUES})", record_row(record))
    legacy = tmp_path / "adapters" / "a"
    legacy.mkdir(parents=True)
    for file, data in tiny_files().items():
        (legacy / file).write_bytes(data)
    (legacy / "0123456789abcdef").mkdir()  # a first reload's version, killed before its row
    store = AdapterStore(tmp_path)
    assert store.get("a") == record and store.path("a") == legacy
    assert sorted(p.name for p in legacy.iterdir()) == sorted(tiny_files())
    store.replace("a", "upload", validate, files=tiny_files(rank=3))
    assert [p.name for p in legacy.iterdir()] == [store.path("a").name]
    store.close()
    assert AdapterStore(tmp_path).get("a").rank == 3  # type: ignore[union-attr]
