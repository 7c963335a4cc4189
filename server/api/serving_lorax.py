"""LoRAX/TGI generate: one prompt, one adapter, text plus optional token details."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request

from server.api.clients import EngineClient, ModelResolver, ServedModel
from server.api.errors import BadRequest, error_body, translate
from server.api.outputs import Finished, collect
from server.api.prompts import PromptEncoder, off_loop
from server.api.schemas.lorax import (
    LoraxBestOfSequence,
    LoraxDetails,
    LoraxParameters,
    LoraxRequest,
    LoraxResponse,
    LoraxStreamDetails,
    LoraxStreamResponse,
    LoraxToken,
)
from server.api.schemas.openai import MAX_N
from server.api.serving_openai import sse
from server.api.structured import compile_grammar, lorax_grammar
from server.engine.grammar import Grammar
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

_UNSUPPORTED = (
    "adapter_parameters",
    "return_k_alternatives",
    "typical_p",
)


def _params(p: LoraxParameters, details: bool, grammar: Grammar | None) -> SamplingParams:
    for name in _UNSUPPORTED:
        if getattr(p, name) is not None:
            raise BadRequest(f"parameters.{name} is not supported", f"parameters.{name}")
    if p.watermark:
        raise BadRequest("parameters.watermark is not supported", "parameters.watermark")
    # LoRAX/TGI semantics: a warper (temperature other than 1, top_k, top_p below 1) samples
    # even without do_sample; with neither, the choice is greedy.
    warped = (
        p.temperature not in (None, 1.0) or bool(p.top_k) or (p.top_p is not None and p.top_p < 1)
    )
    return SamplingParams(
        max_tokens=p.max_new_tokens or 20,
        temperature=(p.temperature or 1.0) if p.do_sample or warped else 0.0,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty or 1.0,
        stop=p.stop or [],
        ignore_eos=p.ignore_eos_token,
        logprobs=0 if details or (p.best_of or 1) > 1 else None,
        grammar=grammar,
    )


def _best_of(p: LoraxParameters, stream: bool) -> int:
    best = p.best_of or 1
    if best > 1 and stream:
        raise BadRequest("parameters.best_of > 1 cannot be streamed", "parameters.best_of")
    if best > MAX_N:
        raise BadRequest(f"parameters.best_of must be at most {MAX_N}", "parameters.best_of")
    return best


def _sample_seed(seed: int | None, j: int) -> int | None:
    """The seed best_of's j-th sample draws from."""
    return None if seed is None else (seed + j) % 2**63


def finish_reason(out: RequestOutput) -> str:
    if out.finish_reason == "length":
        return "length"
    if isinstance(out.stop_reason, str):
        return "stop_sequence"
    return "eos_token"


