"""Structured output, logit_bias, min_tokens, best_of and stream usage against the real server,
through the openai SDK and the LoRAX client's payloads."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from server.engine.sampling_params import SamplingParams
from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer, sse_events
from tests.integration.test_lorax_api import client_request

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Return a new list"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
EOS_ID = 2  # the tiny tokenizer's </s>


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


def test_json_schema_output_validates_on_base_and_adapters_in_mixed_batches(
    server: LiveServer, oracle: Oracle
) -> None:
    """Constrained (greedy and sampled) and unconstrained requests run together; every
    constrained one validates and every unconstrained one is what it gives alone."""
    models = [MODEL_NAME, adapter_name(1), adapter_name(2), adapter_name(7)]

    async def constrained(client: openai.AsyncOpenAI, model: str, temperature: float) -> Any:
        out = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=90,
            temperature=temperature,
            seed=5,
            response_format=JSON_SCHEMA_FORMAT,  # type: ignore[arg-type]
        )
        assert out.choices[0].finish_reason == "stop"
        return json.loads(out.choices[0].message.content or "")

    async def constrained_stream(client: openai.AsyncOpenAI, model: str) -> Any:
        stream = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=90,
            temperature=0.9,
            stream=True,
            response_format=JSON_SCHEMA_FORMAT,  # type: ignore[arg-type]
        )
        return json.loads("".join([c.choices[0].delta.content or "" async for c in stream]))

    async def free(client: openai.AsyncOpenAI, model: str) -> str:
        out = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=10, temperature=0
        )
        return out.choices[0].text

    async def run() -> tuple[list[Any], list[str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0
        ) as client:
            shaped = [constrained(client, m, t) for m in models for t in (0.0, 1.0)]
            shaped += [constrained_stream(client, m) for m in models]
            results = await asyncio.gather(*shaped, *(free(client, m) for m in models))
        return list(results[: len(shaped)]), list(results[len(shaped) :])

    values, texts = asyncio.run(run())
    for value in values:
        jsonschema.validate(value, PERSON)
    for model, text in zip(models, texts, strict=True):
        adapter = None if model == MODEL_NAME else model
        assert text == oracle.complete(adapter, PROMPT, max_tokens=10)


def test_json_object_on_completions_is_a_json_object(sdk: openai.OpenAI) -> None:
    out = sdk.completions.create(
        model=adapter_name(3),
        prompt=PROMPT,
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(out.choices[0].text), dict)


def test_guided_choice_and_regex_extensions_shape_the_text(sdk: openai.OpenAI) -> None:
    choice = sdk.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=1.0,
        n=4,
        extra_body={"guided_choice": ["red fox", "blue dog"]},
    )
    assert {c.text for c in choice.choices} <= {"red fox", "blue dog"}
    regex = sdk.chat.completions.create(
        model=adapter_name(4),
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=1.0,
        extra_body={"guided_regex": r"[a-c]{2,4}-\d{3}"},
    )
    assert re.fullmatch(r"[a-c]{2,4}-\d{3}", regex.choices[0].message.content or "")


def test_an_unsupported_schema_keyword_is_a_400_naming_it(sdk: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    err = info.value.body
    assert isinstance(err, dict) and err["param"] == "response_format"
    assert "'multipleOf'" in err["message"] and "properties.n" in err["message"]


def test_lorax_response_format_validates_whole_and_streamed(server: LiveServer) -> None:
    fmt = {"type": "json_object", "schema": PERSON}
    payload = client_request(
        PROMPT, adapter_id=adapter_name(5), max_new_tokens=90, response_format=fmt
    )
    with server.client() as http:
        reply = http.post("/generate", json=payload)
        assert reply.status_code == 200, reply.text
        jsonschema.validate(json.loads(reply.json()["generated_text"]), PERSON)
        sampled = client_request(PROMPT, do_sample=True, max_new_tokens=90, response_format=fmt)
        with http.stream("POST", "/generate_stream", json=sampled) as r:
            events = list(sse_events(r.iter_lines()))
    last = events[-1]
    assert last["details"]["finish_reason"] == "eos_token"
    assert len(events) == last["details"]["generated_tokens"]
    jsonschema.validate(json.loads(last["generated_text"]), PERSON)


def test_logit_bias_minus_100_bans_the_greedy_token(sdk: openai.OpenAI, oracle: Oracle) -> None:
    first = oracle.engine.generate(
        [PROMPT], SamplingParams(max_tokens=1, temperature=0), [adapter_name(6)]
    )[0].token_ids[0]
    out = sdk.completions.create(
        model=adapter_name(6),
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        logprobs=0,
        logit_bias={str(first): -100},
    )
    assert out.choices[0].logprobs is not None
    tokens = oracle.tokens(PROMPT + out.choices[0].text)
    assert first not in tokens[len(oracle.tokens(PROMPT)) :]


def test_logit_bias_plus_100_forces_a_token_even_when_sampling(
    server: LiveServer, oracle: Oracle
) -> None:
    token = oracle.tokens(" fox")[-1]
    body = {
        "model": adapter_name(8),
        "prompt": PROMPT,
        "max_tokens": 5,
        "temperature": 1.0,
        "ignore_eos": True,
        "logit_bias": {str(token): 100},
    }
    with server.client() as http:
        out = http.post("/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == oracle.engine.tokenizer.decode([token] * 5)


def test_logit_bias_out_of_bounds_is_a_400(server: LiveServer) -> None:
    for bias, fragment in (({"5": 101}, "[-100, 100]"), ({"99999": 1}, "token ids in")):
        body = {"model": MODEL_NAME, "prompt": PROMPT, "logit_bias": bias}
        with server.client() as http:
            r = http.post("/v1/completions", json=body)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "logit_bias"
        assert fragment in r.json()["error"]["message"]


def test_min_tokens_holds_back_eos_until_reached(server: LiveServer) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 20,
        "temperature": 0,
        "logit_bias": {str(EOS_ID): 100},  # EOS as soon as it is allowed
    }
    with server.client() as http:
        alone = http.post("/v1/completions", json=body).json()
        held = http.post("/v1/completions", json={**body, "min_tokens": 7}).json()
    assert alone["usage"]["completion_tokens"] == 1
    assert held["usage"]["completion_tokens"] == 8  # 7 tokens, then the EOS
    assert held["choices"][0]["finish_reason"] == "stop"


def test_include_usage_ends_every_openai_stream_with_the_totals(sdk: openai.OpenAI) -> None:
    opts: Any = {"include_usage": True}
    completion = list(
        sdk.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=2, stream=True, stream_options=opts
        )
    )
    chat = list(
        sdk.chat.completions.create(
            model=adapter_name(9),
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
            stream_options=opts,
            extra_body={"ignore_eos": True},
        )
    )
    for chunks, tokens in ((completion, None), (chat, 5)):
        *body, last = chunks
        assert all(c.usage is None for c in body)
        assert last.choices == [] and last.usage is not None
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
        if tokens is not None:
            assert last.usage.completion_tokens == tokens


def test_stream_options_without_stream_is_a_400(server: LiveServer) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "stream_options": {"include_usage": True}}
    with server.client() as http:
        r = http.post("/v1/completions", json=body)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "stream_options")


def test_best_of_returns_the_likeliest_of_its_samples(server: LiveServer, oracle: Oracle) -> None:
    body = {"model": adapter_name(10), "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0}
    body |= {"seed": 11, "best_of": 3, "ignore_eos": True}
    with server.client() as http:
        out = http.post("/v1/completions", json=body).json()
    samples = oracle.engine.generate(
        [PROMPT] * 3,
        [SamplingParams(max_tokens=6, seed=11 + j, logprobs=0, ignore_eos=True) for j in range(3)],
        [adapter_name(10)] * 3,
    )
    best = max(samples, key=lambda s: sum(lp.logprob for lp in s.logprobs))
    assert [c["text"] for c in out["choices"]] == [best.text]
    assert out["usage"]["completion_tokens"] == 18  # every sample counts


def test_lorax_best_of_returns_the_likeliest_sample(server: LiveServer, oracle: Oracle) -> None:
    payload = client_request(PROMPT, do_sample=True, seed=4, best_of=2, max_new_tokens=5)
    payload["parameters"]["ignore_eos_token"] = True
    with server.client() as http:
        reply = http.post("/generate", json=payload).json()
    samples = oracle.engine.generate(
        [PROMPT] * 2,
        [SamplingParams(max_tokens=5, seed=4 + j, logprobs=0, ignore_eos=True) for j in range(2)],
    )
    best = max(samples, key=lambda s: sum(lp.logprob for lp in s.logprobs))
    assert reply["generated_text"] == best.text


def test_the_issues_huge_schemas_are_refused_at_once_and_another_key_is_served(
    server: LiveServer,
) -> None:
    """Issue 22: two schemas of ~1400 optional properties (41 KB) held both compile threads
    for 24 s while another tenant's json_object waited 21 s. Each is now a 400 that names the
    bound, returned at once, and the other key's request is served."""
    with server.client() as http, server.client(admin=True) as other:
        for tag in ("a", "b"):
            props = {f"{tag}{i}": {"type": "integer"} for i in range(1400)}
            schema = {"type": "object", "properties": props}
            body = {
                "model": MODEL_NAME,
                "prompt": "Hi",
                "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
            }
            start = time.monotonic()
            response = http.post("/v1/completions", json=body)
            assert time.monotonic() - start < 2.0
            assert response.status_code == 400
            assert "1400 properties; at most 256" in response.json()["error"]["message"]
        plain = {"type": "json_object"}
        body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, "response_format": plain}
        assert other.post("/v1/completions", json=body).status_code == 200
