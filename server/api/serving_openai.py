"""OpenAI completions and chat: request -> engine requests -> response or SSE chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from server.api.errors import APIError, BadRequest, translate
from server.api.prompts import PromptEncoder, check_token_ids
from server.api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingFields,
    TopLogprob,
    Usage,
)
from server.api.state import ServerState
from server.engine.llm_engine import Prompt
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import TokenLogprob
from server.model.tokenizer import Tokenizer


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def sse_error(exc: Exception) -> str:
    err = translate(exc)
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }
    return sse(json.dumps(body))


def _refuse_unsupported(req: SamplingFields) -> None:
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported", "logit_bias")


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, seed_offset: int):
    """The engine's SamplingParams for one of a request's n samples."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k or 0,
        seed=None if req.seed is None else (req.seed + seed_offset) % 2**63,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )


def _token_text(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


class CompletionService:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.tok = state.llm.tokenizer
        self.prompts = PromptEncoder(state.llm)

    def _check_stop_token_ids(self, req: SamplingFields) -> None:
        if req.stop_token_ids:
            check_token_ids(req.stop_token_ids, self.prompts.vocab_size, "stop_token_ids")

    # ---- completions ----------------------------------------------------------------------

    async def _completion_prompts(
        self, req: CompletionRequest
    ) -> tuple[list[Prompt], list[list[int]]]:
        """The prompts as sent (for echo) and as token ids, each tokenized once for all n."""
        p = req.prompt
        prompts: list[Prompt]
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise BadRequest("prompt is empty", "prompt")
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        self.state.check_serving(len(prompts) * req.n)  # before any tokenizing
        ids = [
            await self.prompts.encode(x, "prompt")
            if isinstance(x, str)
            else self.prompts.check_ids(x, "prompt")
            for x in prompts
        ]
        return prompts, ids

    async def completions(
        self, raw: Request, req: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        _refuse_unsupported(req)
        if req.suffix is not None:
            raise BadRequest("suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequest("best_of must equal n (or be omitted)", "best_of")
        if req.echo and req.logprobs is not None:
            raise BadRequest("echo with logprobs is not supported", "echo")
        self._check_stop_token_ids(req)
        adapter = self.state.resolve_model(req.model)
        params = [sampling_params(req, req.max_tokens or 16, req.logprobs, j) for j in range(req.n)]
        prompts, prompt_ids = await self._completion_prompts(req)
        flat = [p for p in prompts for _ in range(req.n)]
        flat_ids = [ids for ids in prompt_ids for _ in range(req.n)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self.state.generate(raw, flat_ids, params * len(prompts), adapter)
        if req.stream:
            return self._stream_completions(req, rid, created, flat, stream)
        finals: dict[int, RequestOutput] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(flat))}
        async for i, out in stream:
            logprobs[i].extend(out.logprobs)
            if out.finished:
                finals[i] = out
        choices = []
        for i in range(len(flat)):
            out = finals[i]
            text = self._echo(flat[i]) + out.text if req.echo else out.text
            lp = self._completion_logprobs(logprobs[i], 0) if req.logprobs is not None else None
            choices.append(
                CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=out.finish_reason)
            )
        return CompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=self._usage(finals.values(), req.n),
        )

    def _echo(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.tok.decode(prompt)

    def _usage(self, finals, n: int) -> Usage:  # type: ignore[no-untyped-def]
        outs = list(finals)
        prompt = sum(o.num_prompt_tokens for o in outs) // max(n, 1)
        completion = sum(o.num_output_tokens for o in outs)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = _token_text(self.tok, lp.token_id)
            tokens.append(text)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[self._top_by_text(lp) for lp in lps],
            text_offset=offsets,
        )

    def _top_by_text(self, lp: TokenLogprob) -> dict[str, float]:
        # Tokens that decode alone to the same text (partial UTF-8 bytes all read as U+FFFD)
        # share a key; keep the likeliest, which comes first.
        top: dict[str, float] = {}
        for token_id, logprob in lp.top:
            top.setdefault(_token_text(self.tok, token_id), logprob)
        return top

    async def _stream_completions(self, req, rid, created, prompts, stream) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
        finals: list[RequestOutput] = []
        offsets = [0] * len(prompts)
        try:
            if req.echo:
                for i, p in enumerate(prompts):
                    yield self._completion_chunk(req, rid, created, i, self._echo(p), None, None)
            async for i, out in stream:
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs(out.logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lp.tokens)
                if out.new_text or out.finished or lp is not None:
                    yield self._completion_chunk(
                        req, rid, created, i, out.new_text, lp, out.finish_reason
                    )
                if out.finished:
                    finals.append(out)
            if req.stream_options and req.stream_options.include_usage:
                usage = self._usage(finals, req.n)
                body = CompletionResponse(
                    id=rid, created=created, model=req.model, choices=[], usage=usage
                )
                yield sse(body.model_dump_json())
        except (APIError, Exception) as exc:
            yield sse_error(exc)
        yield sse("[DONE]")

    @staticmethod
    def _completion_chunk(req, rid, created, index, text, lp, finish) -> str:  # type: ignore[no-untyped-def]
        choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)
        body = CompletionResponse(id=rid, created=created, model=req.model, choices=[choice])
        return sse(body.model_dump_json(exclude={"usage"}))

    # ---- chat -----------------------------------------------------------------------------

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.tools:
            raise BadRequest("tools are not supported", "tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise BadRequest("only response_format type 'text' is supported", "response_format")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": m.role, "content": content or ""})
        return await self.prompts.encode_chat(messages, req.add_generation_prompt)

    async def chat(
        self, raw: Request, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        _refuse_unsupported(req)
        self._check_stop_token_ids(req)
        adapter = self.state.resolve_model(req.model)
        self.state.check_serving(req.n)  # before any tokenizing
        prompt = await self._chat_prompt(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.state.llm.max_model_len - len(prompt))
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = [sampling_params(req, max_tokens, top, j) for j in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self.state.generate(raw, [prompt] * req.n, params, adapter)
        if req.stream:
            return self._stream_chat(req, rid, created, stream)
        finals: dict[int, RequestOutput] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(req.n)}
        async for i, out in stream:
            logprobs[i].extend(out.logprobs)
            if out.finished:
                finals[i] = out
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=finals[i].text),
                logprobs=self._chat_logprobs(logprobs[i]) if req.logprobs else None,
                finish_reason=finals[i].finish_reason,
            )
            for i in range(req.n)
        ]
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=self._usage(finals.values(), req.n),
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(self.tok, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in lps:
            top = self._top(lp.token_id, lp.logprob)
            content.append(
                ChatTokenLogprob(
                    **top.model_dump(), top_logprobs=[self._top(t, v) for t, v in lp.top]
                )
            )
        return ChatLogprobs(content=content)

    async def _stream_chat(self, req, rid, created, stream) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
        def chunk(choice: ChatChunkChoice) -> str:
            body = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice])
            return sse(body.model_dump_json(exclude={"usage"}))

        finals: list[RequestOutput] = []
        try:
            for i in range(req.n):
                yield chunk(
                    ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                )
            async for i, out in stream:
                lp = self._chat_logprobs(out.logprobs) if req.logprobs else None
                if out.new_text or out.finished or lp is not None:
                    delta = DeltaMessage(content=out.new_text or None)
                    yield chunk(
                        ChatChunkChoice(
                            index=i, delta=delta, logprobs=lp, finish_reason=out.finish_reason
                        )
                    )
                if out.finished:
                    finals.append(out)
            if req.stream_options and req.stream_options.include_usage:
                body = ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=req.model,
                    choices=[],
                    usage=self._usage(finals, req.n),
                )
                yield sse(body.model_dump_json())
        except (APIError, Exception) as exc:
            yield sse_error(exc)
        yield sse("[DONE]")
