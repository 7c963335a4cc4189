"""AdapterLoader: adapters' weights brought into host memory off the step thread, and held
there for the requests about to be admitted, so the step thread never waits on a disk.

The step thread asks whether an adapter is ready (`ready`): weights already in the host
cache are held at once; otherwise a read is queued on the loader's own thread and the request
keeps waiting while other requests step. Admission then takes the held weights (`take`) to
copy them into the page pool. The lock is held only to hand results over, never during a
read. At most `max_held` adapters are being read or held: they may exceed the host cache's
budget (a cache too small for them would otherwise drop them before admission).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters.format import AdapterWeights
    from adapters.registry import AdapterRegistry

from server.model.cpu_runtime import TransientThreadExecutor

logger = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter's weights could not be read; the requests waiting for it end with this."""


class AdapterLoader:
    """Host-memory weights of the adapters waiting requests need, read on a thread of its own."""

    def __init__(self, registry: AdapterRegistry, max_held: int) -> None:
        self.registry = registry
        self.max_held = max_held
        self._lock = threading.Lock()
        self._reading: set[int] = set()  # queued or being read
        self._held: dict[int, AdapterWeights | BaseException] = {}  # read (or failed), or cached
        # A thread that ends when idle: see server.model.cpu_runtime.
        self._executor = TransientThreadExecutor(1, "loraplex-loader")
        # Called (on the loader's thread) when a read ends: wakes a step loop that had nothing
        # to run but the requests waiting for it.
        self.on_read: Callable[[], None] | None = None

    def ready(self, adapter_id: int) -> bool:
        """Whether the adapter's weights are held for admission (step thread). If not, a read
        is queued (room permitting: else asked again at a later step); raises
        AdapterLoadError, once, when the read failed."""
        with self._lock:
            held = self._held.get(adapter_id)
            if isinstance(held, BaseException):
                del self._held[adapter_id]
                raise AdapterLoadError(str(held)) from held
            if held is not None:
                return True
            if adapter_id in self._reading or len(self._reading) + len(self._held) >= self.max_held:
                return False
        cached = self.registry.cached_weights(adapter_id)  # never a disk read
        with self._lock:
            if cached is not None:
                self._held[adapter_id] = cached
                return True
            self._reading.add(adapter_id)
        self._executor.submit(self._read, adapter_id)
        return False

    def _read(self, adapter_id: int) -> None:
        result: AdapterWeights | BaseException
        try:
            result = self.registry.weights(adapter_id)  # the disk read, under no lock of ours
        except Exception as exc:
            logger.warning("reading adapter %d failed: %s", adapter_id, exc)
            result = exc
        with self._lock:
            if adapter_id in self._reading:  # else discarded meanwhile
                self._reading.discard(adapter_id)
                self._held[adapter_id] = result
        if self.on_read is not None:
            self.on_read()

    def take(self, adapter_id: int) -> AdapterWeights:
        """The held weights, handed over for admission (step thread, after ready())."""
        with self._lock:
            weights = self._held.pop(adapter_id)
        assert not isinstance(weights, BaseException), "take() only after ready() said so"
        return weights

    def discard(self, adapter_id: int) -> None:
        """Forget the adapter (unregistered): a read under way is dropped when it ends."""
        with self._lock:
            self._reading.discard(adapter_id)
            self._held.pop(adapter_id, None)

    def keep_only(self, adapter_ids: set[int]) -> None:
        """Let go of held weights that no request near the head of the queue wants (their
        requests were admitted another way, aborted, or fell behind)."""
        with self._lock:
            for adapter_id in [a for a in self._held if a not in adapter_ids]:
                del self._held[adapter_id]

    @property
    def num_held(self) -> int:
        """Adapters being read or held."""
        with self._lock:
            return len(self._reading) + len(self._held)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
