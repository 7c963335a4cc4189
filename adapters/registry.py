"""Registered adapters by name and id, and their weights through a bounded host-memory cache."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adapters.base import BaseModelInfo
from adapters.config import AdapterSpec
from adapters.errors import AdapterError, AdapterExistsError, AdapterNotFoundError
from adapters.format import (
    PICKLE_REFUSED,
    PICKLED_WEIGHTS_FILE,
    WEIGHTS_FILE,
    AdapterWeights,
    check_adapter_dir,
    read_adapter,
    read_adapter_spec,
    write_adapter,
)
from adapters.host_cache import HostCache, HostCacheStats
from adapters.registered import VIRTUAL_PREFIX, RegisteredAdapter, SyncResult
from adapters.store import AdapterBackend, AdapterRecord, check_adapter_name

logger = logging.getLogger(__name__)


class AdapterRegistry:
    """Name -> adapter for everything in the store, with weights cached in host memory."""

    def __init__(
        self,
        store: AdapterBackend,
        base: BaseModelInfo,
        max_lora_rank: int,
        host_cache_bytes: int,
        pin_memory: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store = store
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.pin_memory = pin_memory
        if pin_memory and not torch.cuda.is_available():
            logger.warning("pinned host memory needs CUDA; caching adapters unpinned")
            self.pin_memory = False
        self._lock = threading.Lock()
        self._by_name: dict[str, RegisteredAdapter] = {}
        self._by_id: dict[int, RegisteredAdapter] = {}
        self._ids = itertools.count()
        self._cache = HostCache(host_cache_bytes)
        self._loading: dict[int, threading.Event] = {}
        # Replaced by an in-place reload but still used by requests: their weights, held here
        # (never read from disk again, where the new files now are) until drop_retired().
        self._retired: dict[int, AdapterWeights] = {}
        self._reload_lock = threading.Lock()
        # Adapters computed in memory (merges): served like others, never stored nor listed.
        self._virtual: dict[str, RegisteredAdapter] = {}
        self._virtual_weights: dict[int, AdapterWeights] = {}
        # Forgotten here but maybe still in the store (its delete under way): sync() must not
        # register them again.
        self._forgotten: set[str] = set()
        self._host_loads = 0
        self._disk_load_seconds = 0.0

    # ---- registration -------------------------------------------------------------------

    def load_index(self) -> int:
        """Register every stored adapter (header checks only), skipping invalid ones; the count."""
        start = time.perf_counter()
        count = 0
        for record in self.store.list():
            if record.name in self._by_name:
                continue
            spec = self._stored_spec(record)
            if spec is None:
                continue
            self._add(record, spec)
            count += 1
        logger.info("registered %d stored adapters in %.2f s", count, time.perf_counter() - start)
        return count

    def sync(self) -> SyncResult:
        """Register what other replicas added to a shared store, take the versions they
        reloaded in place, and report the names they deleted."""
        changes = self.store.refresh()
        stored = self.store.list()
        with self._lock:
            self._forgotten &= {r.name for r in stored}
            new = [
                r for r in stored if r.name not in self._by_name and r.name not in self._forgotten
            ]
        for record in new:
            if spec := self._stored_spec(record):
                self._add(record, spec)
                logger.info("registered adapter %s from the shared store", record.name)
        replaced = [pair for r in changes.replaced if (pair := self._take_replacement(r))]
        deleted = [r.name for r in self.list() if self.store.get(r.name) is None]
        return SyncResult(deleted, replaced)

    def _take_replacement(
        self, record: AdapterRecord
    ) -> tuple[RegisteredAdapter, RegisteredAdapter] | None:
        """Switch name to a version another replica stored in place, as a local reload does:
        the old version's weights are held for its requests first; (new, old), or None when
        there is nothing to switch (logged when the new version cannot serve here)."""
        spec = self._stored_spec(record)
        if spec is None:
            return None  # keeps serving the version it has
        with self._reload_lock:
            old = self.get(record.name)
            if old is None:
                return None  # being deleted here
            self._retire(old.adapter_id)
            try:
                accepted = self.store.accept_replacement(record)
            except BaseException:
                self._unretire(old.adapter_id)
                raise
            if not accepted:
                self._unretire(old.adapter_id)
                return None
            new = self._swap_in(old, record, spec)
        if new is None:
            return None
        logger.info("took adapter %s's new version %d from the shared store", new.name, new.version)
        return new, old

    def _stored_spec(self, record: AdapterRecord) -> AdapterSpec | None:
        """The spec of a stored adapter, or None (logged) when it cannot serve here."""
        try:
            if self.store.shared:
                # Validated by the replica that stored it; fetching every adapter's files at
                # start-up would defeat the per-replica cache, so only the rank is rechecked.
                spec = record.spec
                if spec.rank > self.max_lora_rank:
                    raise AdapterError(f"rank {spec.rank} exceeds --max-lora-rank")
                return spec
            return read_adapter_spec(self.store.path(record.name), self.base, self.max_lora_rank)
        except (AdapterError, OSError, KeyError, ValueError) as e:
            logger.warning("skipping stored adapter %s: %s", record.name, e)
            return None

    def register_files(
        self, name: str, files: Mapping[str, bytes], source: str = "upload"
    ) -> RegisteredAdapter:
        """Validate uploaded files fully, then store and register them."""
        self._check_new(name)
        if WEIGHTS_FILE not in files and PICKLED_WEIGHTS_FILE in files:
            raise AdapterError(PICKLE_REFUSED)
        record = self.store.add(name, source, self._validate, files=files)
        return self._add(record, record.spec)

    def register_dir(self, name: str, path: Path, source: str = "path") -> RegisteredAdapter:
        """Validate a PEFT adapter directory fully, then copy it into the store and register it."""
        self._check_new(name)
        check_adapter_dir(path)
        record = self.store.add(name, source, self._validate, source_dir=path)
        return self._add(record, record.spec)

    def register_weights(
        self,
        name: str,
        config: Mapping[str, Any],
        weights: AdapterWeights,
        source: str = "training",
    ) -> RegisteredAdapter:
        """Store and register in-memory weights (e.g. a fine-tuning result) in PEFT format."""
        self._check_new(name)
        record = self.store.add(
            name, source, self._validate, writer=lambda d: write_adapter(d, config, weights)
        )
        return self._add(record, record.spec)

    def register_virtual(
        self, name: str, spec: AdapterSpec, weights: AdapterWeights
    ) -> RegisteredAdapter:
        """Register weights computed in memory (a merge) under a name no stored adapter can
        take: served like any adapter, held in memory until forget(name), never listed."""
        assert name.startswith(VIRTUAL_PREFIX), f"virtual adapter names start {VIRTUAL_PREFIX!r}"
        weights = weights.to(self.dtype)
        if self.pin_memory:
            weights = weights.pin_memory()
        record = AdapterRecord(
            name=name,
            sha256="",
            created_at=int(time.time()),
            size_bytes=weights.nbytes,
            rank=spec.rank,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
            rope_scaling_factor=spec.rope_scaling_factor,
            source="merged",
            spec_json="",
        )
        with self._lock:
            if name in self._virtual:
                raise AdapterExistsError(f"adapter {name!r} already exists")
            reg = RegisteredAdapter(next(self._ids), name, spec, record)
            self._virtual[name] = reg
            self._by_id[reg.adapter_id] = reg
            self._virtual_weights[reg.adapter_id] = weights
        return reg

    def reload_files(
        self, name: str, files: Mapping[str, bytes], source: str = "upload"
    ) -> tuple[RegisteredAdapter, RegisteredAdapter]:
        """Replace name's weights with uploaded files in place; (new, retired)."""
        if WEIGHTS_FILE not in files and PICKLED_WEIGHTS_FILE in files:
            raise AdapterError(PICKLE_REFUSED)
        return self._reload(name, source, files=files)

    def reload_dir(
        self, name: str, path: Path, source: str = "path"
    ) -> tuple[RegisteredAdapter, RegisteredAdapter]:
        """Replace name's weights with a PEFT adapter directory in place; (new, retired)."""
        check_adapter_dir(path)
        return self._reload(name, source, source_dir=path)

    def _reload(
        self,
        name: str,
        source: str,
        *,
        files: Mapping[str, bytes] | None = None,
        source_dir: Path | None = None,
    ) -> tuple[RegisteredAdapter, RegisteredAdapter]:
        """Validate and store the new files, then point name at them under a new adapter_id.

        The old adapter_id stays registered, its weights held in memory, so requests already
        given it keep the old weights; the engine calls drop_retired() when the last one ends.
        """
        with self._reload_lock:
            old = self.get(name)
            if old is None:
                raise AdapterNotFoundError(f"adapter {name!r} does not exist")
            self._retire(old.adapter_id)
            try:
                record = self.store.replace(
                    name, source, self._validate, files=files, source_dir=source_dir
                )
            except BaseException:
                self._unretire(old.adapter_id)
                raise
            new = self._swap_in(old, record, record.spec)
            if new is None:  # deleted meanwhile: stay deleted
                raise AdapterNotFoundError(f"adapter {name!r} was deleted during the reload")
        logger.info("reloaded adapter %s in place (version %d)", name, new.version)
        return new, old

    def _swap_in(
        self, old: RegisteredAdapter, record: AdapterRecord, spec: AdapterSpec
    ) -> RegisteredAdapter | None:
        """Point old's name at record under a new adapter_id; None if old is gone meanwhile."""
        with self._lock:
            if self._by_name.get(old.name) is not old:
                self._retired.pop(old.adapter_id, None)
                return None
            new = RegisteredAdapter(next(self._ids), old.name, spec, record, old.version + 1)
            self._by_name[old.name] = new
            self._by_id[new.adapter_id] = new
            self._cache.pop(old.adapter_id)
        return new

    def _unretire(self, adapter_id: int) -> None:
        with self._lock:
            self._retired.pop(adapter_id, None)

    def _retire(self, adapter_id: int) -> None:
        """Hold an adapter's current weights in memory before its files are replaced."""
        while True:
            weights = self.weights(adapter_id)
            with self._lock:
                # A disk read started since may see the new files: wait for it, then retry.
                if adapter_id not in self._loading:
                    self._retired[adapter_id] = weights
                    return

    def drop_retired(self, adapter_id: int) -> None:
        """Forget a reloaded adapter's old version once no request uses it (engine thread)."""
        with self._lock:
            weights = self._retired.pop(adapter_id, None)
            assert weights is not None, f"adapter id {adapter_id} is not retired"
            del self._by_id[adapter_id]

    def unregister(self, name: str) -> bool:
        """Remove an adapter from the index, the host cache and the store."""
        reg = self.forget(name)
        stored = self.store.delete(name)
        return reg is not None or stored

    def forget(self, name: str) -> RegisteredAdapter | None:
        """Drop an adapter from the index and the host cache (memory only, quick); its files
        stay in the store until store.delete."""
        with self._lock:
            reg = self._virtual.pop(name, None)
            if reg is not None:
                del self._by_id[reg.adapter_id]
                del self._virtual_weights[reg.adapter_id]
                return reg
            reg = self._by_name.pop(name, None)
            if reg is not None:
                del self._by_id[reg.adapter_id]
                self._cache.pop(reg.adapter_id)
                self._forgotten.add(name)
        return reg

    def _check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self._by_name:
            raise AdapterExistsError(f"adapter {name!r} already exists")

    def _validate(self, adapter_dir: Path) -> AdapterSpec:
        spec, _ = read_adapter(adapter_dir, self.base, self.max_lora_rank)
        return spec

    def _add(self, record: AdapterRecord, spec: AdapterSpec) -> RegisteredAdapter:
        with self._lock:
            existing = self._by_name.get(record.name)
            if existing is not None and existing.record.sha256 == record.sha256:
                return existing  # sync() saw the row before the add that wrote it returned
            self._forgotten.discard(record.name)
            reg = RegisteredAdapter(next(self._ids), record.name, spec, record)
            self._by_name[reg.name] = reg
            self._by_id[reg.adapter_id] = reg
        return reg

    # ---- lookup -------------------------------------------------------------------------

    def get(self, name: str) -> RegisteredAdapter | None:
        """The adapter registered under name (stored or virtual), or None."""
        return self._by_name.get(name) or self._virtual.get(name)

    def by_id(self, adapter_id: int) -> RegisteredAdapter | None:
        """The adapter with this internal id, or None."""
        return self._by_id.get(adapter_id)

    def list(self) -> list[RegisteredAdapter]:
        """Every registered adapter, in registration order."""
        with self._lock:
            return list(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    # ---- host cache ---------------------------------------------------------------------

    def weights(self, adapter_id: int) -> AdapterWeights:
        """The adapter's weights in self.dtype: from the host cache, or read from disk."""
        while True:
            with self._lock:
                reg = self._by_id.get(adapter_id)
                if reg is None:
                    raise AdapterNotFoundError(f"adapter id {adapter_id} is not registered")
                cached = self._cached(adapter_id)
                if cached is not None:
                    return cached
                pending = self._loading.get(adapter_id)
                if pending is None:
                    self._loading[adapter_id] = threading.Event()
                    break
            # Another thread is reading this adapter; use its result rather than read twice.
            pending.wait()
        try:
            return self._load(reg)
        finally:
            with self._lock:
                self._loading.pop(adapter_id).set()

    def _load(self, reg: RegisteredAdapter) -> AdapterWeights:
        start = time.perf_counter()
        # Fully checked when it was registered; this only brings the weights back.
        _, weights = read_adapter(
            self.store.path(reg.name), self.base, self.max_lora_rank, check_values=False
        )
        weights = weights.to(self.dtype)
        if self.pin_memory:
            weights = weights.pin_memory()
        elapsed = time.perf_counter() - start
        with self._lock:
            self._host_loads += 1
            self._disk_load_seconds += elapsed
            if self._by_id.get(reg.adapter_id) is not reg or reg.adapter_id in self._retired:
                return weights  # unregistered while loading: serve this caller, cache nothing
            if not self._cache.can_hold(weights):
                logger.debug(
                    "adapter %s (%d bytes) exceeds the host cache; not cached",
                    reg.name,
                    weights.nbytes,
                )
                return weights
            evicted = self._cache.put(reg.adapter_id, weights)
        logger.debug(
            "loaded adapter %s from disk in %.3f s; evicted %d", reg.name, elapsed, len(evicted)
        )
        return weights

    def is_host_resident(self, adapter_id: int) -> bool:
        """Whether the adapter's weights are in the host cache now."""
        with self._lock:
            return (
                adapter_id in self._cache
                or adapter_id in self._retired
                or adapter_id in self._virtual_weights
            )

    def warm(self, adapter_id: int) -> None:
        """Load an adapter into the host cache if absent (blocking)."""
        self.weights(adapter_id)

    def cached_weights(self, adapter_id: int) -> AdapterWeights | None:
        """The adapter's weights if they are in host memory now, else None: never a read."""
        with self._lock:
            return self._cached(adapter_id)

    def _cached(self, adapter_id: int) -> AdapterWeights | None:  # under self._lock
        held = self._retired.get(adapter_id) or self._virtual_weights.get(adapter_id)
        return held if held is not None else self._cache.get(adapter_id)

    @property
    def stats(self) -> HostCacheStats:
        """A consistent snapshot of the host cache counters."""
        with self._lock:
            return HostCacheStats(
                host_bytes=self._cache.num_bytes,
                num_host_resident=len(self._cache),
                host_loads=self._host_loads,
                host_evictions=self._cache.evictions,
                disk_load_seconds=self._disk_load_seconds,
            )
