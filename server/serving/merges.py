"""Merged adapters (LoRAX's merged_adapters, and the same field on /v1): each distinct spec is
merged once, off the event loop, and served as a virtual adapter from a bounded LRU cache.

A spec's key hashes its sources' current adapter ids with the weights and strategy, so a
reloaded or deleted-and-re-added source gives a new merge; entries whose sources are no
longer current are dropped at the next merged request and whenever an adapter is removed or
reloaded (server.serving.adapters). DARE's seed
hashes the sources' contents instead (name, weights file sha256, config), so one spec gives
the same merged weights across restarts and replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from adapters import AdapterExistsError, AdapterNotFoundError, AdapterRegistry, RegisteredAdapter
from adapters.merge import MergeError, MergeParams, merge_adapters, merged_spec
from adapters.registered import VIRTUAL_PREFIX, is_virtual
from server.engine.errors import AdapterBusyError, InvalidRequestError, UnknownAdapterError

logger = logging.getLogger(__name__)

MAX_MERGED_ADAPTERS = 16  # cached merges; more only while all are in use or just resolved
MAX_MERGED_IDS = 16  # source adapters in one spec
# A merge resolved this recently may have a request on its way to the engine: not evicted.
EVICT_GRACE_S = 30.0


class MergeRequest(Protocol):
    """A request's merge spec (LoRAX's merged_adapters; server.api.schemas.lorax)."""

    ids: list[str]
    weights: list[float]
    merge_strategy: str | None
    density: float
    majority_sign_method: str | None


@dataclass
class _Entry:
    name: str  # the virtual adapter's internal name
    sources: tuple[RegisteredAdapter, ...]
    last_used: float


class MergedAdapterCache:
    """Spec -> virtual adapter name; merges each distinct spec once, evicts least recently used."""

    def __init__(
        self,
        registry: AdapterRegistry,
        remove: Callable[[str], Awaitable[None]],
        max_entries: int = MAX_MERGED_ADAPTERS,
        grace_s: float = EVICT_GRACE_S,
    ) -> None:
        self.registry = registry
        # Unregisters a merge on the engine's step thread; raises AdapterBusyError while
        # requests use it (AsyncLLMEngine.remove_adapter).
        self._remove_adapter = remove
        self.max_entries = max_entries
        self.grace_s = grace_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by key, LRU first
        self._locks: dict[str, asyncio.Lock] = {}
        self.num_merges = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def resolve(self, spec: MergeRequest, field: str) -> str:
        """The internal adapter name serving this merge, merging it first if no cached one."""
        params = _params(spec, field)
        sources = tuple(self._source(name, f"{field}.ids") for name in spec.ids)
        try:  # ranks and targets are checked before any weights are read
            merged_spec([s.name for s in sources], [s.spec for s in sources])
        except MergeError as exc:
            raise _refused(exc, field) from exc
        await self.drop_stale()
        key = _digest([[s.name, s.adapter_id] for s in sources], params)
        if not self._is_live(key):
            lock = self._locks.setdefault(key, asyncio.Lock())
            try:
                async with lock:  # identical concurrent requests: one merges, the others wait
                    if not self._is_live(key):
                        name = await asyncio.to_thread(self._merge, key, sources, params, field)
                        self._entries[key] = _Entry(name, sources, time.monotonic())
            finally:
                self._locks.pop(key, None)
        entry = self._entries[key]
        entry.last_used = time.monotonic()
        self._entries.move_to_end(key)
        await self._evict_beyond_bound(keep=key)
        return entry.name

    def _is_live(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and self.registry.get(entry.name) is not None

    def _source(self, name: str, field: str) -> RegisteredAdapter:
        reg = None if is_virtual(name) else self.registry.get(name)
        if reg is None:
            raise InvalidRequestError(f"{field}: adapter {name!r} does not exist", field)
        return reg

    def _merge(
        self, key: str, sources: tuple[RegisteredAdapter, ...], params: MergeParams, field: str
    ) -> str:
        """Merge and register (worker thread); the virtual adapter's name."""
        registry = self.registry
        name = f"{VIRTUAL_PREFIX}merged/{key[:32]}"
        if registry.get(name) is not None:  # registered, then its entry dropped: reuse it
            return name
        start = time.perf_counter()
        try:
            weights = [registry.weights(s.adapter_id) for s in sources]
        except AdapterNotFoundError as exc:
            message = f"{field}: a source adapter was deleted during the merge"
            raise InvalidRequestError(message, field) from exc
        names = [s.name for s in sources]
        content = [[s.name, s.record.sha256, s.record.spec_json] for s in sources]
        seed = int(_digest(content, params)[:16], 16) % 2**63
        try:
            spec, merged = merge_adapters(
                names, [(s.spec, w) for s, w in zip(sources, weights, strict=True)], params, seed
            )
        except MergeError as exc:
            raise _refused(exc, field) from exc
        try:
            registry.register_virtual(name, spec, merged)
        except AdapterExistsError:  # a request that came after the lock was dropped won
            return name
        self.num_merges += 1
        logger.info(
            "merged %s (%s) as %s in %.3f s",
            ", ".join(names),
            params.strategy,
            name,
            time.perf_counter() - start,
        )
        return name

    async def drop_stale(self) -> None:
        """Remove merges of sources that were deleted or reloaded since (busy ones: later)."""
        registry = self.registry
        for key, entry in list(self._entries.items()):
            if any(registry.get(s.name) is not s for s in entry.sources):
                await self._remove(key, entry)

    async def _evict_beyond_bound(self, keep: str) -> None:
        now = time.monotonic()
        for key, entry in list(self._entries.items()):  # least recently used first
            if len(self._entries) <= self.max_entries:
                return
            if key != keep and now - entry.last_used >= self.grace_s:
                await self._remove(key, entry)

    async def _remove(self, key: str, entry: _Entry) -> None:
        try:
            await self._remove_adapter(entry.name)
        except AdapterBusyError:
            return  # requests still use it: a later pass removes it
        except UnknownAdapterError:
            pass
        if self._entries.get(key) is entry:
            del self._entries[key]
        logger.debug("dropped merged adapter %s", entry.name)


def _params(spec: MergeRequest, field: str) -> MergeParams:
    if not spec.ids:
        raise InvalidRequestError(f"{field}.ids must name at least one adapter", f"{field}.ids")
    if len(spec.ids) > MAX_MERGED_IDS:
        raise InvalidRequestError(
            f"{field}.ids names {len(spec.ids)} adapters; at most {MAX_MERGED_IDS} can be merged",
            f"{field}.ids",
        )
    if len(spec.weights) != len(spec.ids):
        raise InvalidRequestError(
            f"{field}.weights: {len(spec.ids)} ids but {len(spec.weights)} weights; give one "
            "weight per id",
            f"{field}.weights",
        )
    try:
        return MergeParams(
            weights=tuple(spec.weights),
            strategy="linear" if spec.merge_strategy is None else spec.merge_strategy,
            density=spec.density,
            majority_sign_method=(
                "total" if spec.majority_sign_method is None else spec.majority_sign_method
            ),
        )
    except MergeError as exc:
        raise _refused(exc, field) from exc


def _refused(exc: MergeError, field: str) -> InvalidRequestError:
    """A merge the request's spec cannot make, naming the spec field at fault."""
    return InvalidRequestError(f"{field}.{exc.field}: {exc}", f"{field}.{exc.field}")


def _digest(sources: list[list[object]], params: MergeParams) -> str:
    """A hex sha256 of the sources and the merge parameters, in canonical JSON."""
    canonical = json.dumps(
        [sources, params.weights, params.strategy, params.density, params.majority_sign_method],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
