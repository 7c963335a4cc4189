"""A replica's local cache of a shared adapter store: rows first, files fetched on demand.

The same folders and index as AdapterStore (adapters/store.py), with a row's files allowed to
come after it: a shared store (adapters/shared_store.py) indexes the manifests it lists here,
and fetches an adapter's blobs into the version folder of its row the first time it is used.
Each cached record gets a version folder of its own, so files fetched for one record are never
served for the next.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adapters.errors import AdapterNotFoundError
from adapters.records import COLUMNS, VALUES, AdapterRecord, record_row
from adapters.store import AdapterStore
from adapters.versions import new_version, remove_paths, stale_entries, version_dir


class StoreCache(AdapterStore):
    """An AdapterStore whose rows may come before their files."""

    files_on_demand = True

    def __init__(self, data_dir: Path, durable: bool = True) -> None:
        # Rows a poll dropped while requests may still read their files (until delete):
        # name -> the version they served.
        self._detached: dict[str, str] = {}
        super().__init__(data_dir, durable)

    def path(self, name: str) -> Path:
        """The folder of the version name's row serves (or served, until delete); its files
        may not be there yet."""
        with self._lock:
            version = self._version(name)
            if version is None:
                version = self._detached.get(name)
        if version is None:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        return version_dir(self._name_dir(name), version)

    def delete(self, name: str) -> bool:
        """Remove name's row and every version of its files."""
        with self._lock:
            self._detached.pop(name, None)
            return super().delete(name)

    def cache_record(self, record: AdapterRecord) -> None:
        """Index a record whose files come later (a shared store's manifest), as a version of
        its own."""
        with self._lock, self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO adapters ({COLUMNS}, version) VALUES ({VALUES}, ?)",
                (*record_row(record), new_version()),
            )
            self._detached.pop(record.name, None)

    def uncache_record(self, name: str) -> None:
        """Drop a row, keeping any files (requests may still read them until delete)."""
        with self._lock, self._db:
            version = self._version(name)
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            if version is not None:
                self._detached[name] = version

    def drop_files(self, name: str) -> None:
        """Remove the files of every version of name but the one its row serves now."""
        with self._lock:
            version = self._version(name)
            stale = [] if version is None else stale_entries(self._name_dir(name), version)
        remove_paths(stale)

    def commit_files(self, staging: Path, name: str) -> Path:
        """Move a fetched, checked directory into place as the files of the version name's
        row serves (first one wins)."""
        with self._lock:
            final = self.path(name)
            if final.is_dir() and any(final.iterdir()):
                shutil.rmtree(staging, ignore_errors=True)
                return final
            self._sync_dir_contents(staging)
            final.parent.mkdir(exist_ok=True)
            staging.rename(final)
            self._fsync(final.parent)
            self._fsync(self.blobs)
        return final
