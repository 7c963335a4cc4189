"""Persistent adapter store: files under data_dir/adapters/<name>/<version>/, an index in SQLite.

This is the local backend, and the default. adapters/shared_store.py keeps adapters in object
storage or a shared filesystem and uses this class as each replica's cache of them; both
satisfy AdapterBackend.

An add writes into a temp dir inside the store, validates, fsyncs, renames it into place as
the adapter's first version, and only then inserts the index row. A reload puts a new version
folder beside the current one and switches the row to it in one transaction; the old folder
goes after the commit (adapters/versions.py). A crash at any point leaves temp dirs, unindexed
folders or versions no row serves, which the next start-up removes; so an adapter is absent or
one whole version, the one its row describes. A full disk is a DiskFullError (no path in it)
and leaves nothing behind either.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
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
from urllib.parse import quote

from adapters.config import AdapterSpec
from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError, short_repr
from adapters.faults import disk_full_as_error, fault_point
from adapters.format import ALL_FILES, WEIGHTS_FILE
from adapters.records import COLUMNS, VALUES, AdapterRecord, record_from_row, record_row
from adapters.versions import (
    TEMP_PREFIX,
    fsync_path,
    new_version,
    remove_paths,
    remove_stale,
    stale_entries,
    version_dir,
)

logger = logging.getLogger(__name__)

DB_FILE = "loraplex.db"
BLOBS_DIR = "adapters"
SOURCES = ("upload", "path", "training", "preload")
MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9._\-/:]+")
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
    spec_json TEXT NOT NULL,
    version TEXT NOT NULL DEFAULT ''
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
    files_on_demand = False  # a cache whose rows come before their files (store_cache.py)

    def __init__(self, data_dir: Path, durable: bool = True) -> None:
        # durable=False skips fsync, for throwaway data dirs (tests, benchmarks).
        self.data_dir = data_dir
        self.durable = durable
        self.blobs = data_dir / BLOBS_DIR
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(data_dir / DB_FILE, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
        with self._db:
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(adapters)")}
            if "version" not in columns:  # an index from before versions: files in name dirs
                self._db.execute("ALTER TABLE adapters ADD COLUMN version TEXT NOT NULL DEFAULT ''")
        self.recover()

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self._db.close()

    def path(self, name: str) -> Path:
        """Directory holding the files of the version the adapter's row serves."""
        with self._lock:
            version = self._version(name)
        if version is None:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        return version_dir(self._name_dir(name), version)

    def _name_dir(self, name: str) -> Path:
        """The folder of every version of name ('/' and ':' in names are percent-encoded)."""
        check_adapter_name(name)
        return self.blobs / quote(name, safe="._-")

    def _version(self, name: str) -> str | None:
        row = self._db.execute("SELECT version FROM adapters WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, name: str) -> AdapterRecord | None:
        """The record of one adapter, or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {COLUMNS} FROM adapters WHERE name = ?", (name,)
            ).fetchone()
        return None if row is None else record_from_row(row)

    def list(self) -> builtins.list[AdapterRecord]:
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
            staging = self.staging_dir()
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
        name_dir = self._name_dir(name)
        with self._lock:
            with self._db:
                deleted = self._db.execute("DELETE FROM adapters WHERE name = ?", (name,)).rowcount
            if not deleted and not name_dir.exists():
                return False
            fault_point("store.delete")
            # Moved aside under the lock so a re-add of the name never meets the old files.
            doomed = None
            if name_dir.exists():
                doomed = self.staging_dir()
                name_dir.rename(doomed / "old")
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

    def staging_dir(self) -> Path:
        """A fresh temp dir inside the store; a start-up recover() removes it if left behind."""
        return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.blobs))

    def recover(self) -> builtins.list[Path]:
        """Remove temp dirs, unindexed adapter dirs and versions no row serves, left by a
        crash; returns what went. The version a row serves is never removed."""
        with self._lock:
            versions = dict(self._db.execute("SELECT name, version FROM adapters"))
            removed = remove_stale(self.blobs, versions)
            for name, version in sorted(versions.items()):
                files = version_dir(self._name_dir(name), version)
                if not self.files_on_demand and not files.is_dir():
                    logger.warning("adapter %s is indexed but its files are missing", name)
        return removed

    def _commit(self, staging: Path, record: AdapterRecord) -> None:
        """Put staging in place as the first version of a new name, then insert its row."""
        name_dir = self._name_dir(record.name)
        with self._lock:
            if self.get(record.name) is not None:
                raise AdapterExistsError(f"adapter {record.name!r} already exists")
            if name_dir.exists():
                logger.warning("replacing unindexed leftover %s", name_dir)
                shutil.rmtree(name_dir)
            version = new_version()
            name_dir.mkdir()
            staging.rename(name_dir / version)
            try:
                fault_point("store.before_index")
                self._fsync(name_dir)
                self._fsync(self.blobs)
                with self._db:
                    self._db.execute(
                        f"INSERT INTO adapters ({COLUMNS}, version) VALUES ({VALUES}, ?)",
                        (*record_row(record), version),
                    )
            except BaseException:
                shutil.rmtree(name_dir, ignore_errors=True)
                raise

    def _swap(self, staging: Path, record: AdapterRecord) -> None:
        """Put staging in place as a new version beside the current one, switch the row to
        it in one transaction, and only then remove the old version."""
        name_dir = self._name_dir(record.name)
        with self._lock:
            if self._version(record.name) is None:
                raise AdapterNotFoundError(f"adapter {record.name!r} does not exist")
            version = new_version()
            name_dir.mkdir(exist_ok=True)  # a cache's row may have had no files yet
            staging.rename(name_dir / version)
            try:
                fault_point("store.reload.before_index")
                self._fsync(name_dir)
                self._fsync(self.blobs)
                with self._db:
                    self._db.execute(
                        f"UPDATE adapters SET ({COLUMNS}, version) = ({VALUES}, ?) WHERE name = ?",
                        (*record_row(record), version, record.name),
                    )
            except BaseException:
                shutil.rmtree(name_dir / version, ignore_errors=True)
                raise
            fault_point("store.reload.after_index")
            stale = stale_entries(name_dir, version)  # the old version (and any leftover)
        remove_paths(stale)

    def _sync_dir_contents(self, directory: Path) -> None:
        for file in directory.iterdir():
            self._fsync(file)
        self._fsync(directory)

    def _fsync(self, path: Path) -> None:
        if self.durable:
            fsync_path(path)


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
