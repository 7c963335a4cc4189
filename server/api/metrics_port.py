"""--metrics-port: a second listener that serves only /metrics, without keys.

For a Prometheus on a private network (deploy/docker-compose.yml scrapes it and does not publish
it): scrapers need no key, while the API port keeps /metrics behind the inference key. The
listener runs in the API server's event loop and stops with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.api.hosts import AllowedHosts
from server.api.routes.ops import scrape
from server.api.state import ServerState

logger = logging.getLogger(__name__)


def metrics_app(state: ServerState) -> Starlette:
    """GET /metrics and nothing else (404), behind --allowed-hosts when set."""

    async def metrics(request: Request) -> Response:
        return await scrape(state)

    middleware = []
    if state.config.allowed_hosts:
        middleware.append(Middleware(AllowedHosts, allowed=state.config.allowed_hosts))
    return Starlette(routes=[Route("/metrics", metrics, methods=["GET"])], middleware=middleware)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves the process's signals to the API server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsListener:
    """The metrics server on (--host, --metrics-port); `start` raises OSError if it can't bind."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, port = self.state.config.host, self.state.config.metrics_port
        assert port is not None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            logger.error("cannot listen on --metrics-port %d: %s", port, exc)
            raise
        # No log config or level: the API server's uvicorn has set up logging already.
        config = uvicorn.Config(
            metrics_app(self.state), lifespan="off", log_config=None, log_level=None
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        logger.info("metrics on http://%s:%d/metrics (no key)", host, port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
