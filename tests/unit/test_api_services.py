"""The inference services run on stand-ins: an EngineClient and a ModelResolver of a few
lines and a tokenizer, with no server state, engine or model behind them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from server.api.clients import ServedModel
from server.api.errors import BadRequest, NotFound
from server.api.schemas.openai import CompletionRequest
from server.api.serving_openai import CompletionService
from server.engine.grammar import GrammarCompiler
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import TokenLogprob
from server.model.tokenizer import Tokenizer


class Engine:
    """Answers each prompt with its own length as one token, and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, list[SamplingParams], str | None]] = []
        self.checked: list[int] = []

    def check_serving(self, num_requests: int = 1) -> None:
        self.checked.append(num_requests)

    def generate(
        self,
        request,
        prompts: Sequence,
        params: Sequence[SamplingParams],
        adapter: str | None,
        adapter_id: int | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:  # type: ignore[no-untyped-def]
        self.calls.append((list(prompts), list(params), adapter))

        async def outputs() -> AsyncIterator[tuple[int, RequestOutput]]:
            for i, ids in enumerate(prompts):
                yield (
                    i,
                    RequestOutput(
                        request_id=str(i),
                        new_token_ids=[len(ids)],
                        new_text="x",
                        token_ids=[len(ids)],
                        text="x",
                        finished=True,
                        num_prompt_tokens=len(ids),
                        finish_reason="length",
                        num_cached_tokens=1,
                        prompt_logprobs=_scores(ids)
                        if params[i].prompt_logprobs is not None
                        else None,
                    ),
                )

        return outputs()


def _scores(ids: list[int]) -> list[TokenLogprob | None]:
    """Stand-in prompt scores: token j scores -j."""
    return [None] + [
        TokenLogprob(t, -float(j), [(t, -float(j))], 1) for j, t in enumerate(ids[1:], 1)
    ]


class Models:
    model_name = "base"

    def resolve_model(self, model: str | None) -> str | None:
        if model in (None, "base"):
            return None
        if model != "known":
            raise NotFound(f"the model {model!r} does not exist", "model")
        return model

    async def resolve_merged(self, spec, field: str) -> str:  # type: ignore[no-untyped-def]
        return ".merged/x"

    def adapter(self, name: str):  # type: ignore[no-untyped-def]
        return None


@pytest.fixture
def service(tiny_model_dir) -> tuple[CompletionService, Engine]:  # type: ignore[no-untyped-def]
    tok = Tokenizer(Path(tiny_model_dir("llama")))
    model = ServedModel(tok, GrammarCompiler(tok, 320), max_model_len=64, vocab_size=320)
    engine = Engine()
    return CompletionService(engine, Models(), model), engine


def test_a_completion_runs_through_the_engine_client_it_was_given(service) -> None:  # type: ignore[no-untyped-def]
    svc, engine = service
    req = CompletionRequest(model="known", prompt=[[1, 5, 6], [1, 7]], max_tokens=3, n=2)
    out = asyncio.run(svc.completions(None, req))  # type: ignore[arg-type]
    prompts, params, adapter = engine.calls[0]
    assert adapter == "known" and prompts == [[1, 5, 6]] * 2 + [[1, 7]] * 2
    assert all(p.max_tokens == 3 for p in params)
    assert engine.checked == [4]
    assert out.usage.prompt_tokens == 5 and out.usage.prompt_tokens_details.cached_tokens == 2


def test_the_resolver_and_the_models_limits_decide_what_is_refused(service) -> None:  # type: ignore[no-untyped-def]
    svc, engine = service
    with pytest.raises(NotFound):
        asyncio.run(svc.completions(None, CompletionRequest(model="nope", prompt="hi")))  # type: ignore[arg-type]
    too_long = CompletionRequest(model="base", prompt=[1] * 64)
    with pytest.raises(BadRequest, match="maximum context length is 64"):
        asyncio.run(svc.completions(None, too_long))  # type: ignore[arg-type]
    assert engine.calls == []


def test_scoring_asks_the_engine_once_per_prompt_and_shows_no_generated_token(service) -> None:  # type: ignore[no-untyped-def]
    """echo + logprobs with max_tokens 0: the first sample of each prompt scores it (with the
    most alternatives any field asks), the engine samples one token, the reply shows none."""
    svc, engine = service
    req = CompletionRequest(
        model="base",
        prompt=[[1, 5, 6], [1, 7]],
        max_tokens=0,
        n=2,
        echo=True,
        logprobs=1,
        prompt_logprobs=3,
    )
    out = asyncio.run(svc.completions(None, req))  # type: ignore[arg-type]
    _, params, _ = engine.calls[0]
    assert [p.prompt_logprobs for p in params] == [3, None, 3, None]
    assert all(p.max_tokens == 1 for p in params)
    first, _, second, _ = out.choices
    assert first.text == svc.tok.decode([1, 5, 6]) and first.finish_reason == "length"
    assert first.logprobs.token_logprobs == [None, -1.0, -2.0]
    assert second.logprobs.token_logprobs == [None, -1.0]
    assert second.prompt_logprobs[1]["7"].logprob == -1.0
    assert out.usage.completion_tokens == 0 and out.usage.total_tokens == out.usage.prompt_tokens
