"""Persistent adapter store: files under data_dir/adapters/<name>/, an index in SQLite.

This is the local backend, and the default. adapters/shared_store.py keeps adapters in object
storage or a shared filesystem and uses this class as each replica's cache of them; both
satisfy AdapterBackend.

An add writes into a temp dir inside the store, validates, fsyncs, renames into place, and
only then inserts the index row. A crash before the insert leaves a temp or unindexed dir,
which the next start-up removes; so an adapter is either fully registered or absent.
A full disk is a DiskFullError (no path in it) and leaves nothing behind either.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

from adapters.config import AdapterSpec
from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError, short_repr
from adapters.faults import disk_full_as_error, fault_point
from adapters.format import ALL_FILES, WEIGHTS_FILE
from adapters.records import COLUMNS, VALUES, AdapterRecord, record_from_row, record_row

logger = logging.getLogger(__name__)

DB_FILE = "loraplex.db"
BLOBS_DIR = "adapters"
SOURCES = ("upload", "path", "training", "preload")
MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9._\-/:]+")
_TEMP_PREFIX = ".tmp-"  # adapter names cannot start with ".", so temp dirs never collide
_HASH_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    target_modules TEXT NOT NULL,
    rope_scaling_factor REAL NOT NULL,
    source TEXT NOT NULL,
    spec_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_by_created_at ON adapters (created_at, name);
"""

Validator = Callable[[Path], AdapterSpec]
Publisher = Callable[[Path, "AdapterRecord"], None]


