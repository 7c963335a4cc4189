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
    llm = state.llm
    cfg, ecfg, pool = llm.model_config, llm.config, llm.pool
    paths = {"model_path": ecfg.model, "data_dir": state.config.data_dir}
    return {
        "version": __version__,
        "model": state.model_name,
        **(paths if has_admin_rights(request) else {}),
        "architecture": cfg.architecture,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_parameters": cfg.num_params,
        "quantize": ecfg.quantize,
        "dtype": str(ecfg.torch_dtype).removeprefix("torch."),
        "device": str(llm.device),
        "max_model_len": llm.max_model_len,
        "max_num_seqs": ecfg.max_num_seqs,
        "max_lora_rank": ecfg.max_lora_rank,
        "max_loras": ecfg.max_loras,
        "lora_backend": llm.adapter_cache.backend if llm.adapter_cache else None,
        "adapters_registered": len(state.registry),
        "pool": {
            "pages": pool.num_pages,
            "page_bytes": pool.page_bytes,
            "block_size": pool.geometry.block_size,
            # One budget: KV blocks requests hold, cached prefix blocks none holds (given
            # back on demand, like idle adapters), adapter weights, free pages.
            "kv_pages": pool.used_by_kind["kv"] - llm.kv.num_cached_idle,
            "cached_kv_pages": llm.kv.num_cached_idle,
            "adapter_pages": pool.used_by_kind["adapter"],
            "free_pages": pool.num_free,
            "prefix_caching": llm.prefix_cache is not None,
        },
    }


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(request: Request) -> Response:
    """Prometheus text format (also served without keys on --metrics-port)."""
    return await scrape(_state(request))


async def scrape(state: ServerState) -> Response:
    """The metrics; gauges are refreshed first, so an idle server reports its state."""
    engine = state.engine
    if engine is not None and engine.running:
        # On the step thread, between steps: the scheduler's queues are not thread-safe.
        with contextlib.suppress(TimeoutError):
            refresh = engine.call(lambda: state.metrics.observe_scrape(engine.engine))
            await asyncio.wait_for(refresh, timeout=SCRAPE_REFRESH_TIMEOUT_S)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# FastAPI's own /openapi.json and /docs are turned off in create_app: these take a key.
@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(require_api_key)])
async def docs() -> HTMLResponse:
    """Swagger UI; it fetches /openapi.json without a key, so it works on a keyless server."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="loraplex")
