"""ServerState: start-up and shutdown wiring, and the pieces the routes reach once running."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.shared_store import SharedAdapterStore, storage_options
from adapters.store import AdapterBackend, AdapterStore
from server.api.clients import ServedModel
from server.api.engine_client import ServingClient
from server.api.errors import Unavailable
from server.api.serving_chat import ChatService
from server.api.serving_lorax import LoraxService
from server.api.serving_openai import CompletionService
from server.config import ServerConfig
from server.engine.async_engine import AsyncLLMEngine
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics
from server.serving.adapters import AdapterService
from server.training.jobs import JobStore
from server.training.manager import JobManager
from server.training.stats import training_stats

logger = logging.getLogger(__name__)


def open_adapter_store(config: ServerConfig) -> AdapterBackend:
    """The local store in --data-dir, or the shared one at --adapter-store cached there."""
    data_dir = Path(config.data_dir)
    if config.adapter_store is None:
        return AdapterStore(data_dir)
    options = storage_options(config.adapter_store, config.s3_endpoint_url)
    return SharedAdapterStore(config.adapter_store, data_dir, options=options)


@dataclass(frozen=True)
class Services:
    """The inference services, built once the engine is: each gets an EngineClient, the
    adapter service as its ModelResolver, and the served model's facts, nothing else."""

    completions: CompletionService
    chat: ChatService
    lorax: LoraxService

    @classmethod
    def build(cls, client: ServingClient, adapters: AdapterService, llm: LLMEngine) -> Services:
        model = ServedModel.of(llm)
        return cls(
            CompletionService(client, adapters, model),
            ChatService(client, adapters, model),
            LoraxService(client, adapters, model),
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
    _adapters: AdapterService | None = None
    _services: Services | None = None

    async def start(self) -> None:
        """Load the model, start the step loop, preload adapters, then report ready."""
        try:
            llm = await asyncio.to_thread(self.loader)
            assert llm.registry is not None, "the server always runs with a registry"
            engine = AsyncLLMEngine(llm)
            engine.step_hooks.append(self.metrics.observe_step)
            engine.start()
            self.engine = engine
            cfg = self.config
            adapters = AdapterService(
                llm.registry,
                engine,
                llm.tokenizer,
                self.model_name,
                cfg.max_upload_mb * 2**20,
                cfg.s3_endpoint_url,
            )
            self._adapters = adapters
            client = ServingClient(engine, cfg.max_waiting, lambda: self.ready)
            self._services = Services.build(client, adapters, llm)
            await asyncio.to_thread(adapters.preload, cfg.preload_adapters)
            if adapters.shared_store is not None:
                poll = adapters.follow_shared_store(cfg.adapter_store_poll_s)
                self.poller = asyncio.create_task(poll)
            self.jobs = self._job_manager(llm, adapters)
            await self.jobs.start()
            store = self.jobs.store
            self.metrics.watch_training(lambda: training_stats(store))
            # What start-up built (model, tokenizer, registry: ~350k objects for the bench
            # model with 104 adapters) lives as long as the server. Out of the collector's
            # sight, a full collection no longer stalls the step thread to walk it (0.35 s).
            gc.collect()
            gc.freeze()
            self.ready = True
            logger.info("ready: serving %s with %d adapters", self.model_name, len(adapters))
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

    def _job_manager(self, llm: LLMEngine, adapters: AdapterService) -> JobManager:
        cores = os.cpu_count() or 2
        threads = self.config.training_threads or max(1, cores // 2)
        return JobManager(
            JobStore(self.config.data_dir),
            adapters,
            self.model_name,
            str(llm.config.model),
            llm.device.type,
            threads,
            self.config.max_concurrent_jobs,
            self.config.max_queued_jobs,
            remove_adapter=adapters.remove,
            memory_limit_mb=self.config.training_memory_mb,
        )

    @property
    def job_manager(self) -> JobManager:
        if self.jobs is None:
            raise Unavailable("the server is not ready yet", headers={"Retry-After": "5"})
        return self.jobs

    @property
    def async_engine(self) -> AsyncLLMEngine:
        """The running engine; 503 while the model loads."""
        if self.engine is None:
            raise Unavailable("the model is still loading", headers={"Retry-After": "5"})
        return self.engine

    @property
    def adapters(self) -> AdapterService:
        """The adapter service; 503 while the model loads."""
        if self._adapters is None:
            raise Unavailable("the model is still loading", headers={"Retry-After": "5"})
        return self._adapters

    @property
    def services(self) -> Services:
        """The inference services; 503 while the model loads."""
        if self._services is None:
            raise Unavailable("the model is still loading", headers={"Retry-After": "5"})
        return self._services