def check_adapter_name(name: str) -> None:
    """Refuse a name that is not 1-128 of letters, digits and ._-/: (no leading / or ., no ..)."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise AdapterError(f"adapter name must be 1 to {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise AdapterError(
            f"adapter name {name!r} may only contain letters, digits and the characters ._-/:"
        )
    if name.startswith(("/", ".")) or ".." in name:
        raise AdapterError(f"adapter name {name!r} must not start with '/' or '.' nor hold '..'")


class AdapterBackend(Protocol):
    """What the registry needs of a store: local files by name, an index, atomic add/delete."""

    data_dir: Path
    shared: bool  # other processes may add and delete adapters (refresh() sees them)

    def path(self, name: str) -> Path: ...
    def get(self, name: str) -> AdapterRecord | None: ...
    def list(self) -> list[AdapterRecord]: ...
    def add(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
        writer: Callable[[Path], None] | None = None,
    ) -> AdapterRecord: ...
    def replace(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
    ) -> AdapterRecord: ...
    def delete(self, name: str) -> bool: ...
    def refresh(self) -> StoreChanges: ...
    def accept_replacement(self, record: AdapterRecord) -> bool: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class StoreChanges:
    """What refresh() found other processes did: adapters added, names deleted, and adapters
    replaced in place (new records, not yet indexed here: see accept_replacement)."""

    added: tuple[AdapterRecord, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[AdapterRecord, ...] = ()


class AdapterStore:
    """Adapters on disk plus their SQLite index; safe to share between threads."""

    shared = False

    def __init__(self, data_dir: Path, durable: bool = True, files_on_demand: bool = False) -> None:
        # durable=False skips fsync, for throwaway data dirs (tests, benchmarks).
        # files_on_demand: a cache whose rows may come before their files (a shared store's).
        self.data_dir = data_dir
        self.durable = durable
        self.files_on_demand = files_on_demand
        self.blobs = data_dir / BLOBS_DIR
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(data_dir / DB_FILE, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        with self._db:
            self._db.executescript(_SCHEMA)
        self.recover()

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self._db.close()

    def path(self, name: str) -> Path:
        """Directory holding an adapter's files ('/' and ':' in names are percent-encoded)."""
        check_adapter_name(name)
        return self.blobs / quote(name, safe="._-")

    def get(self, name: str) -> AdapterRecord | None:
        """The record of one adapter, or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM adapters WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else record_from_row(row)

    def list(self) -> list[AdapterRecord]:
        """Every record, oldest first (ties by name)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM adapters ORDER BY created_at, name"
            ).fetchall()
        return [record_from_row(row) for row in rows]

    def add(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
        writer: Callable[[Path], None] | None = None,
        publish: Publisher | None = None,
    ) -> AdapterRecord:
        """Store an adapter atomically from one of files, source_dir, writer, if validate passes."""
        # validate(staged_dir) returns the spec the row records; if it raises, nothing stays.
        # publish(staged_dir, record) runs after validation, before the row: a shared store
        # uploads there, so what it publishes has always passed validation.
        if self.get(name) is not None:
            raise AdapterExistsError(f"adapter {name!r} already exists")
        record = self._stage(
            name, source, validate, files, source_dir, writer, publish, self._commit
        )
        logger.info("stored adapter %s (%s, %d bytes)", name, source, record.size_bytes)
        return record

    def replace(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
        publish: Publisher | None = None,
    ) -> AdapterRecord:
        """Replace a stored adapter's files and row atomically, if the new files validate
        (publish as for add)."""
        if self.get(name) is None:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        record = self._stage(name, source, validate, files, source_dir, None, publish, self._swap)
        logger.info("replaced adapter %s (%s, %d bytes)", name, source, record.size_bytes)
        return record

    def _stage(
        self,
        name: str,
        source: str,
        validate: Validator,
        files: Mapping[str, bytes] | None,
        source_dir: Path | None,
        writer: Callable[[Path], None] | None,
        publish: Publisher | None,
        commit: Publisher,
    ) -> AdapterRecord:
        """Write the files to a staging dir, validate them, then commit(staging, record)."""
        check_adapter_name(name)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if sum(x is not None for x in (files, source_dir, writer)) != 1:
            raise ValueError("pass exactly one of files, source_dir, writer")
        with disk_full_as_error("storing an adapter"):
            staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.blobs))
            try:
                if files is not None:
                    _write_files(staging, files)
                elif source_dir is not None:
                    for file in ALL_FILES:
                        if (source_dir / file).is_file():
                            shutil.copyfile(source_dir / file, staging / file)
                else:
                    assert writer is not None
                    writer(staging)
                fault_point("store.write")
                spec = validate(staging)
                self._sync_dir_contents(staging)
                record = AdapterRecord(
                    name=name,
                    sha256=sha256_file(staging / WEIGHTS_FILE),
                    created_at=int(time.time()),
                    size_bytes=sum(f.stat().st_size for f in staging.iterdir()),
                    rank=spec.rank,
                    alpha=spec.alpha,
                    target_modules=spec.target_modules,
                    rope_scaling_factor=spec.rope_scaling_factor,
                    source=source,
                    spec_json=json.dumps(spec.to_dict()),
                )
                if publish is not None:
                    publish(staging, record)
                commit(staging, record)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return record

    def delete(self, name: str) -> bool:
        """Remove an adapter's row, then its files; False if neither existed."""
        final = self.path(name)
        with self._lock:
            with self._db:
                deleted = self._db.execute("DELETE FROM adapters WHERE name = ?", (name,)).rowcount
            if not deleted and not final.exists():
                return False
            fault_point("store.delete")
            # Moved aside under the lock so a re-add of the name never meets the old files.
            doomed = None
            if final.exists():
                doomed = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.blobs))
                final.rename(doomed / "old")
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        logger.info("deleted adapter %s", name)
        return True

    def refresh(self) -> StoreChanges:
        """Nothing else writes a local store: never any changes."""
        return StoreChanges()

    def accept_replacement(self, record: AdapterRecord) -> bool:
        """Never called: refresh() reports no replacements."""
        raise AssertionError("a local store has no replacements to accept")

    def drop_files(self, name: str) -> None:
        """Remove name's files, keeping its row (a cache whose files come on demand)."""
        final = self.path(name)
        with self._lock:
            if not final.exists():
                return
            doomed = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.blobs))
            final.rename(doomed / "old")
        shutil.rmtree(doomed, ignore_errors=True)

    def cache_record(self, record: AdapterRecord) -> None:
        """Index a record whose files come later (a shared store's manifest)."""
        with self._lock, self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO adapters ({COLUMNS}) VALUES ({VALUES})",
                record_row(record),
            )

    def uncache_record(self, name: str) -> None:
        """Drop a row, keeping any files (requests may still read them until delete)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))

    def commit_files(self, staging: Path, name: str) -> Path:
        """Move a fetched, checked directory into place as name's files (first one wins)."""
        final = self.path(name)
        with self._lock:
            if final.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                self._sync_dir_contents(staging)
                staging.rename(final)
        return final

    def staging_dir(self) -> Path:
        """A fresh temp dir inside the store; a start-up recover() removes it if left behind."""
        return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.blobs))

    def recover(self) -> builtins.list[Path]:
        """Remove temp dirs and unindexed adapter dirs left by a crash; returns what went."""
        with self._lock:
            names = {row[0] for row in self._db.execute("SELECT name FROM adapters")}
            removed = []
            for entry in sorted(self.blobs.iterdir()):
                leftover = entry.name.startswith(_TEMP_PREFIX) or (
                    entry.is_dir() and unquote(entry.name) not in names
                )
                if leftover:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                    logger.warning("removed leftover %s from an interrupted write", entry)
            for name in sorted(names):
                if not self.files_on_demand and not self.path(name).is_dir():
                    logger.warning("adapter %s is indexed but its files are missing", name)
        return removed

    def _commit(self, staging: Path, record: AdapterRecord) -> None:
        final = self.path(record.name)
        with self._lock:
            if self.get(record.name) is not None:
                raise AdapterExistsError(f"adapter {record.name!r} already exists")
            if final.exists():
                logger.warning("replacing unindexed leftover %s", final)
                shutil.rmtree(final)
            staging.rename(final)
            try:
                fault_point("store.before_index")
                self._fsync(self.blobs)
                with self._db:
                    self._db.execute(
                        f"INSERT INTO adapters ({COLUMNS}) VALUES ({VALUES})",
                        record_row(record),
                    )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise

    def _swap(self, staging: Path, record: AdapterRecord) -> None:
        final = self.path(record.name)
        with self._lock:
            if self.get(record.name) is None:
                raise AdapterNotFoundError(f"adapter {record.name!r} does not exist")
            doomed = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.blobs))
            if final.exists():
                final.rename(doomed / "old")
            fault_point("store.reload.aside")
            staging.rename(final)
            fault_point("store.reload.before_index")
            self._fsync(self.blobs)
            with self._db:
                self._db.execute(
                    f"INSERT OR REPLACE INTO adapters ({COLUMNS}) VALUES ({VALUES})",
                    record_row(record),
                )
        shutil.rmtree(doomed, ignore_errors=True)

    def _sync_dir_contents(self, directory: Path) -> None:
        for file in directory.iterdir():
            self._fsync(file)
        self._fsync(directory)

    def _fsync(self, path: Path) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    for file, data in files.items():
        if file not in ALL_FILES:
            raise AdapterError(
                f"unexpected adapter file {short_repr(file)}; expected {', '.join(ALL_FILES)}"
            )
        (directory / file).write_bytes(data)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
