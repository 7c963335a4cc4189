"""64 concurrent streaming clients over 32 adapters for a bounded run: no errors, and every
stream carries exactly the tokens its adapter gives alone (nothing lost, nothing mixed up)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    ENGINE_FLAGS,
    MODEL_NAME,
    NUM_ADAPTERS,
    Oracle,
    adapter_name,
    serve_flags,
)
from tests.integration.live_server import LiveServer, Metrics
from tests.integration.streams import Job, Stream, stream_once

logger = logging.getLogger(__name__)

NUM_CLIENTS = 64
ROUNDS = 8  # streamed requests per client, one after another
# Clients ask for different lengths, so requests join and leave the batch at different steps.
LENGTHS = (8, 16, 24)
PROMPTS = ["The quick brown fox", "Return a new list containing"]
M = {"model_name": MODEL_NAME}


def run_clients(server: LiveServer, oracle: Oracle) -> Metrics:
    """NUM_CLIENTS clients stream ROUNDS completions each; checks every stream, returns the
    scrape taken after the run."""
    jobs: list[Job] = [
        (
            adapter_name(i % NUM_ADAPTERS),
            PROMPTS[i * len(PROMPTS) // NUM_CLIENTS],
            LENGTHS[i % len(LENGTHS)],
        )
        for i in range(NUM_CLIENTS)
    ]
    expected = {job: oracle.complete(*job[:2], max_tokens=job[2], ignore_eos=True) for job in jobs}
    before = server.metrics()

    async def client(job: Job) -> list[Stream]:
        # One connection per client, reused at once for its next request. (With one shared
        # pool, clients that finish early leave connections idle until the server's keep-alive
        # timeout closes them just as another client picks one up: a client-side race.)
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=120
        ) as http:
            return [await stream_once(http, job) for _ in range(ROUNDS)]

    async def run() -> list[list[Stream]]:
        return await asyncio.gather(*(client(job) for job in jobs))

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    after = server.metrics()

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **M, **labels) - before.value(name, **M, **labels)

    streams = [s for per_client in results for s in per_client]
    tokens = sum(s.completion_tokens or 0 for s in streams)
    failed = [s for s in streams if s.status != 200 or s.errors or not s.done]
    logger.info(
        "%d clients x %d rounds on %d adapters: %d requests, %d tokens, %d errors in %.1f s; "
        "%d adapter loads, %d evictions",
        NUM_CLIENTS,
        ROUNDS,
        NUM_ADAPTERS,
        len(streams),
        tokens,
        len(failed),
        wall,
        moved("loraplex_adapter_loads_total"),
        moved("loraplex_adapter_evictions_total"),
    )
    assert not failed, [(s.status, s.errors) for s in failed[:5]]
    for job, per_client in zip(jobs, results, strict=True):
        for s in per_client:
            assert len(s.ids) == 1 and s.models == {job[0]}
            assert (s.finish_reason, s.completion_tokens) == ("length", job[2])
            assert s.text == expected[job], job
    assert len({next(iter(s.ids)) for s in streams}) == len(streams)  # ids are unique
    assert moved("loraplex_request_success_total", finished_reason="length") == len(streams)
    assert moved("loraplex_request_success_total", finished_reason="abort") == 0
    assert moved("loraplex_generation_tokens_total") == tokens == ROUNDS * sum(j[2] for j in jobs)
    return after


def test_64_streaming_clients_on_32_adapters_each_get_their_adapters_tokens(
    server: LiveServer, oracle: Oracle
) -> None:
    run_clients(server, oracle)


@pytest.fixture(scope="module")
def evicting_server(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Device room for a quarter of the adapters: the run must evict and reload them."""
    args = serve_flags(**{**ENGINE_FLAGS, "max_loras": NUM_ADAPTERS // 4})
    args += ["--served-model-name", MODEL_NAME]
    args += ["--preload-adapters", str(next(iter(adapter_dirs.values())).parent)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("evicting") / "data", args).start()
    yield live
    live.stop()


@pytest.mark.slow
def test_64_streaming_clients_stay_correct_while_adapters_are_evicted_and_reloaded(
    evicting_server: LiveServer, oracle: Oracle
) -> None:
    after = run_clients(evicting_server, oracle)
    assert after.value("loraplex_adapter_evictions_total", **M) > 0
    assert after.value("loraplex_adapters_device_resident", **M) <= NUM_ADAPTERS // 4
