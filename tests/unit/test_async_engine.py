"""The background step loop: concurrent streams, and abort frees what a request held."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.async_engine import AsyncLLMEngine
from server.engine.errors import InvalidRequestError
from server.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 33, 70], [1, 100, 4], list(range(3, 30))]


@pytest.fixture
def engine(tiny_model_dir, make_engine):  # type: ignore[no-untyped-def]
    return make_engine(tiny_model_dir("llama"))


async def _collect(aengine: AsyncLLMEngine, prompt, params=GREEDY) -> list[int]:  # type: ignore[no-untyped-def]
    tokens: list[int] = []
    async for out in aengine.generate(prompt, params):
        tokens.extend(out.new_token_ids)
    return tokens


def test_concurrent_streams_get_the_same_tokens_as_offline_generate(engine):
    expected = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]

    async def main() -> list[list[int]]:
        aengine = AsyncLLMEngine(engine)
        aengine.start()
        try:
            return await asyncio.gather(*(_collect(aengine, p) for p in PROMPTS))
        finally:
            await aengine.stop()

    assert asyncio.run(main()) == expected


def test_leaving_a_stream_early_aborts_and_frees_its_pages(engine):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main() -> None:
        aengine = AsyncLLMEngine(engine)
        aengine.start()
        try:
            received = 0
            async for _ in aengine.generate(PROMPTS[2], long):
                received += 1
                if received == 3:
                    break
            for _ in range(100):
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.02)
        finally:
            await aengine.stop()

    asyncio.run(main())
    assert not engine.has_unfinished_requests()
    assert engine.num_requests == 0
    assert engine.pool.available(engine.reclaimer) == engine.pool.num_pages
    assert engine.kv.usage == 0


def test_invalid_request_raises_before_queuing(engine):
    async def main() -> None:
        aengine = AsyncLLMEngine(engine)
        aengine.start()
        try:
            with pytest.raises(InvalidRequestError):
                async for _ in aengine.generate([], GREEDY):
                    pass
        finally:
            await aengine.stop()

    asyncio.run(main())
    assert engine.num_requests == 0
