"""Which adapter the Ray ingress routes a request by, and the in-process ASGI forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from server.ray.asgi import ForwardedRequest, Lifespan, ResponseStart, body_chunks, call_asgi
from server.ray.routing import TRAINING_KEY, adapter_of, routing_key

BASE = "tiny-chat"
REPO_ROOT = Path(__file__).resolve().parents[2]


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_openai_requests_route_by_model_and_the_base_model_by_none() -> None:
    assert adapter_of("/v1/completions", body(model="sql"), BASE) == "sql"
    assert adapter_of("/v1/chat/completions", body(model="team/sql"), BASE) == "team/sql"
    assert adapter_of("/v1/completions", body(model=BASE), BASE) is None
    assert adapter_of("/v1/completions", body(prompt="x"), BASE) is None


def test_lorax_requests_route_by_adapter_id() -> None:
    assert adapter_of("/generate", body(inputs="x", parameters={"adapter_id": "a"}), BASE) == "a"
    assert adapter_of("/generate_stream", body(inputs="x"), BASE) is None
    assert adapter_of("/", body(inputs="x", parameters={"adapter_id": "b"}), BASE) == "b"


def test_other_routes_and_bad_bodies_route_anywhere() -> None:
    assert adapter_of("/v1/adapters", body(model="sql"), BASE) is None
    assert adapter_of("/v1/completions", b"{not json", BASE) is None
    assert adapter_of("/v1/completions", b"[1, 2]", BASE) is None
    assert adapter_of("/v1/completions", body(model=7), BASE) is None


def test_call_asgi_streams_status_headers_and_chunks() -> None:
    app = FastAPI()

    @app.post("/echo")
    async def echo(payload: dict) -> StreamingResponse:
        async def parts():  # type: ignore[no-untyped-def]
            for word in payload["words"]:
                yield word.encode()

        return StreamingResponse(parts(), status_code=201, headers={"x-a": "1"})

    request = ForwardedRequest(
        "POST", "/echo", b"", [(b"content-type", b"application/json")], body(words=["a", "b"])
    )

    async def run() -> tuple[ResponseStart, list[bytes]]:
        stream = call_asgi(app, request, [(b"x-replica", b"r1")])
        start = await stream.__anext__()
        assert isinstance(start, ResponseStart)
        return start, [c async for c in body_chunks(stream)]

    start, chunks = asyncio.run(run())
    assert start.status == 201
    assert (b"x-a", b"1") in start.headers and (b"x-replica", b"r1") in start.headers
    assert b"".join(chunks) == b"ab"


def test_training_files_and_jobs_route_together() -> None:
    assert routing_key("/v1/files", b"", BASE) == TRAINING_KEY
    assert routing_key("/v1/fine_tuning/jobs/ftjob-1/events", b"", BASE) == TRAINING_KEY
    assert routing_key("/v1/completions", body(model="sql"), BASE) == "sql"
    assert routing_key("/v1/models", b"", BASE) is None


def test_the_rayservice_manifest_names_our_app_and_deployments() -> None:
    yaml = pytest.importorskip("yaml")
    manifest = yaml.safe_load((REPO_ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, _, attribute = app["import_path"].partition(":")
    assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file() and attribute == "app"
    assert {d["name"] for d in app["deployments"]} == {"EngineReplica", "Ingress"}
    assert "EngineReplica" in (REPO_ROOT / "server" / "ray" / "deployments.py").read_text()


def test_lifespan_runs_the_apps_startup_and_shutdown() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    async def run() -> None:
        span = Lifespan(app)
        await span.startup()
        assert events == ["startup"]
        await span.shutdown()

    asyncio.run(run())
    assert events == ["startup", "shutdown"]
