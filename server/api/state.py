"""ServerState: what the routes share (engine, config, metrics), and the checks they all make."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from adapters import AdapterRegistry, RegisteredAdapter, sources
from adapters.registered import is_virtual
from adapters.shared_store import SharedAdapterStore, storage_options
from adapters.store import AdapterBackend, AdapterStore
from server.api.clients import ServedModel
from server.api.errors import BadRequest, ClientDisconnected, NotFound, Overloaded, Unavailable
from server.api.merged import MergedAdapterCache
from server.api.schemas.lorax import MergedAdapters
from server.api.serving_chat import ChatService
from server.api.serving_lorax import LoraxService
from server.api.serving_openai import CompletionService
from server.api.serving_responses import ResponsesService
from server.config import ServerConfig
from server.engine.async_engine import AsyncLLMEngine
from server.engine.errors import AdapterBusyError, UnknownAdapterError
from server.engine.llm_engine import LLMEngine, Prompt
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.metrics import Metrics
from server.training.jobs import JobStore
from server.training.manager import JobManager
from server.training.stats import training_stats

logger = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.5


def open_adapter_store(config: ServerConfig) -> AdapterBackend:
    """The local store in --data-dir, or the shared one at --adapter-store cached there."""
    data_dir = Path(config.data_dir)
    if config.adapter_store is None:
        return AdapterStore(data_dir)
    options = storage_options(config.adapter_store, config.s3_endpoint_url)
    return SharedAdapterStore(config.adapter_store, data_dir, options=options)


@dataclass(frozen=True)
class Services:
    """The inference services, built once the engine is: each gets the state as its
    EngineClient and ModelResolver, and the served model's facts, nothing else."""

    completions: CompletionService
    chat: ChatService
    lorax: LoraxService
    responses: ResponsesService  # over the chat service

    @classmethod
    def build(cls, state: ServerState, llm: LLMEngine) -> Services:
        model = ServedModel.of(llm)
        chat = ChatService(state, state, model)
        return cls(
            CompletionService(state, state, model),
            chat,
            LoraxService(state, state, model),
            ResponsesService(chat),
        )


