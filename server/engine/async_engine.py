"""AsyncLLMEngine: the engine's step loop on a background thread, per-request async streams.

The LLMEngine is single-threaded: only the step thread touches it. Callers validate their
request (tokenize, check parameters) on their own thread, then hand the sequence over through
a locked inbox; outputs come back to the event loop with call_soon_threadsafe. Administration
(removing or retiring an adapter, reading the engine's state) is a small typed API whose calls
run on the step thread between steps and return copies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from server.engine.errors import InvalidRequestError
from server.engine.llm_engine import LLMEngine, Prompt
from server.engine.observe import adapter_levels, adapter_usage, engine_facts, snapshot
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.engine.snapshot import AdapterUsage, EngineFacts, EngineSnapshot
from server.engine.stats import StepStats

logger = logging.getLogger(__name__)

T = TypeVar("T")
STALL_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The step loop stopped; the engine serves no more requests."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in it were ended."""


class RequestFailedError(RuntimeError):
    """The engine ended one request with an error of its own (e.g. non-finite values)."""


@dataclass
class _Inbox:
    adds: list[Sequence] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    calls: list[tuple[Callable[[], Any], asyncio.Future]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.adds) + len(self.aborts) + len(self.calls)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # The engine's settings and sizes: fixed, so readable from any thread.
        self.facts: EngineFacts = engine_facts(engine)
        self._inbox = _Inbox()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        # The scheduler's waiting count, copied by the step thread after each change (read
        # under _lock with the inbox, so a request is counted in one of them, never none).
        self._num_queued = 0
        if engine.adapter_cache is not None:  # a finished adapter read may unblock a step
            engine.adapter_cache.loader.on_read = self._wake.set
        self.dead_reason: BaseException | None = None
        # Called on the step thread after every step with what it did and the state it left
        # (metrics); a hook must not block.
        self.step_hooks: list[Callable[[StepStats, EngineSnapshot], None]] = []

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """End the step loop, then the adapter loader's thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.engine.adapter_cache is not None:
            self.engine.adapter_cache.shutdown()

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        adapter_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Leaving the iteration early aborts the request."""
        seq = self.prepare(prompt, params, request_id, adapter_name)
        async for out in self.stream(seq):
            yield out

    def prepare(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        adapter_name: str | None = None,
        adapter_id: int | None = None,
    ) -> Sequence:
        """Validate a request (raises InvalidRequestError) without queuing it."""
        if not self.running:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason or 'stopped'}")
        return self.engine.requests.make(prompt, params, request_id, adapter_name, adapter_id)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Queue a prepared sequence and yield its outputs until it finishes."""
        rid = seq.request_id
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already running")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = queue
        with self._lock:
            self._inbox.adds.append(seq)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    @property
    def num_waiting(self) -> int:
        """Requests queued in the engine or on their way to it (any thread)."""
        with self._lock:
            return len(self._inbox.adds) + self._num_queued

    # ---- administration: typed calls run on the step thread between steps ----------------

    async def remove_adapter(self, name: str) -> None:
        """Unregister an adapter and drop its device copy and cached prefixes; raises
        UnknownAdapterError, or AdapterBusyError while requests use it."""
        await self._call(lambda: self.engine.remove_adapter(name))

    async def retire_adapter(self, adapter_id: int) -> None:
        """An in-place reload replaced this version: free it after its last request."""
        await self._call(lambda: self.engine.retire_adapter(adapter_id))

    async def adapter_usage(self, adapter_ids: list[int]) -> list[AdapterUsage]:
        """Requests and device residency of each adapter version, in order."""
        return await self._call(lambda: adapter_usage(self.engine, adapter_ids))

    async def snapshot(self) -> EngineSnapshot:
        """The engine's state between two steps."""
        return await self._call(lambda: snapshot(self.engine, self.facts))

    async def adapter_levels(self) -> dict[str, str]:
        """Every registered adapter's residency: gpu, cpu or disk."""
        return await self._call(lambda: adapter_levels(self.engine))

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the step thread between steps."""
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            self._inbox.calls.append((fn, future))
        self._wake.set()
        return await future

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.aborts.append(request_id)
        self._wake.set()

    # ---- the step thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self._drain_inbox():
                    self._run_hooks()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as exc:
                    logger.exception("engine step failed; ending the requests in flight")
                    self._fail_all(EngineStepError(f"engine step failed: {exc}"))
                    continue
                self._count_queued()
                self._run_hooks()
                if outputs:
                    self._deliver(outputs)
                if self.engine.stalled:
                    # Requests wait only on adapter reads: sleep until one ends (or an add,
                    # an abort, a call), not spin.
                    self._wake.wait(timeout=STALL_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # pragma: no cover - a bug in the loop itself
            logger.exception("engine loop died")
            self.dead_reason = exc
            self._fail_all(EngineDeadError(f"engine loop died: {exc}"))
            raise

    def _count_queued(self) -> None:
        with self._lock:
            self._num_queued = len(self.engine.scheduler.waiting)

    def _run_hooks(self) -> None:
        if not self.step_hooks:
            return
        stats, state = self.engine.take_stats(), snapshot(self.engine, self.facts)
        for hook in self.step_hooks:
            try:
                hook(stats, state)
            except Exception:
                logger.exception("step hook failed")

    def _drain_inbox(self) -> bool:
        with self._lock:
            inbox, self._inbox = self._inbox, _Inbox()
            self._num_queued += len(inbox.adds)  # counted as queued while they are added
        for seq in inbox.adds:
            try:
                self.engine.add_sequence(seq)
            except Exception as exc:
                self._fail(seq.request_id, exc)
        self._count_queued()
        aborted = [out for rid in inbox.aborts if (out := self.engine.abort_request(rid))]
        if aborted:
            self._deliver(aborted)
        for fn, future in inbox.calls:
            try:
                result = fn()
            except Exception as exc:
                self._settle(future, exc=exc)
            else:
                self._settle(future, result=result)
        return len(inbox) > 0

    def _settle(self, future: asyncio.Future, result: Any = None, exc: Exception | None = None):  # type: ignore[no-untyped-def]
        def settle() -> None:
            if future.cancelled():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _fail(self, request_id: str, error: BaseException) -> None:
        assert self._loop is not None

        def fail() -> None:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(error)

        self._loop.call_soon_threadsafe(fail)

    def _deliver(self, items: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._put, items)

    def _put(self, items: list[RequestOutput]) -> None:
        for out in items:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        self.engine.abort_all()
        assert self._loop is not None

        def fail() -> None:
            for queue in self._streams.values():
                queue.put_nowait(error)

        self._loop.call_soon_threadsafe(fail)
