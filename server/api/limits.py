"""Per-request limits enforced before any route runs: body size, body arrival time, and the
number of requests in flight.

Bodies are counted while they arrive, so nothing past the limit is ever buffered or parsed.
A refusal raised while the route reads its body is a BodyRefused (see errors.py), which
FastAPI's body parsing lets through.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import (
    APIError,
    BodyRefused,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    error_response,
)

UPLOAD_PATHS = ("/v1/adapters", "/v1/files")  # POST: an upload
RELOAD_PREFIX = "/v1/adapters/"  # PUT /v1/adapters/{name}: an in-place reload, an upload too
# Probes and scrapes are never refused: an overloaded server must still say it is alive.
UNLIMITED_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass(frozen=True)
class RequestLimits:
    """The limits, in the units the middleware uses; built from ServerConfig."""

    max_body_bytes: int  # every route but uploads (--max-request-body-mb)
    max_upload_bytes: int  # POST /v1/adapters and /v1/files, PUT /v1/adapters/{name}
    body_timeout_s: float  # whole body, from the request's start (--request-body-timeout-s)
    max_concurrent: int  # requests in flight (--max-concurrent-requests)


def _too_large(limits: RequestLimits, upload: bool) -> APIError:
    if upload:
        mb = limits.max_upload_bytes // 2**20
        return PayloadTooLarge(f"upload exceeds --max-upload-mb ({mb} MB)")
    mb = limits.max_body_bytes // 2**20
    return PayloadTooLarge(f"request body exceeds --max-request-body-mb ({mb} MB)")


def _too_slow(limits: RequestLimits) -> APIError:
    # The connection closes: the rest of a body that slow is not worth reading.
    return RequestTimeout(
        f"request body did not arrive within --request-body-timeout-s "
        f"({limits.body_timeout_s:g} s)",
        headers={"Connection": "close"},
    )


def is_upload(method: str, path: str) -> bool:
    """Whether a request's body is an upload, held to --max-upload-mb."""
    if method == "POST":
        return path.startswith(UPLOAD_PATHS)
    return method == "PUT" and path.startswith(RELOAD_PREFIX)


async def _answer(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error_response(Request(scope), error)(scope, receive, send)


class BodyLimit:
    """413 past the byte limit (by Content-Length up front, else while reading); 408 when the
    body takes longer than the time limit to arrive."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = is_upload(scope["method"], scope["path"])
        max_bytes = self.limits.max_upload_bytes if upload else self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            await _answer(scope, receive, send, _too_large(self.limits, upload))
            return
        deadline = time.monotonic() + self.limits.body_timeout_s
        seen = 0
        done = False

        async def limited() -> Message:
            nonlocal seen, done
            if done:  # after the body: disconnect polls, unlimited
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise BodyRefused(_too_slow(self.limits)) from None
            if message["type"] != "http.request":
                done = True
                return message
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise BodyRefused(_too_large(self.limits, upload))
            done = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


class ConcurrencyLimit:
    """503 with Retry-After once --max-concurrent-requests requests are in flight (a streaming
    request counts until its stream ends); probes and scrapes are exempt."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limits.max_concurrent:
            error = ServerBusy(
                f"too many requests in flight ({self.in_flight}, the limit of "
                f"--max-concurrent-requests); retry shortly",
                headers={"Retry-After": "1"},
            )
            await _answer(scope, receive, send, error)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
