"""OpenAI chat completions: messages (and tools) through the chat template -> engine requests
-> a message with content or tool calls, whole or as SSE deltas."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from adapters.chat_template import RENDER_SECONDS
from server.api.errors import BadRequest
from server.api.outputs import Finished, collect, sse, sse_error, usage
from server.api.prompts import off_loop
from server.api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from server.api.serving_openai import OpenAIService
from server.api.structured import openai_grammar
from server.api.tools import (
    Family,
    ToolRequest,
    ToolStream,
    history_message,
    parse_tool_calls,
    parse_tool_request,
    template_family,
)
from server.api.tools import ToolCall as ParsedCall
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.model.tokenizer import TemplateTooSlowError, Tokenizer


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]


def _delta_tool_calls(calls: list[ParsedCall]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=k,
            id=c.id,
            type="function",
            function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
        )
        for k, c in enumerate(calls)
    ]


def stop_at_template_eos(tok: Tokenizer, params: list[SamplingParams]) -> None:
    """An adapter's template may end turns with another token than the base's eos (say
    ChatML's <|im_end|> on a Llama base): generation stops there too."""
    eos = tok.eos_token_id_of_template
    if eos is None or eos in tok.eos_token_ids:
        return
    for p in params:
        if not p.ignore_eos and eos not in p.stop_token_ids:
            p.stop_token_ids = [*p.stop_token_ids, eos]


class ChatService(OpenAIService):
    def _messages(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            message: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            messages.append(history_message(message))
        return messages

    def _calls(
        self, family: Family, tools: ToolRequest, out: RequestOutput
    ) -> tuple[str | None, list[ParsedCall]]:
        """The message content and tool calls in a finished output."""
        calls = tools.calls_from_constrained(out.text) if tools.constrained else []
        if calls:
            return None, calls
        if tools.parses_free_text:
            content, calls = parse_tool_calls(family, out.text, tools.tools)
            return content, calls if tools.parallel else calls[:1]
        return out.text, []

    async def chat(
        self, raw: Request, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_request(req)
        tools = parse_tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)
        grammar = openai_grammar(req.response_format, req.guided_regex, req.guided_choice)
        if tools.constrained:
            if grammar is not None:
                raise BadRequest(
                    "tool_choice 'required' or a named function cannot be combined with "
                    "response_format or guided decoding",
                    "tool_choice",
                )
            grammar = tools.grammar()
        adapter = await self.adapter(req)
        self.engine.check_serving(req.n)  # before any tokenizing
        template_tools = req.tools if tools.tools and tools.choice != "none" else None
        templates = self.models.templates
        reg = None if adapter is None else self.models.adapter(adapter)
        tok, version = await off_loop(templates.for_adapter, reg)
        own_template = tok is not self.tok and version is not None
        if own_template and templates.is_refused(version):
            raise BadRequest(
                f"adapter {adapter!r}'s chat template ran for more than {RENDER_SECONDS:g} s on "
                "an earlier request; its chats are refused until the adapter is reloaded",
                "model",
            )
        family = template_family(tok.chat_template)
        try:
            prompt = await self.prompts.encode_chat(
                self._messages(req), req.add_generation_prompt, template_tools, tok
            )
        except BadRequest as exc:
            if own_template and isinstance(exc.__cause__, TemplateTooSlowError):
                assert version is not None
                templates.refuse(version)
            raise
        grammar = await self.compile(grammar)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.model.max_model_len - len(prompt))
            max_tokens = min(max_tokens, self.model.generation_defaults.max_tokens or max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        # Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are special tokens: keep their text.
        template = tok.chat_template or ""
        keep_special = tools.parses_free_text and any(
            marker in template for marker in ("[TOOL_CALLS]", "<|python_tag|>")
        )
        params = self.params(req, req.n, max_tokens, top, grammar, False if keep_special else None)
        stop_at_template_eos(tok, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self.engine.generate(raw, [prompt] * req.n, params, adapter, version)
        if req.stream:
            return self._stream(req, family, tools, rid, created, stream)
        results = await collect(stream, req.n)
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=[self._choice(req, family, tools, i, r) for i, r in enumerate(results)],
            usage=usage((r.output for r in results), req.n),
        )

    def _choice(
        self,
        req: ChatCompletionRequest,
        family: Family,
        tools: ToolRequest,
        index: int,
        result: Finished,
    ) -> ChatChoice:
        out = result.output
        content, calls = self._calls(family, tools, out)
        return ChatChoice(
            index=index,
            message=AssistantMessage(content=content, tool_calls=_tool_calls(calls) or None),
            logprobs=self.logprobs.chat(result.logprobs) if req.logprobs else None,
            finish_reason="tool_calls" if calls else out.finish_reason,
        )

    async def _stream(self, req, family, tools, rid, created, stream) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice])
            # With include_usage every chunk carries "usage": null, and the last one the totals.
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        # Tool-call text is held back until the output ends, then sent as tool_calls deltas.
        held = [ToolStream(family, tools) for _ in range(req.n)]
        finals: list[RequestOutput] = []
        try:
            for i in range(req.n):
                yield chunk(
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                )
            async for i, out in stream:
                lp = self.logprobs.chat(out.logprobs) if req.logprobs else None
                text = held[i].feed(out.new_text)
                finish = out.finish_reason
                calls: list[ParsedCall] = []
                if out.finished:
                    rest, calls = held[i].finish(out.finish_reason)
                    text += rest
                    finish = "tool_calls" if calls else finish
                    finals.append(out)
                if calls:  # any text first, then the calls with the finish reason
                    if text or lp is not None:
                        delta = DeltaMessage(content=text or None)
                        yield chunk(ChatChunkChoice(index=i, delta=delta, logprobs=lp))
                    delta = DeltaMessage(tool_calls=_delta_tool_calls(calls))
                    yield chunk(ChatChunkChoice(index=i, delta=delta, finish_reason=finish))
                elif text or out.finished or lp is not None:
                    delta = DeltaMessage(content=text or None)
                    yield chunk(
                        ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)
                    )
            if include_usage:
                body = ChatCompletionChunk(
                    id=rid, created=created, model=req.model, choices=[], usage=usage(finals, req.n)
                )
                yield sse(body.model_dump_json())
        except Exception as exc:  # an API error or any other: one SSE error event
            yield sse_error(exc)
        yield sse("[DONE]")
