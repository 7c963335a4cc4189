"""The EngineClient the inference services use: admission checks, then the engine's streams of
several requests merged into one API call."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request

from server.api.auth import tenant
from server.api.errors import BadRequest, ClientDisconnected, Overloaded, Unavailable
from server.api.fairness import Claim, TenantBudget, fairness_tenant
from server.engine.async_engine import AsyncLLMEngine
from server.engine.llm_engine import Prompt
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

DISCONNECT_POLL_SECONDS = 0.5


class ServingClient:
    """Admission (503 until ready, 429 when the queue is full) and generation over the engine."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        max_waiting: int,
        is_ready: Callable[[], bool],
        budget: TenantBudget | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.is_ready = is_ready
        # Per tenant: sequences and prompt tokens in flight (unbounded without one).
        self.budget = budget or TenantBudget(max_waiting, 2**62)

    def check_serving(self, num_requests: int = 1) -> None:
        """503 until ready, 429 when the waiting queue is full."""
        if not self.is_ready() or not self.engine.running:
            raise Unavailable("the server is not ready yet", headers={"Retry-After": "1"})
        if num_requests > self.max_waiting:
            # Retrying could never help, so this is the request's fault, not the load's.
            raise BadRequest(
                f"this request needs {num_requests} sequences (prompts x n) but at most "
                f"{self.max_waiting} can wait (--max-waiting)",
                "n",
            )
        waiting = self.engine.num_waiting
        if waiting + num_requests > self.max_waiting:
            raise Overloaded(
                f"too many requests waiting ({waiting}); retry shortly",
                headers={"Retry-After": "1"},
            )

    def generate(
        self,
        request: Request,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        adapter: str | None,
        adapter_id: int | None = None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several engine requests as one API call: (index, output) as outputs arrive.

        Every request is validated here, before any is queued (so errors surface before a
        response starts); leaving the iteration early, or the client going away, aborts all.
        """
        self.check_serving(len(prompts))
        partition = cache_partition(tenant(request), cache_salt)
        fair = fairness_tenant(request)
        seqs = [
            self.engine.prepare(
                p,
                sp,
                adapter_name=adapter,
                adapter_id=adapter_id,
                cache_partition=partition,
                tenant=fair,
            )
            for p, sp in zip(prompts, params, strict=True)
        ]
        claim = self.budget.claim(fair, len(seqs), sum(s.num_prompt_tokens for s in seqs))
        stream = _merge(request, [self.engine.stream(s) for s in seqs], claim)
        # A stream never iterated (its response never started) runs no finally: its claim
        # goes back when it is collected.
        weakref.finalize(stream, claim.release)
        return stream


def cache_partition(tenant: str, cache_salt: str | None) -> bytes:
    """The prefix-cache partition of a request: its key's tenant and its cache_salt (b"" for
    neither: a keyless server's requests without a salt share one cache)."""
    if not tenant and cache_salt is None:
        return b""
    # Length-prefixed, so no tenant and salt pair can spell another's.
    salt = "" if cache_salt is None else cache_salt
    return f"{len(tenant)}:{tenant}{cache_salt is not None:d}{salt}".encode()


async def _merge(
    request: Request, streams: list[AsyncIterator[RequestOutput]], claim: Claim
) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        queue.put_nowait(ClientDisconnected("client disconnected"))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    watcher = asyncio.create_task(watch())
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        claim.release()
        watcher.cancel()
        for task in tasks:
            task.cancel()
        for task in [*tasks, watcher]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
