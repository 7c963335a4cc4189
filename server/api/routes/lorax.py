"""LoRAX/TGI-compatible inference: /generate, /generate_stream, and / (the LoRAX client's)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import require_api_key
from server.api.schemas.lorax import LoraxRequest, LoraxResponse
from server.api.serving_lorax import LoraxService

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["lorax"])
SSE = {200: {"content": {"text/event-stream": {}}}}


def _service(request: Request) -> LoraxService:
    return request.app.state.server.services.lorax


@router.post("/generate", response_model=LoraxResponse)
async def generate(body: LoraxRequest, request: Request) -> LoraxResponse:
    return await _service(request).generate(request, body)


@router.post("/generate_stream", responses=SSE)
async def generate_stream(body: LoraxRequest, request: Request) -> StreamingResponse:
    events = await _service(request).stream(request, body)
    return StreamingResponse(events, media_type="text/event-stream")


@router.post("/", response_model=list[LoraxResponse], responses=SSE)
async def root(body: LoraxRequest, request: Request):  # type: ignore[no-untyped-def]
    """Where the LoRAX Python client posts: a JSON array, or SSE when `stream` is set."""
    service = _service(request)
    if body.stream:
        events = await service.stream(request, body)
        return StreamingResponse(events, media_type="text/event-stream")
    return [await service.generate(request, body)]
