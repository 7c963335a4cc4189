"""Drive an in-process ASGI app: its lifespan, and HTTP requests with streamed responses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it (picklable, for a Ray call)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The status and headers; the body chunks (bytes) follow it."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def call_asgi(
    app: ASGIApp, request: ForwardedRequest, extra_headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[ResponseStart | bytes]:
    """ResponseStart, then body chunks as the app sends them; leaving early cancels the app
    (a streaming completion is aborted, as when a client disconnects)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": ("ray-serve", 0),
    }
    sent_body = False
    disconnected = asyncio.Event()
    queue: asyncio.Queue[Message | None] = asyncio.Queue()

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *extra_headers]
                yield ResponseStart(message["status"], headers)
            elif message["type"] == "http.response.body":
                if chunk := message.get("body", b""):
                    yield chunk
                if not message.get("more_body", False):
                    break
        await task
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def body_chunks(stream: AsyncIterator[ResponseStart | bytes]) -> AsyncIterator[bytes]:
    """The body chunks that follow a response's ResponseStart."""
    async for chunk in stream:
        assert isinstance(chunk, bytes), "one ResponseStart per response"
        yield chunk


class Lifespan:
    """An ASGI app's lifespan (start-up and shutdown hooks), run as a server would run it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Run the app's start-up; raises if the app reports it failed."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self._task = asyncio.create_task(self.app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"app start-up failed: {reply.get('message', reply['type'])}")

    async def shutdown(self) -> None:
        """Run the app's shutdown and wait for the lifespan to end."""
        if self._task is None:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._outbox.get()
        await self._task
        self._task = None
