"""OpenAI completions: request -> engine requests -> response or SSE chunks; and what the
completion and chat services share (sampling params, logits options, the engine stream)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from server.api.clients import EngineClient, ModelResolver, ServedModel
from server.api.errors import BadRequest
from server.api.outputs import (
    Finished,
    LogprobFormatter,
    best_of,
    collect,
    sse,
    sse_error,
    usage,
)
from server.api.prompts import PromptEncoder, check_token_ids
from server.api.schemas.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
)
from server.api.structured import compile_grammar, logit_bias, openai_grammar
from server.engine.grammar import Grammar
from server.engine.llm_engine import Prompt
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

__all__ = ["CompletionService", "OpenAIService", "sse"]


class OpenAIService:
    """The parts of a completion or chat request that do not depend on which it is."""

    def __init__(self, engine: EngineClient, models: ModelResolver, model: ServedModel) -> None:
        self.engine = engine
        self.models = models
        self.model = model
        self.tok = model.tokenizer
        self.prompts = PromptEncoder(model)
        self.logprobs = LogprobFormatter(self.tok)

    def check_request(self, req: SamplingFields) -> None:
        """Field checks that need no tokenizer and no engine."""
        if req.stop_token_ids:
            check_token_ids(req.stop_token_ids, self.prompts.vocab_size, "stop_token_ids")
        if req.stream_options is not None and not req.stream:
            raise BadRequest("stream_options is only allowed when stream is true", "stream_options")

    async def adapter(self, req: SamplingFields) -> str | None:
        """The adapter serving the request: the one `model` names, or a merge of
        merged_adapters (then `model` names the base)."""
        adapter = self.models.resolve_model(req.model)
        if req.merged_adapters is None:
            return adapter
        if adapter is not None:
            raise BadRequest(
                f"with merged_adapters, model must name the base model {self.models.model_name!r}"
                f", not the adapter {req.model!r}",
                "model",
            )
        self.engine.check_serving()  # a full queue refuses before any merge work
        return await self.models.resolve_merged(req.merged_adapters, "merged_adapters")

    async def compile(self, grammar: Grammar | None) -> Grammar | None:
        return await compile_grammar(self.model.grammars, grammar)

    def params(
        self,
        req: SamplingFields,
        count: int,
        max_tokens: int,
        logprobs: int | None,
        grammar: Grammar | None,
        skip_special_tokens: bool | None = None,
    ) -> list[SamplingParams]:
        """The engine's SamplingParams for each of a prompt's `count` samples."""
        bias = logit_bias(req.logit_bias)
        # The model's generation_config.json values stand in for the fields left out.
        defaults = self.model.generation_defaults
        sent = req.model_fields_set
        temperature = req.temperature if "temperature" in sent else defaults.temperature
        top_p = req.top_p if "top_p" in sent else defaults.top_p
        top_k = req.top_k if "top_k" in sent else defaults.top_k
        penalty = req.repetition_penalty if "repetition_penalty" in sent else None
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature if temperature is None else temperature,
                top_p=req.top_p if top_p is None else top_p,
                top_k=top_k or 0,
                seed=None if req.seed is None else (req.seed + j) % 2**63,
                repetition_penalty=penalty or defaults.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=(
                    req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
                ),
                logit_bias=bias,
                min_tokens=req.min_tokens,
                grammar=grammar,
            )
            for j in range(count)
        ]


class CompletionService(OpenAIService):
    async def _prompts(self, req: CompletionRequest, samples: int) -> tuple[list[Prompt], list]:
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
        self.engine.check_serving(len(prompts) * samples)  # before any tokenizing
        ids = [
            await self.prompts.encode(x, "prompt")
            if isinstance(x, str)
            else self.prompts.check_ids(x, "prompt")
            for x in prompts
        ]
        return prompts, ids

    def _samples(self, req: CompletionRequest) -> int:
        """How many samples each prompt runs: best_of when it asks for more than n."""
        best = req.best_of or req.n
        if best < req.n:
            raise BadRequest(f"best_of ({best}) must be >= n ({req.n})", "best_of")
        if best > req.n and req.stream:
            raise BadRequest("best_of > n cannot be streamed", "best_of")
        if best > req.n and req.temperature == 0:
            raise BadRequest("best_of > n needs sampling (temperature > 0)", "best_of")
        return best

    async def completions(
        self, raw: Request, req: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        if req.suffix is not None:
            raise BadRequest("suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise BadRequest("echo with logprobs is not supported", "echo")
        self.check_request(req)
        samples = self._samples(req)
        adapter = await self.adapter(req)
        grammar = openai_grammar(req.response_format, req.guided_regex, req.guided_choice)
        # best_of ranks samples by their logprobs: the engine reports the sampled token's.
        engine_logprobs = 0 if samples > req.n and req.logprobs is None else req.logprobs
        prompts, prompt_ids = await self._prompts(req, samples)
        grammar = await self.compile(grammar)
        max_tokens = req.max_tokens or 16
        if "max_tokens" not in req.model_fields_set:
            max_tokens = self.model.generation_defaults.max_tokens or max_tokens
        params = self.params(req, samples, max_tokens, engine_logprobs, grammar)
        flat = [p for p in prompts for _ in range(samples)]
        flat_ids = [ids for ids in prompt_ids for _ in range(samples)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        stream = self.engine.generate(raw, flat_ids, params * len(prompts), adapter)
        if req.stream:
            return self._stream(req, rid, created, flat, stream)
        results = await collect(stream, len(flat))
        kept = best_of(results, samples, req.n) if samples > req.n else results
        choices = [self._choice(req, i, r, prompts[i // req.n]) for i, r in enumerate(kept)]
        return CompletionResponse(
            id=rid,
            created=created,
            model=req.model,
            choices=choices,
            usage=usage((r.output for r in results), samples),
        )

    def _choice(
        self, req: CompletionRequest, index: int, result: Finished, prompt: Prompt
    ) -> CompletionChoice:
        out = result.output
        text = self._echo(prompt) + out.text if req.echo else out.text
        lp = self.logprobs.completion(result.logprobs, 0) if req.logprobs is not None else None
        return CompletionChoice(
            index=index, text=text, logprobs=lp, finish_reason=out.finish_reason
        )

    def _echo(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.tok.decode(prompt)

    async def _stream(self, req, rid, created, prompts, stream) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, text: str, lp, finish: str | None) -> str:  # type: ignore[no-untyped-def]
            choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish)
            body = CompletionResponse(id=rid, created=created, model=req.model, choices=[choice])
            # With include_usage every chunk carries "usage": null, and the last one the totals.
            return sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        finals: list[RequestOutput] = []
        offsets = [0] * len(prompts)
        try:
            if req.echo:
                for i, p in enumerate(prompts):
                    yield chunk(i, self._echo(p), None, None)
            async for i, out in stream:
                lp = None
                if req.logprobs is not None:
                    lp = self.logprobs.completion(out.logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lp.tokens)
                if out.new_text or out.finished or lp is not None:
                    yield chunk(i, out.new_text, lp, out.finish_reason)
                if out.finished:
                    finals.append(out)
            if include_usage:
                body = CompletionResponse(
                    id=rid, created=created, model=req.model, choices=[], usage=usage(finals, req.n)
                )
                yield sse(body.model_dump_json())
        except Exception as exc:  # an API error or any other: one SSE error event
            yield sse_error(exc)
        yield sse("[DONE]")
