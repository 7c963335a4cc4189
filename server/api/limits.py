"""Per-request limits enforced around every route: body size, body arrival time, the number
of requests in flight, and the time a response may wait for its client to read.

Bodies are counted while they arrive, so nothing past the limit is ever buffered or parsed.
A refusal raised while the route reads its body is a BodyRefused (see errors.py), which
FastAPI's body parsing lets through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import (
    APIError,
    BodyRefused,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    error_response,
)

logger = logging.getLogger(__name__)

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
    max_key_concurrent: int  # one tenant's requests in flight (--max-key-concurrent-requests)
    send_timeout_s: float  # one write waiting for the client to read (--send-timeout-s)


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
    request counts until its stream ends), 429 once one tenant (server.api.fairness) has
    --max-key-concurrent-requests of them, so one key's or client's requests, idle or slow,
    cannot take every slot; probes and scrapes are exempt."""

    def __init__(
        self, app: ASGIApp, limits: RequestLimits, tenant_of: Callable[[Request], str]
    ) -> None:
        self.app = app
        self.limits = limits
        self.tenant_of = tenant_of
        self.in_flight = 0
        self.tenants: Counter[str] = Counter()

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
        tenant = self.tenant_of(Request(scope))
        held = self.tenants[tenant]
        if held >= self.limits.max_key_concurrent:
            error = Overloaded(
                f"this key (or client) already has {held} requests in flight, the limit of "
                "--max-key-concurrent-requests; retry when one ends",
                headers={"Retry-After": "1"},
            )
            await _answer(scope, receive, send, error)
            return
        self.in_flight += 1
        self.tenants[tenant] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.tenants[tenant] -= 1
            if not self.tenants[tenant]:
                del self.tenants[tenant]  # no entry kept for a tenant with nothing in flight


class _SendTimedOut(Exception):
    """A write waited past --send-timeout-s for the client to read (caught by SendTimeout)."""


class SendTimeout:
    """Drop a client that reads nothing for --send-timeout-s while its response waits.

    A write that the client does not read blocks once the socket's buffers are full (the
    server's flow control); unbounded, a client that never reads would keep its request, its
    concurrency slot and its finished output forever. Past the timeout the route is ended:
    its stream closes, which aborts its engine sequences, and the connection is closed.
    """

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits
        self.num_dropped = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout = self.limits.send_timeout_s

        async def timed(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout)
            except TimeoutError:
                raise _SendTimedOut from None

        try:
            await self.app(scope, receive, timed)
        except _SendTimedOut:
            self.num_dropped += 1
            client = scope.get("client")
            # A warning: uvicorn logs "ASGI callable returned without completing response"
            # next, as it closes the connection; this says why.
            logger.warning(
                "dropped a client that read nothing for %g s (--send-timeout-s): %s %s from %s",
                timeout,
                scope["method"],
                scope["path"],
                client[0] if client else "?",
            )
