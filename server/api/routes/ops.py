"""Operations: /health and /ready (open probes), /info, /metrics and the API description."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.auth import has_admin_rights, require_api_key
from server.api.state import ServerState
from server.engine.async_engine import AsyncLLMEngine

router = APIRouter(tags=["ops"])
SCRAPE_REFRESH_TIMEOUT_S = 2.0  # a stuck step loop must not hang scrapes too


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the process can serve or is still loading; 503 once start-up or the loop failed.

    Open to all, so it names no cause (that may hold a path): the server's log has it.
    """
    state = _state(request)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": "start-up failed"}, 503)
    if state.engine is not None and not state.engine.running:
        return JSONResponse({"status": "failed", "error": "the engine loop stopped"}, 503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and adapters preloaded; 503 before."""
    state = _state(request)
    if state.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "5"})


@router.get("/info", dependencies=[Depends(require_api_key)])
async def info(request: Request) -> dict:
    """The model, engine settings and pool use; server paths only for admin rights."""
    state = _state(request)
    engine = state.async_engine
    facts, now = engine.facts, await engine.snapshot()
    paths = {"model_path": facts.model_path, "data_dir": state.config.data_dir}
    return {
        "version": __version__,
        "model": state.model_name,
        **(paths if has_admin_rights(request) else {}),
        "architecture": facts.architecture,
        "num_layers": facts.num_layers,
        "hidden_size": facts.hidden_size,
        "num_parameters": facts.num_parameters,
        "quantize": facts.quantize,
        "dtype": facts.dtype,
        "device": facts.device,
        "max_model_len": facts.max_model_len,
        "max_num_seqs": facts.max_num_seqs,
        "max_lora_rank": facts.max_lora_rank,
        "max_loras": facts.max_loras,
        "lora_backend": facts.lora_backend,
        "adapters_registered": now.adapters.registered if now.adapters else 0,
        "pool": {
            "pages": facts.num_pages,
            "page_bytes": facts.page_bytes,
            "block_size": facts.block_size,
            # One budget: KV blocks requests hold, cached prefix blocks none holds (given
            # back on demand, like idle adapters), adapter weights, free pages.
            "kv_pages": now.pool.kv,
            "cached_kv_pages": now.pool.kv_cached,
            "adapter_pages": now.pool.adapter,
            "free_pages": now.pool.free,
            "prefix_caching": facts.prefix_caching,
        },
    }


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(request: Request) -> Response:
    """Prometheus text format (also served without keys on --metrics-port)."""
    return await scrape(_state(request))


async def scrape(state: ServerState) -> Response:
    """The metrics; gauges are refreshed first from a fresh engine snapshot, so an idle server
    reports its state."""
    engine = state.engine
    if engine is not None and engine.running:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_refresh(state, engine), timeout=SCRAPE_REFRESH_TIMEOUT_S)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _refresh(state: ServerState, engine: AsyncLLMEngine) -> None:
    now = await engine.snapshot()
    levels = await engine.adapter_levels() if state.metrics.wants_levels(now) else None
    state.metrics.observe_scrape(now, levels)


# FastAPI's own /openapi.json and /docs are turned off in create_app: these take a key.
@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def docs() -> HTMLResponse:
    """Swagger UI; it fetches /openapi.json without a key, so it works on a keyless server."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="loraplex")
