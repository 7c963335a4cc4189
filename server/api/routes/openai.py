"""OpenAI-compatible inference: /v1/completions, /v1/chat/completions, /v1/responses,
/v1/models (and one model by id)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from adapters import RegisteredAdapter
from server.api.auth import has_admin_rights, require_api_key
from server.api.errors import NotFound
from server.api.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.api.schemas.responses import ResponseObject, ResponsesRequest
from server.api.state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])
SSE = {200: {"content": {"text/event-stream": {}}}}


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _reply(result: BaseModel | AsyncIterator[str]) -> BaseModel | StreamingResponse:
    """A whole reply as it is; a stream's server-sent events as a streaming response."""
    if isinstance(result, BaseModel):
        return result
    return StreamingResponse(result, media_type="text/event-stream")


@router.post("/v1/completions", response_model=CompletionResponse, responses=SSE)
async def completions(body: CompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return _reply(await _state(request).services.completions.completions(request, body))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=SSE)
async def chat_completions(body: ChatCompletionRequest, request: Request):  # type: ignore[no-untyped-def]
    return _reply(await _state(request).services.chat.chat(request, body))


@router.post("/v1/responses", response_model=ResponseObject, responses=SSE)
async def responses(body: ResponsesRequest, request: Request):  # type: ignore[no-untyped-def]
    return _reply(await _state(request).services.responses.create(request, body))


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    state = _state(request)
    cards = [_base_card(request, state)]
    cards += [_adapter_card(state, reg) for reg in state.adapters.list()]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, request: Request) -> ModelCard:
    """One model as the list shows it: the base, an adapter, a fine-tuned model or checkpoint."""
    state = _state(request)
    if model_id == state.model_name:
        return _base_card(request, state)
    reg = state.adapters.get(model_id)  # None for a merge's internal name, too
    if reg is None:
        raise NotFound(f"the model {model_id!r} does not exist", "model")
    return _adapter_card(state, reg)


def _base_card(request: Request, state: ServerState) -> ModelCard:
    facts = state.async_engine.facts
    # vLLM's root is the model's path: a server path, so for admin rights only.
    root = facts.model_path if has_admin_rights(request) else state.model_name
    return ModelCard(
        id=state.model_name,
        created=int(state.started),
        root=root,
        max_model_len=facts.max_model_len,
    )


def _adapter_card(state: ServerState, reg: RegisteredAdapter) -> ModelCard:
    return ModelCard(
        id=reg.name,
        created=int(reg.record.created_at),
        root=reg.name,
        parent=state.model_name,
        max_model_len=state.async_engine.facts.max_model_len,
    )
