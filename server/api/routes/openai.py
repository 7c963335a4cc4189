"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.auth import has_admin_rights, require_api_key
from server.api.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.api.state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])
SSE = {200: {"content": {"text/event-stream": {}}}}


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post("/v1/completions", response_model=CompletionResponse, responses=SSE)
async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    result = await _state(request).services.completions.completions(request, body)
    if isinstance(result, CompletionResponse):
        return result
    return StreamingResponse(result, media_type="text/event-stream")


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    result = await _state(request).services.chat.chat(request, body)
    if isinstance(result, ChatCompletionResponse):
        return result
    return StreamingResponse(result, media_type="text/event-stream")


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    state = _state(request)
    facts = state.async_engine.facts
    created = int(state.started)
    # vLLM's root is the model's path: a server path, so for admin rights only.
    root = facts.model_path if has_admin_rights(request) else state.model_name
    cards = [
        ModelCard(
            id=state.model_name,
            created=created,
            root=root,
            max_model_len=facts.max_model_len,
        )
    ]
    for reg in state.adapters.list():
        cards.append(
            ModelCard(
                id=reg.name,
                created=int(reg.record.created_at),
                root=reg.name,
                parent=state.model_name,
                max_model_len=facts.max_model_len,
            )
        )
    return ModelList(data=cards)
