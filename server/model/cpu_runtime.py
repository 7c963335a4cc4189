"""The serving process's CPU runtime: one compute thread, and an allocator that keeps pages.

Two effects, each measured on SmolLM2's serving workload (bench/vs_vllm.py, 2 cores), that
sit below the model's code:

- **OpenMP's waits.** PyTorch's CPU ops run on libgomp teams, one team per thread that calls
  them, and a team's workers spin between parallel regions only while libgomp manages no more
  threads than there are CPUs; past that they sleep at once, and every op pays a futex wake.
  A server thread that once ran a large torch op (the model's build, an adapter read, a
  merge) keeps its team for as long as it lives, so a long-lived pool thread left the step
  thread's team throttled for good: elementwise ops ran at one core's speed on two. Work off
  the step thread therefore runs on threads that end when idle (TransientThreadExecutor), and
  their teams end with them.
- **Page faults.** glibc serves allocations past its mmap threshold (a few MiB, moving) with
  fresh mappings and returns freed heap tops to the kernel, so a prefill step's activations
  (MiBs each, hundreds per step) fault in new zeroed pages every step. Raising the mmap
  threshold to its maximum and keeping freed memory (tune_allocator) lets steps reuse pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit: activations up to this reuse heap
TRIM_THRESHOLD = 512 * 2**20  # freed memory kept before the heap top is given back
TOP_PAD = 64 * 2**20  # grown at a time, so a step's peak is reached in few grows


def tune_allocator() -> bool:
    """Keep a serving process's activation memory mapped between steps (glibc only); returns
    whether the allocator was tuned. Call once, early, in the serving process."""
    if not sys.platform.startswith("linux"):
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    if ok:
        mib = 2**20
        logger.debug(
            "glibc malloc: mmap threshold %d MiB, trim threshold %d MiB",
            MMAP_THRESHOLD // mib,
            TRIM_THRESHOLD // mib,
        )
    return ok


_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class TransientThreadExecutor(ThreadPoolExecutor):
    """A thread pool whose threads end as soon as no task waits, at most max_workers at once.

    A ThreadPoolExecutor (asyncio's default executor must be one) in its interface only: its
    own workers live until shutdown, and each that ever ran a large torch op would keep an
    OpenMP team alive beside the step thread's (see the module's docstring). A thread start
    costs about 0.1 ms, nothing beside the disk reads and model work these pools run.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._tasks: deque[_Task] = deque()
        self._mutex = threading.Lock()
        self._live: set[threading.Thread] = set()
        self._closed = False
        self._started = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._mutex:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._tasks.append((future, fn, args, kwargs))
            if len(self._live) < self._max_workers:
                self._started += 1
                name = f"{self._thread_name_prefix}_{self._started}"
                # Not a daemon, as ThreadPoolExecutor's workers: a write in progress (an
                # upload's commit) finishes before the interpreter exits.
                thread = threading.Thread(target=self._work, name=name)
                self._live.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._mutex:
                if not self._tasks:
                    self._live.discard(me)
                    return
                future, fn, args, kwargs = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args, kwargs  # no task's objects held while idle

    def live_threads(self) -> int:
        with self._mutex:
            return len(self._live)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._mutex:
            self._closed = True
            if cancel_futures:
                while self._tasks:
                    self._tasks.popleft()[0].cancel()
            live = list(self._live)
        if wait:
            for thread in live:
                thread.join()
