"""Prefix caching through the real server: the second request with a shared prompt reports
cached tokens (OpenAI's usage.prompt_tokens_details) and the metrics count them, while every
text equals the request run alone."""

from __future__ import annotations

import random

import httpx
import openai

from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer

M = {"model_name": MODEL_NAME}
SYSTEM = "You answer in one short line. " * 3


def test_a_repeated_prompt_reports_cached_tokens_and_keeps_its_text(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(29)
    prompt = f"{SYSTEM}The quick brown fox"
    expected = oracle.complete(adapter, prompt, max_tokens=6, ignore_eos=True)
    before = server.metrics()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        outs = [
            c.completions.create(
                model=adapter,
                prompt=prompt,
                max_tokens=6,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for _ in range(2)
        ]
        # The same prompt under the base model finds nothing cached under the adapter.
        base = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0)
    after = server.metrics()

    assert [o.choices[0].text for o in outs] == [expected, expected]
    first, second = (o.usage.prompt_tokens_details.cached_tokens for o in outs)
    assert first == 0
    assert 0 < second < outs[1].usage.prompt_tokens
    assert base.usage.prompt_tokens_details.cached_tokens == 0

    def moved(name: str) -> float:
        return after.value(name, **M) - before.value(name, **M)

    assert moved("loraplex_prefix_cache_hits_total") == second
    assert moved("loraplex_prefix_cache_queries_total") == 3 * outs[0].usage.prompt_tokens
    assert after.value("loraplex_prefix_cache_blocks", **M) > 0


def test_info_splits_the_pool_into_kv_cached_prefixes_adapters_and_free(
    server: LiveServer,
) -> None:
    with server.client() as http:
        body = {"model": adapter_name(30), "prompt": f"{SYSTEM}If", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).is_success
        pool = http.get("/info").json()["pool"]
    assert pool["prefix_caching"] is True
    assert pool["cached_kv_pages"] > 0  # the finished request's full blocks stay cached
    parts = ("kv_pages", "cached_kv_pages", "adapter_pages", "free_pages")
    assert sum(pool[k] for k in parts) == pool["pages"]


def _cached(http: httpx.Client, prompt: list[int], **fields: object) -> int:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, **fields}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_one_key_cannot_probe_another_keys_cached_prompt(server: LiveServer) -> None:
    """Issue 22's attack: the admin key sends a secret prompt; the inference key (another
    `user`) sends its first 64 tokens plus the right next token. Before partitioning that
    reported 64 cached tokens (and a faster first token); now it finds nothing, and what it
    finds afterwards is only what its own probe cached."""
    rng = random.Random(22)
    secret = [rng.randrange(10, 300) for _ in range(100)]  # the context is 128 here
    probe = [*secret[:64], secret[64]]
    with server.client(admin=True) as admin, server.client() as other:
        assert _cached(admin, secret, user="alice") == 0
        assert _cached(other, probe, user="mallory") == 0
        assert _cached(other, [*secret[:64], secret[64] + 1], user="mallory") == 64  # its own
        # The same key still reuses its own prefix: the partition is per key, not off.
        assert _cached(admin, probe, user="alice") == 64


def test_cache_salt_separates_requests_of_one_key(server: LiveServer) -> None:
    rng = random.Random(23)
    prompt = [rng.randrange(10, 300) for _ in range(70)]
    with server.client() as http:
        assert _cached(http, prompt, cache_salt="tenant-a") == 0
        assert _cached(http, prompt, cache_salt="tenant-b") == 0
        assert _cached(http, prompt) == 0
        assert _cached(http, prompt, cache_salt="tenant-a") == 64
