"""OpenAI Responses API: a request becomes a chat request (same templates, tool parsing and
grammars, through the chat service's own start and output path), and its output becomes
Responses output items, whole or as the Responses event stream.

Nothing is stored: `store` is accepted and the response says `store: false`, and
`previous_response_id` is refused with a 400, so a client sends the whole conversation (its
earlier output items, function_call and function_call_output items included) in `input`. A
store would keep tenants' conversations in server memory, and one replica's would not be
another's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from itertools import count
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from server.api.errors import APIError, BadRequest, translate
from server.api.outputs import collect
from server.api.responses_input import (
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
)
from server.api.schemas.openai import ChatCompletionRequest
from server.api.schemas.responses import (
    FunctionCall,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    TextConfig,
)
from server.api.serving_chat import ChatRun, ChatService
from server.api.tools import ToolCall as ParsedCall
from server.engine.errors import InvalidRequestError
from server.engine.outputs import RequestOutput

# Chat's field names in errors, as a Responses client knows them.
_FIELDS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesService:
    """POST /v1/responses over the chat service."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(
        self, raw: Request, req: ResponsesRequest
    ) -> ResponseObject | AsyncIterator[str]:
        _refuse_unsupported(req)
        try:
            run = await self.chat.start(raw, _chat_request(req))
        except (APIError, InvalidRequestError) as exc:  # both name the field at fault
            exc.param = _FIELDS.get(exc.param or "", exc.param)
            raise
        base = _response(req)
        if req.stream:
            return self._events(run, base)
        [result] = await collect(run.stream, 1)
        content, calls = self.chat.parse(run, result.output)
        items: list[OutputItem] = []
        if content or not calls:
            items.append(_message(_id("msg"), content or "", "completed"))
        items += [_function_call(_id("fc"), c, "completed") for c in calls]
        return _finished(base, items, result.output)

    async def _events(self, run: ChatRun, base: ResponseObject) -> AsyncIterator[str]:
        """The Responses event stream, numbered from 0, as the openai SDK accumulates it."""
        numbers = count()

        def event(kind: str, **fields: Any) -> str:
            body = {"type": kind, "sequence_number": next(numbers), **fields}
            return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

        def dump(item: OutputItem | OutputText) -> dict[str, Any]:
            return item.model_dump()

        yield event("response.created", response=base.model_dump(by_alias=True))
        yield event("response.in_progress", response=base.model_dump(by_alias=True))
        message_id, text, opened = _id("msg"), "", False
        located = {"item_id": message_id, "output_index": 0, "content_index": 0}

        def open_message() -> Iterator[str]:
            empty = _message(message_id, "", "in_progress")
            yield event("response.output_item.added", output_index=0, item=dump(empty))
            yield event("response.content_part.added", **located, part=dump(OutputText(text="")))

        items: list[OutputItem] = []
        try:
            final: RequestOutput | None = None
            calls: list[ParsedCall] = []
            async for delta in self.chat.deltas(run):
                if delta.text:
                    if not opened:
                        opened = True
                        for e in open_message():
                            yield e
                    text += delta.text
                    yield event(
                        "response.output_text.delta", **located, delta=delta.text, logprobs=[]
                    )
                if delta.output.finished:
                    final, calls = delta.output, delta.calls
            assert final is not None
            if opened or not calls:
                if not opened:
                    for e in open_message():
                        yield e
                part = OutputText(text=text)
                yield event("response.output_text.done", **located, text=text, logprobs=[])
                yield event("response.content_part.done", **located, part=dump(part))
                message = _message(message_id, text, _status(final))
                yield event("response.output_item.done", output_index=0, item=dump(message))
                items.append(message)
            for call in calls:
                index, item_id = len(items), _id("fc")
                added = _function_call(item_id, call, "in_progress", arguments="")
                yield event("response.output_item.added", output_index=index, item=dump(added))
                where = {"item_id": item_id, "output_index": index}
                yield event("response.function_call_arguments.delta", **where, delta=call.arguments)
                yield event(
                    "response.function_call_arguments.done",
                    **where,
                    name=call.name,
                    arguments=call.arguments,
                )
                done = _function_call(item_id, call, "completed")
                yield event("response.output_item.done", output_index=index, item=dump(done))
                items.append(done)
            response = _finished(base, items, final)
            kind = "response.completed" if response.status == "completed" else "response.incomplete"
            yield event(kind, response=response.model_dump(by_alias=True))
        except Exception as exc:
            err = translate(exc)
            yield event("error", code=err.code, message=err.message, param=err.param)
            failed = base.model_copy(
                update={
                    "status": "failed",
                    "output": items,
                    "error": ResponseError(code=err.code or err.type, message=err.message),
                }
            )
            yield event("response.failed", response=failed.model_dump(by_alias=True))


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise BadRequest(
            "previous_response_id is not supported: this server stores no responses; send the "
            "whole conversation in input (earlier output items, function_call and "
            "function_call_output items included)",
            "previous_response_id",
        )
    if req.conversation is not None:
        raise BadRequest(
            "conversation is not supported: this server stores no conversations; send the "
            "whole conversation in input",
            "conversation",
        )
    if req.background:
        raise BadRequest("background responses are not supported", "background")


def _chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The same request in chat completion terms."""
    try:
        return ChatCompletionRequest(
            model=req.model,
            messages=chat_messages(req),
            max_completion_tokens=req.max_output_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            tools=chat_tools(req.tools),
            tool_choice=chat_tool_choice(req.tool_choice),
            parallel_tool_calls=req.parallel_tool_calls,
            response_format=chat_response_format(req),
            stream=req.stream,
            seed=req.seed,
            user=req.user,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadRequest(f"input: {first.get('msg', 'invalid')}", "input") from None


def _response(req: ResponsesRequest) -> ResponseObject:
    """The response as it starts: its settings, no output yet."""
    return ResponseObject(
        id=_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        model=req.model,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        text=req.text or TextConfig(),
        tools=req.tools or [],
        tool_choice=req.tool_choice or ("auto" if req.tools else "none"),
        parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        metadata=req.metadata or {},
        user=req.user,
    )


def _status(out: RequestOutput) -> str:
    return "incomplete" if out.finish_reason == "length" else "completed"


def _message(item_id: str, text: str, status: str) -> OutputMessage:
    content = [] if status == "in_progress" else [OutputText(text=text)]
    return OutputMessage(id=item_id, status=status, content=content)  # type: ignore[arg-type]


def _function_call(
    item_id: str, call: ParsedCall, status: str, arguments: str | None = None
) -> FunctionCall:
    return FunctionCall(
        id=item_id,
        call_id=call.id,
        name=call.name,
        arguments=call.arguments if arguments is None else arguments,
        status=status,  # type: ignore[arg-type]
    )


def _finished(base: ResponseObject, items: list[OutputItem], out: RequestOutput) -> ResponseObject:
    """The finished response: its items, status and usage."""
    status = _status(out)
    prompt, generated = out.num_prompt_tokens, out.num_output_tokens
    return base.model_copy(
        update={
            "status": status,
            "output": items,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            "usage": ResponseUsage(
                input_tokens=prompt,
                input_tokens_details=InputTokensDetails(cached_tokens=out.num_cached_tokens),
                output_tokens=generated,
                total_tokens=prompt + generated,
            ),
        }
    )
