"""A shared adapter store: blobs and manifests in object storage or a shared filesystem.

Layout under the store's URL (any fsspec URL: file:///mnt/adapters, s3://bucket/prefix):

    blobs/<sha256>                  one adapter file, named by its content's hash
    manifests/<quoted name>.json    {"files": {file: sha256}, "record": {...}}: written last

An add uploads the blobs, then the manifest: a writer killed before the manifest leaves only
unreferenced blobs, so a half-written adapter is never visible. Every replica indexes the
manifests in its local cache (adapters/store_cache.py) and fetches an adapter's blobs into it
the first time it is used. refresh() re-lists the manifests, so what other replicas add or
delete shows up one poll later (--adapter-store-poll-s). The manifests are the truth: a replica
killed between writing one and updating its own index takes the manifest's version at its
next start, and drops its copies of adapters deleted meanwhile.

An in-place reload uploads the new version's blobs beside the old ones (blobs are never
overwritten), then overwrites the manifest in one atomic write (an object PUT; a rename on a
filesystem): the manifest is the pointer, so a replica reads the old version or the new, never
a mix. Replicas notice the switch by the manifest's listing entry (ETag, or inode and mtime)
and report it as replaced; they keep the old version's file digests until the registry has
held the old weights for the requests still using them and accepted the new record.

Two replicas adding the same name in the same instant both pass the existence check and the
last manifest wins; blobs of deleted adapters stay (other manifests may share them).
"""

from __future__ import annotations

import builtins
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError
from adapters.faults import fault_point
from adapters.records import AdapterRecord, record_from_dict, record_to_dict
from adapters.store import StoreChanges, Validator, check_adapter_name, sha256_file
from adapters.store_cache import StoreCache

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
STAMPS_FILE = "shared_store_stamps.json"
BLOBS = "blobs"
MANIFESTS = "manifests"
_TMP = ".tmp"
_SUFFIX = ".json"


