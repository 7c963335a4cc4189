"""What the completion and chat services share: SSE framing, collecting a request's outputs,
best_of selection, usage, and logprobs in OpenAI's two shapes (and vLLM's prompt_logprobs)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate

from server.api.errors import translate
from server.api.schemas.openai import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from server.engine.outputs import RequestOutput
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


@dataclass
class Finished:
    """One engine request's final output and every token's logprob info."""

    output: RequestOutput
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        return self.output.prompt_logprobs

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)


async def collect(stream: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[Finished]:
    """Run a non-streaming call's engine requests to the end; results in index order."""
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
    finals: dict[int, RequestOutput] = {}
    async for i, out in stream:
        logprobs[i].extend(out.logprobs)
        if out.finished:
            finals[i] = out
    return [Finished(finals[i], logprobs[i]) for i in range(count)]


def best_of(results: list[Finished], best: int, n: int) -> list[Finished]:
    """Of each prompt's `best` samples (consecutive), the n with the highest cumulative
    logprob, likeliest first."""
    chosen: list[Finished] = []
    for start in range(0, len(results), best):
        group = results[start : start + best]
        chosen += sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
    return chosen


def usage(
    finals: Iterable[RequestOutput], samples_per_prompt: int, scoring_only: bool = False
) -> Usage:
    """Prompt tokens once per prompt (not per sample); every generated token counts, none
    when the request only scores its prompts (the one token sampled is not shown)."""
    outs = list(finals)
    samples = max(samples_per_prompt, 1)
    prompt = sum(o.num_prompt_tokens for o in outs) // samples
    cached = sum(o.num_cached_tokens for o in outs) // samples
    completion = 0 if scoring_only else sum(o.num_output_tokens for o in outs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


class LogprobFormatter:
    """Token logprobs as the completions API (text-keyed) and chat API (per-token) show them."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def completion(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = self.text(lp.token_id)
            tokens.append(text)
            offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in lps],
            top_logprobs=[self._top_by_text(lp) for lp in lps],
            text_offset=offsets,
        )

    def echo(
        self, prompt_ids: list[int], scored: list[TokenLogprob | None], lps: list[TokenLogprob]
    ) -> CompletionLogprobs:
        """An echoed prompt's tokens (the first with no logprob) followed by the generated
        ones, offsets running on through both."""
        tokens = [self.text(t) for t in prompt_ids]
        offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=0))
        generated = self.completion(lps, offsets[-1] + len(tokens[-1]))
        return CompletionLogprobs(
            tokens=tokens + generated.tokens,
            token_logprobs=[None if lp is None else lp.logprob for lp in scored]
            + generated.token_logprobs,
            top_logprobs=[None if lp is None else self._top_by_text(lp) for lp in scored]
            + generated.top_logprobs,
            text_offset=offsets + generated.text_offset,
        )

    def prompt(self, scored: list[TokenLogprob | None]) -> PromptLogprobs:
        """vLLM's prompt_logprobs: per prompt token (None for the first), the token and its
        alternatives by id, each with its logprob, rank and text."""
        out: PromptLogprobs = []
        for lp in scored:
            if lp is None:
                out.append(None)
                continue
            entry = {str(lp.token_id): self._prompt_entry(lp.token_id, lp.logprob, lp.rank)}
            for rank, (token_id, logprob) in enumerate(lp.top, start=1):
                entry.setdefault(str(token_id), self._prompt_entry(token_id, logprob, rank))
            out.append(entry)
        return out

    def _prompt_entry(self, token_id: int, logprob: float, rank: int | None) -> PromptLogprob:
        return PromptLogprob(logprob=logprob, rank=rank, decoded_token=self.text(token_id))

    def _top_by_text(self, lp: TokenLogprob) -> dict[str, float]:
        # Tokens that decode alone to the same text (partial UTF-8 bytes all read as U+FFFD)
        # share a key; keep the likeliest, which comes first.
        top: dict[str, float] = {}
        for token_id, logprob in lp.top:
            top.setdefault(self.text(token_id), logprob)
        return top

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat(self, lps: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in lps:
            top = self._top(lp.token_id, lp.logprob)
            content.append(
                ChatTokenLogprob(
                    **top.model_dump(), top_logprobs=[self._top(t, v) for t, v in lp.top]
                )
            )
        return ChatLogprobs(content=content)


async def releasing(
    stream: AsyncIterator[tuple[int, RequestOutput]], release: Callable[[], None]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """stream, then release() once it ends however it ends (a merged adapter's hold)."""
    try:
        async for item in stream:
            yield item
    finally:
        release()
