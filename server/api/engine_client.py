"""The EngineClient the inference services use: admission checks, then the engine's streams of
several requests merged into one API call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request

from server.api.errors import BadRequest, ClientDisconnected, Overloaded, Unavailable
from server.engine.async_engine import AsyncLLMEngine
from server.engine.llm_engine import Prompt
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams

DISCONNECT_POLL_SECONDS = 0.5


class ServingClient:
    """Admission (503 until ready, 429 when the queue is full) and generation over the engine."""

    def __init__(
        self, engine: AsyncLLMEngine, max_waiting: int, is_ready: Callable[[], bool]
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.is_ready = is_ready

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
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several engine requests as one API call: (index, output) as outputs arrive.

        Every request is validated here, before any is queued (so errors surface before a
        response starts); leaving the iteration early, or the client going away, aborts all.
        """
        self.check_serving(len(prompts))
        seqs = [
            self.engine.prepare(p, sp, adapter_name=adapter, adapter_id=adapter_id)
            for p, sp in zip(prompts, params, strict=True)
        ]
        return _merge(request, [self.engine.stream(s) for s in seqs])


async def _merge(
    request: Request, streams: list[AsyncIterator[RequestOutput]]
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
        watcher.cancel()
        for task in tasks:
            task.cancel()
        for task in [*tasks, watcher]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
