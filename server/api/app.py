"""The FastAPI app: routers, error handlers, request limits, start-up and shutdown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from server import __version__
from server.api.csrf import CrossSiteProtection
from server.api.errors import install_handlers
from server.api.fairness import slot_tenant
from server.api.hosts import AllowedHosts
from server.api.limits import BodyLimit, ConcurrencyLimit, RequestLimits, SendTimeout
from server.api.metrics_port import MetricsListener
from server.api.routes import adapters, console, files, fine_tuning, lorax, openai, ops
from server.api.state import ServerState, open_adapter_store
from server.api.stats_history import StatsHistory
from server.config import EngineConfig, ServerConfig
from server.engine.llm_engine import LLMEngine
from server.engine.setup import open_registry
from server.metrics import Metrics
from server.model.cpu_runtime import TransientThreadExecutor

DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # asyncio's own default


def create_app(state: ServerState) -> FastAPI:
    """The app over `state`; the engine loads in the background once it starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # asyncio.to_thread's threads (the model's build, adapter reads, merges) end when
        # idle, so none keeps an OpenMP team beside the step thread's.
        loop = asyncio.get_running_loop()
        loop.set_default_executor(TransientThreadExecutor(DEFAULT_WORKERS, "loraplex-worker"))
        metrics_listener = MetricsListener(state)
        if state.config.metrics_port is not None:
            await metrics_listener.start()
        starting = asyncio.create_task(state.start())
        sampling = asyncio.create_task(app.state.stats_history.run())
        try:
            yield
        finally:
            starting.cancel()
            await metrics_listener.stop()
            sampling.cancel()
            await state.stop()

    app = FastAPI(
        title="loraplex",
        version=__version__,
        description="Multi-adapter LoRA serving with OpenAI- and LoRAX-compatible APIs.",
        lifespan=lifespan,
        # Served by routes/ops.py instead, behind the inference key.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    app.state.stats_history = StatsHistory(state.metrics)
    install_handlers(app)
    for router in (
        ops.router,
        openai.router,
        adapters.router,
        files.router,
        fine_tuning.router,
        lorax.router,
        console.router,
    ):
        app.include_router(router)
    cfg = state.config
    limits = RequestLimits(
        max_body_bytes=cfg.max_request_body_mb * 2**20,
        max_upload_bytes=cfg.max_upload_mb * 2**20,
        body_timeout_s=cfg.request_body_timeout_s,
        max_concurrent=cfg.max_concurrent_requests,
        max_key_concurrent=cfg.key_concurrent_requests,
        send_timeout_s=cfg.send_timeout_s,
    )
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(SendTimeout, limits=limits)  # inside: a dropped client frees its slot
    # Refuses before reading.
    app.add_middleware(ConcurrencyLimit, limits=limits, tenant_of=slot_tenant)
    app.add_middleware(CrossSiteProtection, trusted_origins=cfg.csrf_trusted_origins)
    if cfg.allowed_hosts:
        app.add_middleware(AllowedHosts, allowed=cfg.allowed_hosts)  # outermost: first check
    return app


def build_state(server: ServerConfig, engine: EngineConfig) -> ServerState:
    """Server state whose loader builds the engine over the adapter store in --data-dir."""
    assert engine.model is not None
    name = server.served_model_name or Path(engine.model).name

    def load() -> LLMEngine:
        store = open_adapter_store(server)
        return LLMEngine(engine, registry=open_registry(server.data_dir, engine, store))

    metrics = Metrics(name, server.metrics_max_adapters, server.metrics_vllm_names)
    return ServerState(config=server, loader=load, model_name=name, metrics=metrics)