def storage_options(url: str, s3_endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for url: an S3 endpoint from the flag, else the usual AWS_* variables."""
    if url.startswith("s3://") and s3_endpoint_url:
        return {"client_kwargs": {"endpoint_url": s3_endpoint_url}}
    return {}


class SharedAdapterStore:
    """Adapters in a shared fsspec location, indexed and cached in a local AdapterStore."""

    shared = True

    def __init__(
        self,
        url: str,
        data_dir: Path,
        durable: bool = True,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **dict(options or {}))
        self.root = self.root.rstrip("/")
        self.cache = StoreCache(data_dir, durable)
        self.data_dir = data_dir
        self._fetch_lock = threading.Lock()
        self._local = isinstance(self.fs, LocalFileSystem)
        # name -> the file digests of the version the local index holds, and the listing
        # stamp of the manifest last read (a changed stamp means read it again). Stamps are
        # kept in data_dir too, so a restart reads only the manifests rewritten meanwhile.
        self._files: dict[str, dict[str, str]] = {}
        self._stamps_path = data_dir / STAMPS_FILE
        self._stamps: dict[str, str] = self._load_stamps()
        # Replaced elsewhere, not yet accepted here: the new record, its digests, its stamp.
        self._pending: dict[str, tuple[AdapterRecord, dict[str, str], str]] = {}
        if self._local:
            self.fs.makedirs(f"{self.root}/{MANIFESTS}", exist_ok=True)
            self.fs.makedirs(f"{self.root}/{BLOBS}", exist_ok=True)
        # Nothing is registered yet, so versions replaced while this replica was down are
        # taken as they are now, and the files of adapters deleted meanwhile can go.
        changes = self.refresh(accept_replaced=True)
        for name in changes.removed:
            self.cache.delete(name)
        logger.info(
            "shared adapter store %s: %d adapters (%d new, %d gone since the last run)",
            url,
            len(self.cache.list()),
            len(changes.added),
            len(changes.removed),
        )

    def close(self) -> None:
        """Close the local index."""
        self.cache.close()

    # ---- reads: the local index, files fetched on first use ------------------------------

    def get(self, name: str) -> AdapterRecord | None:
        """The record of one adapter as of the last refresh, or None."""
        return self.cache.get(name)

    def list(self) -> builtins.list[AdapterRecord]:
        """Every record as of the last refresh, oldest first."""
        return self.cache.list()

    def path(self, name: str) -> Path:
        """A local directory with name's files, fetched from the shared store if not cached."""
        local = self.cache.path(name)
        if local.is_dir():
            return local
        with self._fetch_lock:  # one download per adapter, however many readers ask
            local = self.cache.path(name)
            if local.is_dir():
                return local
            record = self.cache.get(name)
            if record is None:
                raise AdapterNotFoundError(f"adapter {name!r} is not in the shared store")
            return self._fetch(name, record)

    def _fetch(self, name: str, record: AdapterRecord) -> Path:
        files = self._files.get(name)
        if files is None:
            manifest = self._read_manifest(self._manifest_path(name))
            if manifest is None or record_from_dict(manifest["record"]) != record:
                raise AdapterNotFoundError(f"adapter {name!r} was deleted or replaced meanwhile")
            files = manifest["files"]
        staging = self.cache.staging_dir()
        try:
            for file, digest in files.items():
                self.fs.get_file(self._blob_path(digest), str(staging / file))
                if sha256_file(staging / file) != digest:
                    raise AdapterError(f"adapter {name!r}: {file} does not match its sha256")
            local = self.cache.commit_files(staging, name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("fetched adapter %s from the shared store", name)
        return local

    # ---- writes ----------------------------------------------------------------------------

    def add(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
        writer: Callable[[Path], None] | None = None,
    ) -> AdapterRecord:
        """Validate locally, upload blobs then the manifest, then index and cache it here."""
        check_adapter_name(name)
        if self.fs.exists(self._manifest_path(name)):
            raise AdapterExistsError(f"adapter {name!r} already exists")
        digests: dict[str, str] = {}
        record = self.cache.add(
            name,
            source,
            validate,
            files=files,
            source_dir=source_dir,
            writer=writer,
            publish=lambda staging, record: digests.update(self._publish(name, staging, record)),
        )
        self._files[name] = digests
        return record

    def replace(
        self,
        name: str,
        source: str,
        validate: Validator,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
    ) -> AdapterRecord:
        """Validate locally, upload the new blobs, switch the manifest, then swap the local
        copy: other replicas go from the old version to the new at one poll."""
        check_adapter_name(name)
        if not self.fs.exists(self._manifest_path(name)):
            raise AdapterNotFoundError(f"adapter {name!r} is not in the shared store")
        digests: dict[str, str] = {}
        record = self.cache.replace(
            name,
            source,
            validate,
            files=files,
            source_dir=source_dir,
            publish=lambda staging, record: digests.update(
                self._publish(name, staging, record, replace=True)
            ),
        )
        with self._fetch_lock:
            self._files[name] = digests
            self._pending.pop(name, None)  # what this replica wrote supersedes what it saw
        return record

    def accept_replacement(self, record: AdapterRecord) -> bool:
        """Index a version refresh() reported replaced, and drop the old one's local files;
        False if it is no longer the pending one (deleted or replaced again meanwhile: a later
        refresh says which). The caller holds the old weights for requests still using them."""
        with self._fetch_lock:  # never while the old version is being fetched
            pending = self._pending.get(record.name)
            if pending is None or pending[0] != record:
                return False
            del self._pending[record.name]
            self._stamps[record.name] = pending[2]
            if self.cache.get(record.name) == record:
                return False  # this replica's own reload, seen mid-write by a poll
            self.cache.cache_record(record)
            self.cache.drop_files(record.name)
            self._files[record.name] = pending[1]
            self._save_stamps()
        logger.info("adapter %s was replaced in place through another replica", record.name)
        return True

    def _publish(
        self, name: str, staging: Path, record: AdapterRecord, replace: bool = False
    ) -> dict[str, str]:
        """Upload the blobs, then write the manifest; the files' digests."""
        digests: dict[str, str] = {}
        for file in sorted(p.name for p in staging.iterdir()):
            digest = sha256_file(staging / file)
            digests[file] = digest
            blob = self._blob_path(digest)
            if not self.fs.exists(blob):
                self._put(str(staging / file), blob)
            fault_point("store.shared.blob")
        manifest = {"version": MANIFEST_VERSION, "files": digests, "record": record_to_dict(record)}
        fault_point("store.shared.manifest")
        path = self._manifest_path(name)
        if replace and not self.fs.exists(path):
            raise AdapterNotFoundError(f"adapter {name!r} was deleted during the reload")
        if not replace and self.fs.exists(path):
            raise AdapterExistsError(f"adapter {name!r} already exists")
        self._put_bytes(json.dumps(manifest).encode(), path)  # the one atomic switch
        fault_point("store.shared.published")
        logger.info("published adapter %s to %s", name, self.url)
        return digests

    def delete(self, name: str) -> bool:
        """Remove the manifest (every replica stops listing it), then the local copy."""
        path = self._manifest_path(name)
        shared = self.fs.exists(path)
        if shared:
            self.fs.rm_file(path)
            fault_point("store.shared.deleted")
        local = self.cache.delete(name)
        self._forget(name)
        return shared or local

    def evict(self, name: str) -> None:
        """Drop the local copy of an adapter another replica deleted (row and files)."""
        self.cache.delete(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        with self._fetch_lock:
            self._files.pop(name, None)
            self._pending.pop(name, None)
            self._stamps.pop(name, None)

    def refresh(self, accept_replaced: bool = False) -> StoreChanges:
        """Bring the local index up to the shared manifests; what changed since last time.

        Adapters added or deleted elsewhere are indexed or dropped here at once; one replaced
        in place is only reported, until accept_replacement (done here when accept_replaced).
        """
        self.fs.invalidate_cache()  # s3fs caches listings; a poll must see the store as it is
        remote = self._manifest_listing()
        indexed = {r.name: r for r in self.cache.list()}
        added, replaced = [], []
        stamps_read = False
        for name in sorted(remote):
            path, stamp = remote[name]
            if name in indexed and self._stamps.get(name) == stamp:
                continue  # unchanged since it was last read
            manifest = self._read_manifest(path)
            if manifest is None:
                continue  # deleted between the listing and the read
            try:
                record = record_from_dict(manifest["record"])
                files = dict(manifest["files"])
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("skipping unreadable manifest %s: %s", path, exc)
                continue
            old = indexed.get(name)
            if old is not None and old != record:
                # Read again at every poll until accepted (its stamp is taken then).
                self._pending[name] = (record, files, stamp)
                replaced.append(record)
                continue
            self._stamps[name] = stamp
            stamps_read = True
            if old is None:
                self.cache.cache_record(record)
                self._files[name] = files
                added.append(record)
            else:
                self._files.setdefault(name, files)
        removed = sorted(indexed.keys() - remote.keys())
        for name in removed:
            self.cache.uncache_record(name)  # its files stay until evict(): requests may run
            self._stamps.pop(name, None)
            self._pending.pop(name, None)
        if accept_replaced:
            for record in replaced:
                self.accept_replacement(record)
            replaced = []
        if added or removed or stamps_read:
            self._save_stamps()
        if added or removed or replaced:
            logger.info(
                "shared store: %d adapters appeared, %d deleted, %d replaced",
                len(added),
                len(removed),
                len(replaced),
            )
        return StoreChanges(tuple(added), tuple(removed), tuple(replaced))

    # ---- paths and atomic writes -------------------------------------------------------------

    def _load_stamps(self) -> dict[str, str]:
        try:
            stamps = json.loads(self._stamps_path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: every manifest is read once
        return {str(k): str(v) for k, v in stamps.items()} if isinstance(stamps, dict) else {}

    def _save_stamps(self) -> None:
        tmp = self._stamps_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._stamps))
        tmp.replace(self._stamps_path)

    def _manifest_listing(self) -> dict[str, tuple[str, str]]:
        """name -> (manifest path, a stamp that changes whenever the manifest is rewritten)."""
        try:
            entries = self.fs.ls(f"{self.root}/{MANIFESTS}", detail=True)
        except FileNotFoundError:
            return {}
        names = {}
        for entry in entries:
            path = str(entry["name"])
            base = path.rsplit("/", 1)[-1]
            if base.endswith(_SUFFIX) and not base.startswith("."):
                # S3: the ETag (a hash of the content); a filesystem: inode (a rename makes a
                # new one), mtime and size.
                tag = entry.get("ETag") or f"{entry.get('ino')}:{entry.get('mtime')}"
                names[unquote(base[: -len(_SUFFIX)])] = (path, f"{tag}:{entry.get('size')}")
        return names

    def _read_manifest(self, path: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data

    def _manifest_path(self, name: str) -> str:
        check_adapter_name(name)
        return f"{self.root}/{MANIFESTS}/{quote(name, safe='._-')}{_SUFFIX}"

    def _blob_path(self, digest: str) -> str:
        return f"{self.root}/{BLOBS}/{digest}"

    def _put(self, local: str, remote: str) -> None:
        self._write_atomic(remote, lambda path: self.fs.put_file(local, path))

    def _put_bytes(self, data: bytes, remote: str) -> None:
        self._write_atomic(remote, lambda path: self.fs.pipe_file(path, data))

    def _write_atomic(self, remote: str, write: Callable[[str], None]) -> None:
        # An object store's PUT is atomic; on a filesystem write aside, then rename.
        if not self._local:
            write(remote)
            return
        tmp = self._tmp_path()
        write(tmp)
        self.fs.mv(tmp, remote)

    def _tmp_path(self) -> str:
        self.fs.makedirs(f"{self.root}/{_TMP}", exist_ok=True)
        return f"{self.root}/{_TMP}/{uuid.uuid4().hex}"
