"""The real LoRAX client (lorax-client, installed without its pins by .ci/run and the
Makefile) against the real server: generate, stream, merged adapters against PEFT, best_of
candidates, and errors as the client's own exception types."""

from __future__ import annotations

from typing import Any

import pytest
from lorax import AsyncClient, Client
from lorax.errors import NotFoundError, ValidationError
from lorax.types import MergedAdapters

from tests.integration.conftest import Oracle, adapter_name
from tests.integration.live_server import LiveServer
from tests.integration.test_merged_adapters import NEW_TOKENS, PROMPT, TIES, reference  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def client(server: LiveServer) -> Client:
    return Client(server.url, headers=server.headers(), timeout=120)


def test_generate_and_stream_give_the_adapters_text(server: LiveServer, oracle: Oracle) -> None:
    adapter = adapter_name(11)
    expected = oracle.complete(adapter, PROMPT, max_tokens=8, ignore_eos=True)
    c = client(server)
    reply = c.generate(PROMPT, adapter_id=adapter, max_new_tokens=8, ignore_eos_token=True)
    assert reply.generated_text == expected
    assert reply.details.generated_tokens == 8
    assert reply.details.finish_reason == "length"
    streamed = list(
        c.generate_stream(PROMPT, adapter_id=adapter, max_new_tokens=8, ignore_eos_token=True)
    )
    assert "".join(r.token.text for r in streamed) == expected
    assert streamed[-1].generated_text == expected


def test_the_async_client_serves_the_base_model(server: LiveServer, oracle: Oracle) -> None:
    import asyncio

    expected = oracle.complete(None, PROMPT, max_tokens=6, ignore_eos=True)

    async def main() -> str:
        c = AsyncClient(server.url, headers=server.headers(), timeout=120)
        reply = await c.generate(PROMPT, max_new_tokens=6, ignore_eos_token=True)
        return reply.generated_text

    assert asyncio.run(main()) == expected


def test_merged_adapters_from_the_client_match_peft(
    server: LiveServer,
    oracle: Oracle,
    reference: Any,  # noqa: F811
) -> None:
    spec = MergedAdapters(**TIES)
    reply = client(server).generate(
        PROMPT, merged_adapters=spec, max_new_tokens=NEW_TOKENS, ignore_eos_token=True
    )
    assert [t.id for t in reply.details.tokens] == reference("ties", tuple(oracle.tokens(PROMPT)))


def test_best_of_candidates_parse_as_the_clients_types(server: LiveServer) -> None:
    reply = client(server).generate(
        PROMPT, adapter_id=adapter_name(12), do_sample=True, best_of=3, max_new_tokens=5
    )
    others = reply.details.best_of_sequences
    assert others is not None and len(others) == 2
    assert all(o.generated_tokens == len(o.tokens) for o in others)


def test_errors_arrive_as_the_clients_exceptions(server: LiveServer) -> None:
    c = client(server)
    with pytest.raises(NotFoundError, match="does not exist"):
        c.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    with pytest.raises(ValidationError, match="weights"):
        c.generate(
            PROMPT,
            merged_adapters=MergedAdapters(ids=[adapter_name(0)], weights=[1.0, 2.0]),
            max_new_tokens=2,
        )
