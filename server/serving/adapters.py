"""AdapterService: every adapter verb, and the only caller of the registry and of the engine's
administration for them.

Register (an upload, a directory, a path or URI, a fine-tuning result), reload in place,
retire the replaced version, remove, preload at start-up, follow a shared store's changes,
merge, and render chats with an adapter's template. Whatever path removes or replaces a
version, the same steps follow: the engine drops it on its step thread (refused while requests
use it), the files go off the event loop, and the merges and the chat template kept for that
version go too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapters import AdapterRegistry, BaseModelInfo, RegisteredAdapter, sources
from adapters.registered import is_virtual
from adapters.shared_store import SharedAdapterStore, storage_options
from server.engine.async_engine import AsyncLLMEngine
from server.engine.errors import AdapterBusyError, UnknownAdapterError
from server.engine.snapshot import AdapterUsage
from server.model.tokenizer import Tokenizer
from server.serving.merges import MergedAdapterCache, MergeRequest
from server.serving.preload import preload_targets
from server.serving.templates import ChatTemplates

logger = logging.getLogger(__name__)


class AdapterService:
    """The served adapters: lookups for requests, and the verbs that change them."""

    def __init__(
        self,
        registry: AdapterRegistry,
        engine: AsyncLLMEngine,
        tokenizer: Tokenizer,
        model_name: str,
        max_upload_bytes: int,
        s3_endpoint_url: str | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.model_name = model_name
        self.max_upload_bytes = max_upload_bytes
        self.s3_endpoint_url = s3_endpoint_url
        self.merges = MergedAdapterCache(registry, engine.remove_adapter)
        self.templates = ChatTemplates(tokenizer)

    # ---- lookups ------------------------------------------------------------------------

    def get(self, name: str) -> RegisteredAdapter | None:
        """A stored adapter's current version (never a merge: those are internal)."""
        return None if is_virtual(name) else self.registry.get(name)

    def adapter(self, name: str) -> RegisteredAdapter | None:
        """The current version of the adapter a request runs on (a merge's too)."""
        return self.registry.get(name)

    def list(self) -> list[RegisteredAdapter]:
        """Every stored adapter, in registration order."""
        return self.registry.list()

    def __len__(self) -> int:
        return len(self.registry)

    @property
    def base(self) -> BaseModelInfo:
        return self.registry.base

    @property
    def max_lora_rank(self) -> int:
        return self.registry.max_lora_rank

    def is_host_resident(self, reg: RegisteredAdapter) -> bool:
        return self.registry.is_host_resident(reg.adapter_id)

    async def warm(self, name: str) -> None:
        """Bring a stored adapter's weights into host memory, if it exists (off the event
        loop: a first use may fetch it from a shared store)."""
        reg = self.get(name)
        if reg is not None:
            await asyncio.to_thread(self.registry.warm, reg.adapter_id)

    def resolve_model(self, model: str | None) -> str | None:
        """A request's model: None for the base model, else a registered adapter's name."""
        if model is None or model == self.model_name:
            return None
        if self.get(model) is None:
            raise UnknownAdapterError(
                f"the model {model!r} does not exist: it is neither the base model "
                f"{self.model_name!r} nor a registered adapter",
                "model",
            )
        return model

    async def resolve_merged(self, spec: MergeRequest, field: str) -> str:
        """The internal name of the adapter serving a merge spec, merging it first if new."""
        return await self.merges.resolve(spec, field)

    async def usage(self, regs: list[RegisteredAdapter]) -> list[AdapterUsage]:
        """Requests and device residency of each adapter, as the engine sees them now."""
        return await self.engine.adapter_usage([r.adapter_id for r in regs])

    # ---- registering --------------------------------------------------------------------

    async def upload(self, name: str, files: Mapping[str, bytes]) -> RegisteredAdapter:
        """Validate uploaded files (two files, or an archive's), store and register them."""
        return await asyncio.to_thread(self.registry.register_files, name, files, "upload")

    def register_dir(self, name: str, path: Path, source: str = "path") -> RegisteredAdapter:
        """Validate, copy into the store and register a PEFT directory (blocking: a thread)."""
        return self.registry.register_dir(name, path, source=source)

    async def load(self, name: str, uri: str, source: str = "path") -> RegisteredAdapter:
        """Register an adapter from a path, file://, s3:// or hf:// URI (no roots checked)."""
        return await asyncio.to_thread(self._load, name, uri, source)

    def _load(self, name: str, uri: str, source: str) -> RegisteredAdapter:
        with self._fetched(uri) as adapter_dir:
            return self.registry.register_dir(name, adapter_dir, source=source)

    def _fetched(self, uri: str) -> Any:
        """A local directory holding the adapter at uri, for the duration of a with block."""
        options = storage_options(uri, self.s3_endpoint_url)
        scratch = self.registry.store.data_dir
        return sources.fetched(uri, scratch, self.max_upload_bytes, options)

    # ---- replacing in place -------------------------------------------------------------

    def check_reloadable(self, name: str) -> None:
        """Raise UnknownAdapterError unless name is a stored adapter (before reading a body)."""
        if self.get(name) is None:
            raise UnknownAdapterError(
                f"adapter {name!r} does not exist; upload it with POST first", "name"
            )

    async def reload(self, name: str, files: Mapping[str, bytes]) -> RegisteredAdapter:
        """Replace an adapter's weights with uploaded files: running requests finish on the
        old version, new requests get the new one."""
        self.check_reloadable(name)
        new, old = await asyncio.to_thread(self.registry.reload_files, name, files, "upload")
        await self._retire(old)
        return new

    async def reload_from(self, name: str, uri: str, source: str = "path") -> RegisteredAdapter:
        """Replace an adapter's weights in place from a path or URI, as reload does."""
        new, old = await asyncio.to_thread(self._reload_from, name, uri, source)
        await self._retire(old)
        return new

    def _reload_from(
        self, name: str, uri: str, source: str
    ) -> tuple[RegisteredAdapter, RegisteredAdapter]:
        with self._fetched(uri) as adapter_dir:
            return self.registry.reload_dir(name, adapter_dir, source=source)

    async def _retire(self, old: RegisteredAdapter) -> None:
        """Hand a replaced version to the step thread, which frees it after its last request;
        what was kept for it here goes now."""
        await self.engine.retire_adapter(old.adapter_id)
        await self._forgotten(old)

    # ---- removing -----------------------------------------------------------------------

    async def remove(self, name: str) -> None:
        """Remove an adapter and delete its files; AdapterBusyError while requests use it."""
        if is_virtual(name):  # merges are internal: a client cannot name one
            raise UnknownAdapterError(f"adapter {name!r} does not exist", "name")
        await self._remove(name, self.registry.store.delete)

    async def _remove(self, name: str, drop_files: Callable[[str], object]) -> None:
        """Unregister on the step thread (quick, and never racing a step), then drop the
        files off it, then what was kept for the version."""
        reg = self.registry.get(name)
        await self.engine.remove_adapter(name)
        await asyncio.to_thread(drop_files, name)
        if reg is not None:
            await self._forgotten(reg)

    async def _forgotten(self, reg: RegisteredAdapter) -> None:
        """A version was removed or replaced: its chat template and the merges of it go."""
        self.templates.forget(reg.adapter_id)
        await self.merges.drop_stale()

    # ---- start-up and other replicas ----------------------------------------------------

    def preload(self, roots: tuple[str, ...]) -> None:
        """Register --preload-adapters (blocking: a thread); a bad one is logged, not fatal."""
        for name, uri in preload_targets(roots):
            if self.registry.get(name) is not None:
                continue
            try:
                self._load(name, uri, "preload")
            except Exception as exc:  # one bad adapter must not keep the rest from serving
                logger.error("skipping preloaded adapter %s (%s): %s", name, uri, exc)
                continue
            logger.info("preloaded adapter %s from %s", name, uri)

    @property
    def shared_store(self) -> SharedAdapterStore | None:
        store = self.registry.store
        return store if isinstance(store, SharedAdapterStore) else None

    async def follow_shared_store(self, interval_s: float) -> None:
        """Every interval_s, take what other replicas changed in the shared store."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync_shared_store()
            except Exception:  # a store outage must not end the polling
                logger.exception("polling the shared adapter store failed")

    async def sync_shared_store(self) -> None:
        """Register what other replicas added, switch to the versions they reloaded in place
        (the old one freed after its last request here), and remove what they deleted (an
        adapter busy with requests here goes at a later poll)."""
        store = self.shared_store
        assert store is not None, "only a shared store has other replicas"
        changes = await asyncio.to_thread(self.registry.sync)
        for _, old in changes.replaced:
            await self._retire(old)
        for name in changes.deleted:
            try:
                await self._remove(name, store.evict)
            except AdapterBusyError:
                continue
            except UnknownAdapterError:  # forgotten here already: only the cache is left
                await asyncio.to_thread(store.evict, name)
            logger.info("adapter %s was deleted through another replica", name)
