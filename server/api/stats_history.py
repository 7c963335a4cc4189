"""A short in-memory history of serving stats (rates, latencies, queues, pool split), sampled by
the server every few seconds from its own Prometheus registry, for the console's overview."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

from server.metrics import Metrics

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 2.0
HISTORY_S = 600.0  # ten minutes


@dataclass(frozen=True)
class _Totals:
    """Cumulative counters at one instant; rates come from the difference of two."""

    time: float
    prompt_tokens: float
    generation_tokens: float
    requests: float
    ttft_sum: float
    ttft_count: float
    e2e_sum: float
    e2e_count: float


@dataclass(frozen=True)
class StatsSample:
    """One point of the history: the state at `time`, and rates since the previous point."""

    time: float  # unix seconds
    running: int
    waiting: int
    kv_pages: int  # held by requests
    cached_pages: int  # cached prefix blocks no request holds
    adapter_pages: int
    free_pages: int
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    requests_per_s: float
    mean_ttft_s: float | None  # None: no request got its first token in the interval
    mean_e2e_latency_s: float | None  # None: no request finished in the interval
    adapters_host: int  # adapters whose weights are cached in host memory
    adapters_device: int  # adapters in the device pool
    # New requests per adapter in the interval (adapters with none are left out).
    adapter_requests: dict[str, int] = field(default_factory=dict)


class StatsHistory:
    """A ring of StatsSamples over the last `history_s` seconds; `run()` fills it."""

    def __init__(
        self,
        metrics: Metrics,
        interval_s: float = SAMPLE_INTERVAL_S,
        history_s: float = HISTORY_S,
    ) -> None:
        assert interval_s > 0 and history_s >= interval_s
        self.metrics = metrics
        self.interval_s = interval_s
        self.history_s = history_s
        self.samples: deque[StatsSample] = deque(maxlen=int(history_s / interval_s) + 1)
        self._last: _Totals | None = None
        self._last_adapter_requests: dict[str, float] = {}

    def _value(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(
            f"loraplex_{name}", {"model_name": self.metrics.model_name, **labels}
        )
        return value or 0.0

    def _totals(self, now: float) -> _Totals:
        v = self._value
        return _Totals(
            time=now,
            prompt_tokens=v("prompt_tokens_total"),
            generation_tokens=v("generation_tokens_total"),
            requests=v("e2e_request_latency_seconds_count"),
            ttft_sum=v("time_to_first_token_seconds_sum"),
            ttft_count=v("time_to_first_token_seconds_count"),
            e2e_sum=v("e2e_request_latency_seconds_sum"),
            e2e_count=v("e2e_request_latency_seconds_count"),
        )

    def _adapter_requests(self) -> dict[str, float]:
        """Requests per adapter since start, from the counter's series (one per adapter used)."""
        totals: dict[str, float] = {}
        for family in self.metrics.adapter_requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["model_name"] == self.metrics.model_name:
                    totals[s.labels["adapter"]] = s.value
        return totals

    def sample(self, now: float | None = None) -> StatsSample | None:
        """Record one point (the first call only sets the baseline and records nothing).

        The gauges are those the engine's step hook set after its last step or call, so they
        are current without a trip to the step thread.
        """
        totals = self._totals(time.time() if now is None else now)
        last, self._last = self._last, totals
        adapters = self._adapter_requests()
        last_adapters, self._last_adapter_requests = self._last_adapter_requests, adapters
        if last is None or totals.time <= last.time:
            return None
        dt = totals.time - last.time

        def mean(total: float, prev_total: float, count: float, prev_count: float) -> float | None:
            n = count - prev_count
            return (total - prev_total) / n if n > 0 else None

        point = StatsSample(
            time=totals.time,
            running=int(self._value("num_requests_running")),
            waiting=int(self._value("num_requests_waiting")),
            kv_pages=int(self._value("pool_pages", kind="kv")),
            cached_pages=int(self._value("pool_pages", kind="kv_cached")),
            adapter_pages=int(self._value("pool_pages", kind="adapter")),
            free_pages=int(self._value("pool_pages", kind="free")),
            prompt_tokens_per_s=(totals.prompt_tokens - last.prompt_tokens) / dt,
            generation_tokens_per_s=(totals.generation_tokens - last.generation_tokens) / dt,
            requests_per_s=(totals.requests - last.requests) / dt,
            mean_ttft_s=mean(totals.ttft_sum, last.ttft_sum, totals.ttft_count, last.ttft_count),
            mean_e2e_latency_s=mean(totals.e2e_sum, last.e2e_sum, totals.e2e_count, last.e2e_count),
            adapters_host=int(self._value("adapters_host_resident")),
            adapters_device=int(self._value("adapters_device_resident")),
            adapter_requests={
                name: int(n - last_adapters.get(name, 0.0))
                for name, n in adapters.items()
                if n > last_adapters.get(name, 0.0)
            },
        )
        self.samples.append(point)
        return point

    def since(self, seconds: float) -> list[dict]:
        """The points of the last `seconds`, oldest first, as plain dicts (per-adapter counts
        are left out: `hot_adapters` sums them)."""
        if not self.samples:
            return []
        cutoff = self.samples[-1].time - seconds
        points = [asdict(s) for s in self.samples if s.time > cutoff]
        for point in points:
            del point["adapter_requests"]
        return points

    def hot_adapters(self, seconds: float, top: int = 10) -> list[dict]:
        """The adapters with the most new requests in the last `seconds`, most first."""
        if not self.samples:
            return []
        cutoff = self.samples[-1].time - seconds
        counts: Counter[str] = Counter()
        for point in self.samples:
            if point.time > cutoff:
                counts.update(point.adapter_requests)
        return [{"adapter": name, "requests": n} for name, n in counts.most_common(top)]

    def requests_served(self, adapter_name: str) -> int:
        """Requests this server has run for an adapter since it started."""
        return int(self._value("adapter_requests_total", adapter=adapter_name))

    async def run(self) -> None:
        """Sample every interval until cancelled."""
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("stats sample failed")
            await asyncio.sleep(self.interval_s)
