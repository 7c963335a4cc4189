"""The FastAPI app: routers, error handlers, the upload size limit, start-up and shutdown."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api.errors import install_handlers
from server.api.routes import adapters, console, files, fine_tuning, lorax, openai, ops
from server.api.state import ServerState
from server.api.stats_history import StatsHistory
from server.config import EngineConfig, ServerConfig
from server.engine.llm_engine import LLMEngine
from server.engine.setup import open_registry
from server.metrics import Metrics

UPLOAD_PATHS = ("/v1/adapters", "/v1/files")


class UploadLimit:
    """413 for uploads over --max-upload-mb: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(UPLOAD_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        mb = self.max_bytes // 2**20
        body = json.dumps(
            {
                "error": {
                    "message": f"upload exceeds --max-upload-mb ({mb} MB)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "payload_too_large",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(state: ServerState) -> FastAPI:
    """The app over `state`; the engine loads in the background once it starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(state.start())
        sampling = asyncio.create_task(app.state.stats_history.run())
        try:
            yield
        finally:
            starting.cancel()
            sampling.cancel()
            await state.stop()

    app = FastAPI(
        title="loraplex",
        version=__version__,
        description="Multi-adapter LoRA serving with OpenAI- and LoRAX-compatible APIs.",
        lifespan=lifespan,
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
    app.add_middleware(UploadLimit, max_bytes=state.config.max_upload_mb * 2**20)
    return app


def build_state(server: ServerConfig, engine: EngineConfig) -> ServerState:
    """Server state whose loader builds the engine over the adapter store in --data-dir."""
    assert engine.model is not None
    name = server.served_model_name or Path(engine.model).name

    def load() -> LLMEngine:
        return LLMEngine(engine, registry=open_registry(server.data_dir, engine))

    return ServerState(config=server, loader=load, model_name=name, metrics=Metrics(name))
