"""The LoRAX/TGI routes, fed exactly what the LoRAX Python client sends.

lorax-client 0.6.3 pins huggingface-hub<1.0 (and an old certifi), which would break the
transformers these tests build adapters with, so it is not installed: CLIENT_PARAMETERS below
is what its `Client.generate` posts (Request(...).dict(by_alias=True) with every parameter,
nulls explicit), and the reply is parsed with the fields its pydantic types require.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer, sse_events

PROMPT = "The quick brown fox"
# lorax.Client.generate(prompt) as posted, before the caller's arguments are applied.
CLIENT_PARAMETERS: dict[str, Any] = {
    "adapter_id": None,
    "adapter_source": None,
    "merged_adapters": None,
    "api_token": None,
    "do_sample": False,
    "max_new_tokens": None,
    "ignore_eos_token": False,
    "repetition_penalty": None,
    "return_full_text": False,
    "stop": [],
    "seed": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "truncate": None,
    "typical_p": None,
    "best_of": None,
    "watermark": False,
    "details": True,
    "decoder_input_details": False,
    "return_k_alternatives": None,
    "response_format": None,
}


def client_request(inputs: str, stream: bool = False, **parameters: Any) -> dict[str, Any]:
    return {"inputs": inputs, "parameters": {**CLIENT_PARAMETERS, **parameters}, "stream": stream}


# The LoRAX client's reply types (lorax/types.py), with the fields it requires.
class ClientToken(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class ClientBestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[dict[str, Any]]
    tokens: list[ClientToken]


class ClientDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefill: list[dict[str, Any]]
    tokens: list[ClientToken]
    best_of_sequences: list[ClientBestOfSequence] | None = None


class ClientResponse(BaseModel):
    generated_text: str
    details: ClientDetails | None = None


class ClientStreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


class ClientStreamResponse(BaseModel):
    token: ClientToken
    generated_text: str | None = None
    details: ClientStreamDetails | None = None


def test_root_answers_the_client_payload_with_a_one_element_array(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(20)
    payload = client_request(PROMPT, adapter_id=adapter, max_new_tokens=8, ignore_eos_token=True)
    with server.client() as http:
        response = http.post("/", json=payload)
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    reply = ClientResponse(**body[0])
    assert reply.generated_text == oracle.complete(adapter, PROMPT, max_tokens=8, ignore_eos=True)
    assert reply.details is not None
    assert reply.details.finish_reason == "length"
    assert reply.details.prompt_tokens == len(oracle.tokens(PROMPT))
    assert reply.details.generated_tokens == len(reply.details.tokens) == 8
    assert all(t.logprob <= 0 for t in reply.details.tokens)
    ids = [t.id for t in reply.details.tokens]
    assert oracle.engine.tokenizer.decode(ids) == reply.generated_text
    assert body[0]["details"]["skipped_tokens"] == 0
    assert not any(t["skipped"] for t in body[0]["details"]["tokens"])


def test_without_an_adapter_id_the_base_model_answers(server: LiveServer, oracle: Oracle) -> None:
    with server.client() as http:
        body = http.post("/", json=client_request(PROMPT, max_new_tokens=6)).json()
    assert body[0]["generated_text"] == oracle.complete(None, PROMPT, max_tokens=6)


def test_generate_returns_prefill_tokens_when_decoder_input_details_is_set(
    server: LiveServer, oracle: Oracle
) -> None:
    payload = client_request(PROMPT, max_new_tokens=2, decoder_input_details=True)
    with server.client() as http:
        reply = ClientResponse(**http.post("/generate", json=payload).json())
    assert reply.details is not None
    assert [t["id"] for t in reply.details.prefill] == oracle.tokens(PROMPT)


def test_generate_stream_tokens_add_up_to_the_final_text(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(21)
    payload = client_request(PROMPT, adapter_id=adapter, max_new_tokens=7, ignore_eos_token=True)
    with server.client() as http, http.stream("POST", "/generate_stream", json=payload) as r:
        assert r.status_code == 200
        events = [ClientStreamResponse(**e) for e in sse_events(r.iter_lines())]  # type: ignore[arg-type]
    assert len(events) == 7
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == oracle.complete(adapter, PROMPT, max_tokens=7, ignore_eos=True)
    assert last.details is not None
    assert (last.details.finish_reason, last.details.generated_tokens) == ("length", 7)
    ids = [e.token.id for e in events]
    assert oracle.engine.tokenizer.decode(ids) == last.generated_text


def test_root_streams_when_the_client_asks_for_a_stream(server: LiveServer) -> None:
    payload = client_request(PROMPT, stream=True, max_new_tokens=3, ignore_eos_token=True)
    with server.client() as http, http.stream("POST", "/", json=payload) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert len(events) == 3
    assert events[-1]["details"]["finish_reason"] == "length"  # type: ignore[index]


def test_a_stop_sequence_ends_generation_with_finish_reason_stop_sequence(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(22)
    full = oracle.complete(adapter, PROMPT, max_tokens=12, ignore_eos=True)
    stop = full[3:5]
    payload = client_request(
        PROMPT, adapter_id=adapter, max_new_tokens=12, ignore_eos_token=True, stop=[stop]
    )
    with server.client() as http:
        reply = ClientResponse(**http.post("/", json=payload).json()[0])
    assert reply.generated_text == full[: full.index(stop)]
    assert reply.details is not None and reply.details.finish_reason == "stop_sequence"


def test_sampling_with_a_seed_is_reproducible_and_echoed(server: LiveServer) -> None:
    payload = client_request(PROMPT, do_sample=True, temperature=1.2, seed=99, max_new_tokens=8)
    with server.client() as http:
        first, second = (ClientResponse(**http.post("/", json=payload).json()[0]) for _ in "ab")
    assert first.generated_text == second.generated_text
    assert first.details is not None and first.details.seed == 99


def test_a_temperature_without_do_sample_samples_as_lorax_does(
    server: LiveServer, oracle: Oracle
) -> None:
    def text(**parameters: Any) -> str:
        payload = client_request(PROMPT, seed=5, max_new_tokens=12, **parameters)
        with server.client() as http:
            return http.post("/", json=payload).json()[0]["generated_text"]

    sampled = text(do_sample=True, temperature=1.5)
    assert text(temperature=1.5) == sampled
    assert sampled != oracle.complete(None, PROMPT, max_tokens=12)  # not greedy


def test_without_do_sample_or_a_warper_the_choice_is_greedy(
    server: LiveServer, oracle: Oracle
) -> None:
    payload = client_request(PROMPT, seed=5, max_new_tokens=12, temperature=1.0)
    with server.client() as http:
        reply = http.post("/", json=payload).json()[0]
    assert reply["generated_text"] == oracle.complete(None, PROMPT, max_tokens=12)


def test_return_full_text_prepends_the_inputs(server: LiveServer, oracle: Oracle) -> None:
    payload = client_request(PROMPT, max_new_tokens=4, return_full_text=True, details=False)
    with server.client() as http:
        body = http.post("/generate", json=payload).json()
    assert body == {
        "generated_text": PROMPT + oracle.complete(None, PROMPT, max_tokens=4),
        "details": None,
    }


def test_adapter_id_may_name_the_base_model(server: LiveServer, oracle: Oracle) -> None:
    payload = client_request(PROMPT, adapter_id=MODEL_NAME, max_new_tokens=4)
    with server.client() as http:
        body = http.post("/", json=payload).json()
    assert body[0]["generated_text"] == oracle.complete(None, PROMPT, max_tokens=4)


def test_best_of_details_carry_the_other_candidates_as_best_of_sequences(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(3)
    sampling = dict(temperature=1.5, max_new_tokens=8)
    payload = client_request(
        PROMPT,
        adapter_id=adapter,
        do_sample=True,
        seed=7,
        best_of=3,
        decoder_input_details=True,
        return_full_text=True,
        **sampling,
    )
    with server.client() as http:
        reply = ClientResponse(**http.post("/", json=payload).json()[0])
    details = reply.details
    assert details is not None and details.best_of_sequences is not None
    others = details.best_of_sequences
    assert len(others) == 2
    candidates = [(reply.generated_text, details.seed, details.tokens)]
    candidates += [(o.generated_text, o.seed, o.tokens) for o in others]
    assert sorted(seed for _, seed, _ in candidates) == [7, 8, 9]  # type: ignore[type-var]
    for text, seed, tokens in candidates:
        alone = oracle.complete(adapter, PROMPT, temperature=1.5, max_tokens=8, seed=seed)
        assert text == PROMPT + alone
        assert len(tokens) == 8
    for other in others:
        assert other.generated_tokens == len(other.tokens)
        assert other.finish_reason in ("length", "eos_token")
        assert other.prefill == details.prefill and len(details.prefill) > 0
        assert sum(t.logprob for t in other.tokens) <= sum(t.logprob for t in details.tokens)


def test_without_best_of_there_are_no_best_of_sequences(server: LiveServer) -> None:
    with server.client() as http:
        body = http.post("/generate", json=client_request(PROMPT, max_new_tokens=2)).json()
    assert body["details"]["best_of_sequences"] is None
