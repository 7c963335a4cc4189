"""The OpenAI routes through the openai SDK: what each adapter returns equals the engine's
output for that adapter alone, whatever else runs at the same time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.integration.conftest import MODEL_NAME, NUM_ADAPTERS, Oracle, adapter_name
from tests.integration.live_server import LiveServer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Return a new list"}]


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


def test_models_lists_the_base_and_every_adapter_with_its_parent(sdk: openai.OpenAI) -> None:
    models = {m.id: m for m in sdk.models.list()}
    assert models[MODEL_NAME].parent is None  # type: ignore[attr-defined]
    for i in range(NUM_ADAPTERS):
        assert models[adapter_name(i)].parent == MODEL_NAME  # type: ignore[attr-defined]


def test_concurrent_completions_chats_and_streams_match_each_adapter_alone(
    server: LiveServer, oracle: Oracle
) -> None:
    models = [MODEL_NAME, *(adapter_name(i) for i in range(0, NUM_ADAPTERS, 5))]

    async def completion(client: openai.AsyncOpenAI, model: str) -> str:
        out = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0
        )
        return out.choices[0].text

    async def completion_stream(client: openai.AsyncOpenAI, model: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def chat(client: openai.AsyncOpenAI, model: str) -> str:
        out = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
        )
        return out.choices[0].message.content or ""

    async def chat_stream(client: openai.AsyncOpenAI, model: str) -> str:
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0
        ) as client:
            calls = [
                call(client, model)
                for model in models
                for call in (completion, completion_stream, chat, chat_stream)
            ]
            return await asyncio.gather(*calls)

    results = iter(asyncio.run(run()))
    for model in models:
        adapter = None if model == MODEL_NAME else model
        text = oracle.complete(adapter, PROMPT, max_tokens=12)
        chat_text = oracle.chat(adapter, MESSAGES, max_tokens=12)
        assert [next(results) for _ in range(4)] == [text, text, chat_text, chat_text], model


def test_adapters_give_different_text_than_the_base(sdk: openai.OpenAI, oracle: Oracle) -> None:
    texts = {
        model: sdk.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for model in (MODEL_NAME, adapter_name(0), adapter_name(1))
    }
    assert len(set(texts.values())) == 3  # else the parity checks above prove little


def test_prompt_as_token_ids_gives_the_same_text_as_the_string(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    model = adapter_name(3)
    ids = oracle.tokens(PROMPT)
    by_ids = sdk.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == oracle.complete(model, PROMPT, max_tokens=8)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


def test_a_list_of_prompts_gives_one_choice_per_prompt_in_order(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    model = adapter_name(2)
    prompts = ["The quick brown fox", "Built-in functions", "If the argument"]
    out = sdk.completions.create(model=model, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [
        oracle.complete(model, p, max_tokens=6) for p in prompts
    ]


def test_a_list_of_token_id_prompts_is_accepted(sdk: openai.OpenAI, oracle: Oracle) -> None:
    prompts = [oracle.tokens("The quick"), oracle.tokens("Return a")]
    out = sdk.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in out.choices] == [
        oracle.complete(None, p, max_tokens=4) for p in prompts
    ]


def test_n_returns_n_choices_and_usage_counts_the_prompt_once(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    out = sdk.completions.create(
        model=adapter_name(4),
        prompt=PROMPT,
        n=3,
        max_tokens=5,
        temperature=1.0,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert len(out.choices) == 3
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(oracle.tokens(PROMPT))
    assert out.usage.completion_tokens == 15
    assert out.usage.total_tokens == out.usage.prompt_tokens + 15


def test_the_same_seed_gives_the_same_sample(sdk: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = sdk.completions.create(
            model=adapter_name(5), prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_stop_string_cuts_the_text_before_it_and_finishes_with_stop(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    model = adapter_name(6)
    full = oracle.complete(model, PROMPT, max_tokens=16, ignore_eos=True)
    stop = full[5:8]
    out = sdk.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_ignore_eos_generates_exactly_max_tokens(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model=adapter_name(7),
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 20


def test_top_k_one_sampling_equals_greedy(sdk: openai.OpenAI, oracle: Oracle) -> None:
    model = adapter_name(8)
    out = sdk.completions.create(
        model=model, prompt=PROMPT, max_tokens=10, temperature=1.5, extra_body={"top_k": 1}
    )
    assert out.choices[0].text == oracle.complete(model, PROMPT, max_tokens=10)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 5e-6])
def test_a_temperature_too_small_to_sample_with_is_greedy(
    server: LiveServer, sdk: openai.OpenAI, oracle: Oracle, temperature: float
) -> None:
    # 1e-45 is 1.4e-45 in float32: logits divided by it overflowed, and NaN probabilities
    # drew token 0 (`<s>`) every step, an empty text.
    model = adapter_name(8)
    greedy = oracle.complete(model, PROMPT, max_tokens=10, ignore_eos=True)
    assert greedy
    out = sdk.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=10,
        temperature=temperature,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == greedy
    parameters = {"do_sample": True, "temperature": temperature, "max_new_tokens": 10}
    parameters |= {"adapter_id": model, "ignore_eos_token": True}
    with server.client() as http:
        reply = http.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert reply.status_code == 200, reply.text
    assert reply.json()["generated_text"] == greedy


def test_repetition_penalty_is_applied_as_the_engine_applies_it(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    model = adapter_name(9)
    out = sdk.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"repetition_penalty": 1.8},
    )
    expected = oracle.complete(model, PROMPT, max_tokens=12, repetition_penalty=1.8)
    assert out.choices[0].text == expected
    assert expected != oracle.complete(model, PROMPT, max_tokens=12)


def test_logprobs_give_each_token_with_its_top_alternatives(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model=adapter_name(10),
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0
        # Keyed by text (OpenAI's shape): byte-level tokens that decode alone to the same
        # replacement character collapse into one entry, keeping the likelier.
        assert top is not None and 1 <= len(top) <= 3
        assert top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the best


def test_echo_prepends_the_prompt(sdk: openai.OpenAI, oracle: Oracle) -> None:
    model = adapter_name(11)
    out = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert out.choices[0].text == PROMPT + oracle.complete(model, PROMPT, max_tokens=5)


def test_stream_ends_with_done_and_reports_usage_when_asked(server: LiveServer) -> None:
    body = {
        "model": adapter_name(12),
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "data: [DONE]"
    assert '"usage":{"prompt_tokens":' in data[-2]
    assert '"completion_tokens":4' in data[-2]


def test_chat_with_n_and_logprobs_gives_n_choices_with_token_logprobs(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model=adapter_name(13),
        messages=MESSAGES,  # type: ignore[arg-type]
        n=2,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # both greedy
    for choice in out.choices:
        assert choice.message.role == "assistant"
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert out.usage is not None and out.usage.completion_tokens == 10


def test_chat_stream_starts_with_the_assistant_role(sdk: openai.OpenAI) -> None:
    chunks: list[Any] = list(
        sdk.chat.completions.create(
            model=adapter_name(14),
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=3,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
