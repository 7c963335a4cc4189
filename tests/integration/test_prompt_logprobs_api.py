"""Prompt logprobs through the real server, against a transformers + PEFT forward pass of the
same adapter (float32): completions echo + logprobs (and max_tokens 0), vLLM's prompt_logprobs
on completions and chat, and LoRAX's decoder_input_details through the LoRAX client."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from lorax import Client

from tests.hf_reference import next_token_logprobs, prompt_token_logprobs
from tests.integration.conftest import Oracle, adapter_name
from tests.integration.live_server import LiveServer
from tests.peft_reference import load_peft

TOL = 1e-4
ADAPTER = adapter_name(1)  # rank 8 on the MLP
PROMPT = "Return a new list containing the items"
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def peft(model_dir: Path, adapter_dirs: dict[str, Path]):  # type: ignore[no-untyped-def]
    return load_peft(model_dir, adapter_dirs[ADAPTER])


def _close(got: list[float | None], expected: list[float | None]) -> None:
    assert len(got) == len(expected)
    assert got[0] is None and expected[0] is None
    assert got[1:] == pytest.approx(expected[1:], abs=TOL)


def test_echo_with_logprobs_scores_every_prompt_token_then_the_generated_ones(
    sdk: openai.OpenAI, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    ids = oracle.tokens(PROMPT)
    out = sdk.completions.create(
        model=ADAPTER, prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None and len(lp.token_logprobs) == len(ids) + 3
    _close(lp.token_logprobs[: len(ids)], prompt_token_logprobs(peft, ids))
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert choice.text == oracle.engine.tokenizer.decode(ids) + oracle.complete(
        ADAPTER, ids, max_tokens=3
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(
    sdk: openai.OpenAI, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    out = sdk.completions.create(
        model=ADAPTER, prompt=PROMPT, max_tokens=0, temperature=0, logprobs=0, echo=True
    )
    ids = oracle.tokens(PROMPT)
    choice = out.choices[0]
    assert choice.text == PROMPT
    assert choice.logprobs is not None and len(choice.logprobs.tokens) == len(ids)
    _close(choice.logprobs.token_logprobs, prompt_token_logprobs(peft, ids))
    assert out.usage is not None and out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == len(ids)


def test_streamed_echo_sends_the_scored_prompt_first(
    sdk: openai.OpenAI, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    ids = oracle.tokens(PROMPT)
    stream = sdk.completions.create(
        model=ADAPTER,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        logprobs=1,
        echo=True,
        stream=True,
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    first = chunks[0]
    assert first.text == PROMPT and first.logprobs is not None
    _close(first.logprobs.token_logprobs, prompt_token_logprobs(peft, ids))
    generated = "".join(c.text for c in chunks[1:])
    assert generated == oracle.complete(ADAPTER, PROMPT, max_tokens=4)


def test_vllm_prompt_logprobs_on_completions_rank_and_alternatives(
    server: LiveServer, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    ids = oracle.tokens(PROMPT)
    with server.client() as http:
        body = http.post(
            "/v1/completions",
            json={"model": ADAPTER, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 3},
        ).json()
    scored = body["choices"][0]["prompt_logprobs"]
    rows = next_token_logprobs(peft, ids)
    assert scored[0] is None and len(scored) == len(ids)
    for j in range(1, len(ids)):
        entry, row = scored[j], rows[j - 1]
        chosen = entry[str(ids[j])]
        assert chosen["logprob"] == pytest.approx(row[ids[j]].item(), abs=TOL)
        assert chosen["rank"] == int((row > row[ids[j]]).sum()) + 1
        top = row.topk(3)
        for rank, (value, token) in enumerate(zip(top.values, top.indices, strict=True), 1):
            assert entry[str(int(token))]["logprob"] == pytest.approx(value.item(), abs=TOL)
            if int(token) != ids[j]:
                assert entry[str(int(token))]["rank"] == rank


def test_vllm_prompt_logprobs_on_chat_score_the_rendered_prompt(
    server: LiveServer, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    with server.client() as http:
        body = http.post(
            "/v1/chat/completions",
            json={"model": ADAPTER, "messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": 0},
        ).json()
    ids = oracle.chat_prompt(MESSAGES)
    scored = body["prompt_logprobs"]
    got = [None if e is None else e[str(t)]["logprob"] for e, t in zip(scored, ids, strict=True)]
    _close(got, prompt_token_logprobs(peft, ids))


def test_prompt_logprobs_are_not_streamed(server: LiveServer) -> None:
    with server.client() as http:
        reply = http.post(
            "/v1/completions",
            json={"model": ADAPTER, "prompt": PROMPT, "prompt_logprobs": 1, "stream": True},
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lorax_decoder_input_details_give_every_prefill_tokens_logprob(
    server: LiveServer, oracle: Oracle, peft
) -> None:  # type: ignore[no-untyped-def]
    client = Client(server.url, headers=server.headers(), timeout=120)
    reply = client.generate(
        PROMPT, adapter_id=ADAPTER, max_new_tokens=2, decoder_input_details=True
    )
    prefill = reply.details.prefill
    ids = oracle.tokens(PROMPT)
    assert [t.id for t in prefill] == ids
    _close([t.logprob for t in prefill], prompt_token_logprobs(peft, ids))


def test_generate_details_without_decoder_input_details_leave_prefill_empty(
    server: LiveServer,
) -> None:
    with server.client() as http:
        body = http.post(
            "/generate",
            json={"inputs": PROMPT, "parameters": {"adapter_id": ADAPTER, "details": True}},
        ).json()
    assert body["details"]["prefill"] == []


def test_decoder_input_details_are_not_streamed(server: LiveServer) -> None:
    with server.client() as http:
        reply = http.post(
            "/generate_stream",
            json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}},
        )
    assert reply.status_code == 422
    assert "decoder_input_details" in reply.json()["error"]