class LoraxService:
    def __init__(self, engine: EngineClient, models: ModelResolver, model: ServedModel) -> None:
        self.engine = engine
        self.models = models
        self.model = model
        self.tok = model.tokenizer
        self.prompts = PromptEncoder(model)

    def _token(self, token_id: int, logprob: float | None) -> LoraxToken:
        return LoraxToken(
            id=token_id,
            text=self.tok.decode([token_id], skip_special_tokens=False),
            logprob=logprob,
            special=token_id in self.tok.special_token_ids,
        )

    async def _adapter(self, p: LoraxParameters) -> str | None:
        """The adapter serving the request: adapter_id's, or a merge of merged_adapters."""
        if p.merged_adapters is None:
            return self.models.resolve_model(p.adapter_id)
        if p.adapter_id is not None:
            raise BadRequest(
                "parameters.adapter_id and parameters.merged_adapters cannot both be set",
                "parameters.merged_adapters",
            )
        self.engine.check_serving()  # a full queue refuses before any merge work
        return await self.models.resolve_merged(p.merged_adapters, "parameters.merged_adapters")

    async def _start(self, raw: Request, req: LoraxRequest, details: bool, stream: bool):  # type: ignore[no-untyped-def]
        p = req.parameters
        best = _best_of(p, stream)
        grammar = lorax_grammar(p.response_format)
        params = _params(p, details, grammar)
        if best > 1 and params.greedy:
            raise BadRequest(
                "parameters.best_of > 1 needs sampling (do_sample)", "parameters.best_of"
            )
        adapter = await self._adapter(p)
        self.engine.check_serving(best)  # before any tokenizing
        if p.truncate is not None:  # TGI keeps the last `truncate` tokens
            prompt = await self.prompts.encode_truncated(req.inputs, p.truncate, "inputs")
        else:
            prompt = await self.prompts.encode(req.inputs, "inputs")
        if not prompt:
            raise BadRequest("inputs is empty", "inputs")
        grammar = await compile_grammar(self.model.grammars, grammar)
        # Each of best_of samples draws from its own seed (seed, seed + 1, ...).
        samples = [
            replace(params, grammar=grammar, seed=_sample_seed(p.seed, j)) for j in range(best)
        ]
        return prompt, self.engine.generate(raw, [prompt] * best, samples, adapter)

    async def generate(self, raw: Request, req: LoraxRequest) -> LoraxResponse:
        p = req.parameters
        prompt, stream = await self._start(raw, req, p.details, False)
        results = await collect(stream, p.best_of or 1)
        chosen = max(range(len(results)), key=lambda j: results[j].cumulative_logprob)
        final = results[chosen].output
        text = self._text(req, results[chosen])
        if not p.details:
            return LoraxResponse(generated_text=text)
        prefill: list[LoraxToken] = []
        if p.decoder_input_details:  # a decode per prompt token: long for a long prompt
            prefill = await off_loop(lambda: [self._token(t, None) for t in prompt])
        others = None
        if len(results) > 1:  # TGI's best_of_sequences: every candidate not chosen
            others = [
                LoraxBestOfSequence(
                    generated_text=self._text(req, r),
                    finish_reason=finish_reason(r.output),
                    generated_tokens=r.output.num_output_tokens,
                    seed=_sample_seed(p.seed, j),
                    prefill=prefill,
                    tokens=self._tokens(r),
                )
                for j, r in enumerate(results)
                if j != chosen
            ]
        return LoraxResponse(
            generated_text=text,
            details=LoraxDetails(
                finish_reason=finish_reason(final),
                prompt_tokens=final.num_prompt_tokens,
                generated_tokens=final.num_output_tokens,
                seed=_sample_seed(p.seed, chosen),
                prefill=prefill,
                tokens=self._tokens(results[chosen]),
                best_of_sequences=others,
            ),
        )

    def _text(self, req: LoraxRequest, result: Finished) -> str:
        text = result.output.text
        return (req.inputs + text) if req.parameters.return_full_text else text

    def _tokens(self, result: Finished) -> list[LoraxToken]:
        return [self._token(lp.token_id, lp.logprob) for lp in result.logprobs]

    async def stream(self, raw: Request, req: LoraxRequest) -> AsyncIterator[str]:
        """The SSE events; a request that is refused raises here, before the stream starts."""
        p = req.parameters
        _, stream = await self._start(raw, req, True, True)

        async def events() -> AsyncIterator[str]:
            try:
                async for _, out in stream:
                    for k, lp in enumerate(out.logprobs):
                        last = out.finished and k == len(out.logprobs) - 1
                        event = LoraxStreamResponse(token=self._token(lp.token_id, lp.logprob))
                        if last:
                            event.generated_text = (
                                (req.inputs + out.text) if p.return_full_text else out.text
                            )
                            event.details = LoraxStreamDetails(
                                finish_reason=finish_reason(out),
                                prompt_tokens=out.num_prompt_tokens,
                                generated_tokens=out.num_output_tokens,
                                seed=p.seed,
                            )
                        yield sse(event.model_dump_json())
            except Exception as exc:
                yield sse(json.dumps(error_body(translate(exc), lorax=True)))

        return events()
