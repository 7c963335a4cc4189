"""The serving process's CPU runtime: transient worker threads, the allocator's settings."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest
import torch

from server.model.cpu_runtime import TransientThreadExecutor, tune_allocator


def _wait(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


def test_runs_tasks_and_returns_results_and_errors() -> None:
    pool = TransientThreadExecutor(2, "t")
    assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=5) == 5
    failed = pool.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=5)
    pool.shutdown()


def test_threads_end_when_no_task_waits() -> None:
    """The point of the pool: a thread that ran a parallel torch op (and so owns an OpenMP
    team) is gone once idle, where a ThreadPoolExecutor's worker would live on."""
    pool = TransientThreadExecutor(1, "loraplex-test")
    names: list[str] = []
    threads: list[threading.Thread] = []

    def work() -> float:
        names.append(threading.current_thread().name)
        threads.append(threading.current_thread())
        return float(torch.ones(4_000_000).mul(2).sum())  # past the grain: a parallel op

    assert pool.submit(work).result(timeout=10) == 8_000_000.0
    assert _wait(lambda: pool.live_threads() == 0)
    threads[0].join(timeout=5)  # it leaves the pool's count just before it ends
    assert not threads[0].is_alive()
    # A later task starts a fresh thread.
    assert pool.submit(work).result(timeout=10) == 8_000_000.0
    assert names[1] != names[0] and names[1].startswith("loraplex-test_")
    pool.shutdown()


def test_at_most_max_workers_run_at_once() -> None:
    pool = TransientThreadExecutor(2, "t")
    lock, running, peak = threading.Lock(), [0], [0]
    release = threading.Event()

    def task() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(5)
        with lock:
            running[0] -= 1

    futures = [pool.submit(task) for _ in range(6)]
    assert _wait(lambda: running[0] == 2)
    time.sleep(0.1)  # room for a third to start, were the pool to allow one
    assert pool.live_threads() == 2
    release.set()
    for f in futures:
        f.result(timeout=5)
    assert peak[0] == 2
    pool.shutdown()
    assert pool.live_threads() == 0


def test_shutdown_refuses_new_tasks_and_can_cancel_queued_ones() -> None:
    pool = TransientThreadExecutor(1, "t")
    gate, started = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(5)

    first = pool.submit(hold)
    queued = pool.submit(lambda: "never")
    assert started.wait(5)  # the first task is running; the second waits for its thread
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)
    gate.set()
    assert first.result(timeout=5) is True


def test_serves_as_asyncio_default_executor() -> None:
    """asyncio (3.11+) takes only a ThreadPoolExecutor as its default: to_thread runs on it."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(TransientThreadExecutor(2, "loop-worker"))
        return await asyncio.to_thread(lambda: threading.current_thread().name)

    assert asyncio.run(main()).startswith("loop-worker_")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_allocator_takes_on_glibc() -> None:
    assert tune_allocator() is True
