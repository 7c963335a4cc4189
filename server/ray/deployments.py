"""The Ray Serve deployments: an ingress in front of engine replicas.

Each EngineReplica runs the whole loraplex app (the one `loraplex serve` runs) in-process
over its own engine and a per-replica cache of the shared adapter store. The Ingress reads
which adapter a request is for and calls the replicas with multiplexed_model_id = that
name, so Ray Serve sends it to a replica that already holds the adapter, and spreads cold
adapters; training files and jobs route together by one key (they live on the replica that
took them); base-model and other requests go to any replica. Responses stream through.
"""

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.config import EngineConfig, ServerConfig
from server.ray.asgi import ForwardedRequest, Lifespan, ResponseStart, body_chunks, call_asgi
from server.ray.routing import routing_key

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"  # which engine replica served a response
STARTUP_POLL_S = 0.1
MAX_HELD_ADAPTERS = 64  # per replica, for Ray's routing (a decorator argument: fixed here)
_HOP_BY_HOP = {b"content-length", b"transfer-encoding", b"connection"}


@serve.deployment
class EngineReplica:
    """One engine and the full HTTP app over it; serves forwarded requests."""

    async def __init__(self, server: ServerConfig, engine: EngineConfig) -> None:
        from server.api.app import build_state, create_app
        from server.model.cpu_runtime import tune_allocator

        tune_allocator()  # this replica's process, as `loraplex serve` does
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica_id = re.sub(r"[^A-Za-z0-9_.-]", "_", replica_id)
        # Each replica its own cache, index and job store; adapters live in the shared store.
        data_dir = Path(server.data_dir) / "replicas" / self.replica_id
        server = dataclasses.replace(server, data_dir=str(data_dir), metrics_port=None)
        self.state = build_state(server, engine)
        self.app = create_app(self.state)
        # The app's own lifespan, as `loraplex serve` runs it; the model loads in the
        # background, and the replica counts as started once it is ready to serve.
        self.lifespan = Lifespan(self.app)
        await self.lifespan.startup()
        while not self.state.ready:
            if self.state.load_error is not None:
                raise RuntimeError(f"replica start-up failed: {self.state.load_error}")
            await asyncio.sleep(STARTUP_POLL_S)
        logger.info("engine replica %s ready", self.replica_id)

    @serve.multiplexed(max_num_models_per_replica=MAX_HELD_ADAPTERS)
    async def hold(self, adapter: str) -> str:
        """Ray Serve's model load: warm the adapter into host memory here (if it exists).

        Ray counts a replica as holding its MAX_HELD_ADAPTERS most recently used adapters
        and routes their requests to it; the engine's own caches decide what stays on the
        device and in host memory.
        """
        await self.state.adapters.warm(adapter)
        return adapter

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Run one request through this replica's app: ResponseStart, then body chunks."""
        key = serve.get_multiplexed_model_id()  # an adapter name, TRAINING_KEY or ""
        if key:
            await self.hold(key)
        header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        async for item in call_asgi(self.app, request, header):
            yield item

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine loop must be running."""
        if self.state.engine is None or not self.state.engine.running:
            raise RuntimeError("the engine loop is not running")

    async def __del__(self) -> None:
        await self.lifespan.shutdown()


ingress_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(ingress_app)
class Ingress:
    """The HTTP front: every route of the API, forwarded to an engine replica."""

    def __init__(self, engines: DeploymentHandle, base_model: str) -> None:
        self.engines = engines
        self.base_model = base_model

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def proxy(self, request: Request, path: str) -> StreamingResponse:
        """Forward the request; `path` is unused (the route matches every path)."""
        body = await request.body()
        path = request.url.path
        key = routing_key(path, body, self.base_model)
        forwarded = ForwardedRequest(
            method=request.method,
            path=path,
            query_string=request.url.query.encode(),
            headers=list(request.headers.raw),
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        handle = self.engines.options(stream=True, multiplexed_model_id=key or "")
        stream = handle.forward.remote(forwarded)
        start = await stream.__anext__()
        assert isinstance(start, ResponseStart), "a response starts with its status"
        response = StreamingResponse(body_chunks(stream), status_code=start.status)
        response.raw_headers = [(k, v) for k, v in start.headers if k.lower() not in _HOP_BY_HOP]
        return response


def build_app(
    server: ServerConfig, engine: EngineConfig, num_replicas: int, num_gpus: float, num_cpus: float
) -> serve.Application:
    """The Ray Serve application: Ingress over num_replicas engine replicas."""
    base_model = server.served_model_name or Path(str(engine.model)).name
    engines = EngineReplica.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
        max_ongoing_requests=server.max_concurrent_requests,
    ).bind(server, engine)
    ingress = Ingress.options(
        max_ongoing_requests=server.max_concurrent_requests,
        ray_actor_options={"num_cpus": 0},  # it only forwards
    )
    return ingress.bind(engines, base_model)