@dataclass
class ServerState:
    """Built before the server listens; the engine itself loads in the background."""

    config: ServerConfig
    loader: Callable[[], LLMEngine]  # builds the engine (slow: loads and quantizes the model)
    model_name: str
    metrics: Metrics
    engine: AsyncLLMEngine | None = None
    jobs: JobManager | None = None
    ready: bool = False
    load_error: BaseException | None = None
    started: float = field(default_factory=time.time)
    poller: asyncio.Task[None] | None = None
    merged: MergedAdapterCache = field(init=False)
    _services: Services | None = None

    def __post_init__(self) -> None:
        self.merged = MergedAdapterCache(self)

    async def start(self) -> None:
        """Load the model, start the step loop, preload adapters, then report ready."""
        try:
            llm = await asyncio.to_thread(self.loader)
            engine = AsyncLLMEngine(llm)
            engine.step_hooks.append(self.metrics.observe_step)
            engine.start()
            self.engine = engine
            self._services = Services.build(self, llm)
            await asyncio.to_thread(self._preload)
            if isinstance(self.registry.store, SharedAdapterStore):
                self.poller = asyncio.create_task(self._poll_store(self.registry.store))
            self.jobs = self._job_manager(llm)
            await self.jobs.start()
            store = self.jobs.store
            self.metrics.watch_training(lambda: training_stats(store))
            self.ready = True
            logger.info("ready: serving %s with %d adapters", self.model_name, len(self.registry))
        except Exception as exc:
            logger.exception("start-up failed")
            self.load_error = exc

    async def stop(self) -> None:
        self.ready = False
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.jobs is not None:
            await self.jobs.stop()
        if self.engine is not None:
            await self.engine.stop()
            if self.llm.adapter_cache is not None:
                self.llm.adapter_cache.shutdown()

    def _job_manager(self, llm: LLMEngine) -> JobManager:
        cores = os.cpu_count() or 2
        threads = self.config.training_threads or max(1, cores // 2)
        return JobManager(
            JobStore(self.config.data_dir),
            self.registry,
            self.model_name,
            str(llm.config.model),
            llm.device.type,
            threads,
            self.config.max_concurrent_jobs,
            self.config.max_queued_jobs,
            remove_adapter=self._remove_adapter,
            memory_limit_mb=self.config.training_memory_mb,
        )

    async def _remove_adapter(self, name: str) -> None:
        """Unregister on the step thread (refused while requests use it), then delete files."""
        await self.async_engine.call(lambda: self.llm.remove_adapter(name))
        await asyncio.to_thread(self.registry.store.delete, name)

    @property
    def job_manager(self) -> JobManager:
        if self.jobs is None:
            raise Unavailable("the server is not ready yet", headers={"Retry-After": "5"})
        return self.jobs

    async def _poll_store(self, store: SharedAdapterStore) -> None:
        """Every --adapter-store-poll-s: register what other replicas added, switch to the
        versions they reloaded in place (the old one freed after its last request here), and
        remove what they deleted (an adapter busy with requests here goes at a later poll)."""
        while True:
            await asyncio.sleep(self.config.adapter_store_poll_s)
            try:
                changes = await asyncio.to_thread(self.registry.sync)
                for _, old in changes.replaced:
                    await self.async_engine.call(
                        lambda i=old.adapter_id: self.llm.retire_adapter(i)
                    )
                for name in changes.deleted:
                    try:
                        await self.async_engine.call(lambda n=name: self.llm.remove_adapter(n))
                    except AdapterBusyError:
                        continue
                    except UnknownAdapterError:
                        pass
                    await asyncio.to_thread(store.evict, name)
                    logger.info("adapter %s was deleted through another replica", name)
            except Exception:  # a store outage must not end the polling
                logger.exception("polling the shared adapter store failed")

    def load_adapter_uri(self, name: str, uri: str, source: str) -> None:
        """Register an adapter from a path, file://, s3:// or hf:// URI (no roots checked)."""
        options = storage_options(uri, self.config.s3_endpoint_url)
        scratch = self.registry.store.data_dir
        max_bytes = self.config.max_upload_mb * 2**20
        with sources.fetched(uri, scratch, max_bytes, options) as adapter_dir:
            self.registry.register_dir(name, adapter_dir, source=source)

    def reload_adapter_uri(
        self, name: str, uri: str, source: str
    ) -> tuple[RegisteredAdapter, RegisteredAdapter]:
        """Replace a registered adapter's weights from a URI in place; (new, old) versions."""
        options = storage_options(uri, self.config.s3_endpoint_url)
        scratch = self.registry.store.data_dir
        max_bytes = self.config.max_upload_mb * 2**20
        with sources.fetched(uri, scratch, max_bytes, options) as adapter_dir:
            return self.registry.reload_dir(name, adapter_dir, source=source)

    def _preload(self) -> None:
        """Register --preload-adapters (folders, or s3:// and hf:// URIs of one adapter each);
        a bad one is logged and skipped, not fatal."""
        for root in self.config.preload_adapters:
            try:
                kind = sources.scheme(root)
            except Exception as exc:
                logger.error("not preloading %s: %s", root, exc)
                continue
            if kind != "file":
                self._preload_one(sources.adapter_name_for(root), root)
                continue
            path = sources.local_path(root)
            try:
                dirs = (
                    [path]
                    if (path / "adapter_config.json").is_file()
                    else sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file())
                )
            except OSError as exc:
                logger.error("not preloading adapters from %s: %s", path, exc)
                continue
            for d in dirs:
                self._preload_one(d.name, str(d))

    def _preload_one(self, name: str, uri: str) -> None:
        if self.registry.get(name) is not None:
            return
        try:
            self.load_adapter_uri(name, uri, "preload")
        except Exception as exc:  # one bad adapter must not keep the rest from serving
            logger.error("skipping preloaded adapter %s (%s): %s", name, uri, exc)
            return
        logger.info("preloaded adapter %s from %s", name, uri)

    @property
    def async_engine(self) -> AsyncLLMEngine:
        """The running engine; 503 while the model loads."""
        if self.engine is None:
            raise Unavailable("the model is still loading", headers={"Retry-After": "5"})
        return self.engine

    @property
    def services(self) -> Services:
        """The inference services; 503 while the model loads."""
        if self._services is None:
            raise Unavailable("the model is still loading", headers={"Retry-After": "5"})
        return self._services

    @property
    def llm(self) -> LLMEngine:
        return self.async_engine.engine

    @property
    def registry(self) -> AdapterRegistry:
        assert self.llm.registry is not None, "the server always runs with a registry"
        return self.llm.registry

    def resolve_model(self, model: str | None) -> str | None:
        """A request's model: None for the base model, else a registered adapter's name."""
        if model is None or model == self.model_name:
            return None
        if is_virtual(model) or self.registry.get(model) is None:
            raise NotFound(
                f"the model {model!r} does not exist: it is neither the base model "
                f"{self.model_name!r} nor a registered adapter",
                "model",
            )
        return model

    async def resolve_merged(self, spec: MergedAdapters, field: str) -> str:
        return await self.merged.resolve(spec, field)

    def adapter(self, name: str) -> RegisteredAdapter | None:
        return self.registry.get(name)

    def check_serving(self, num_requests: int = 1) -> None:
        """503 until ready, 429 when the waiting queue is full."""
        if not self.ready or self.engine is None or not self.engine.running:
            raise Unavailable("the server is not ready yet", headers={"Retry-After": "1"})
        if num_requests > self.config.max_waiting:
            # Retrying could never help, so this is the request's fault, not the load's.
            raise BadRequest(
                f"this request needs {num_requests} sequences (prompts x n) but at most "
                f"{self.config.max_waiting} can wait (--max-waiting)",
                "n",
            )
        if self.engine.num_waiting + num_requests > self.config.max_waiting:
            raise Overloaded(
                f"too many requests waiting ({self.engine.num_waiting}); retry shortly",
                headers={"Retry-After": "1"},
            )

    def generate(
        self,
        request: Request,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        adapter: str | None,
        adapter_id: int | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several engine requests as one API call: (index, output) as outputs arrive.

        Every request is validated here, before any is queued (so errors surface before a
        response starts); leaving the iteration early, or the client going away, aborts all.
        """
        self.check_serving(len(prompts))
        engine = self.async_engine
        seqs = [
            engine.prepare(p, sp, adapter_name=adapter, adapter_id=adapter_id)
            for p, sp in zip(prompts, params, strict=True)
        ]
        return _merge(request, [engine.stream(s) for s in seqs])


async def _merge(
    request: Request, streams: list[AsyncIterator[RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        queue.put_nowait(ClientDisconnected("client disconnected"))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    watcher = asyncio.create_task(watch())
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        for task in [*tasks, watcher]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
