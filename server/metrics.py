"""Prometheus metrics under the `loraplex_` prefix, fed from what the engine pushes after each
step (StepStats and an EngineSnapshot) and, at each scrape, a fresh snapshot.

Names follow vLLM's where one exists, so dashboards and LoRA-affinity gateways can reuse their
queries; `loraplex_lora_requests_info` mirrors vLLM's `lora_requests_info` and
`loraplex_cache_config_info` its `cache_config_info`. With `vllm_names` the metrics routers read
are exported a second time under vLLM's own names (server/metrics_vllm.py).

Per-adapter series (request counters, residency) are bounded by `max_adapters`: thousands of
adapters must not mean thousands of series in every scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from server.engine.snapshot import LEVELS, EngineFacts, EngineSnapshot
from server.metrics_vllm import VllmNames

if TYPE_CHECKING:
    from server.engine.stats import StepStats
    from server.training.stats import TrainingStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OTHER_ADAPTERS = "__other__"  # the adapter label of requests past the max_adapters bound
RESIDENCY_MAX_AGE_S = 1.0  # residency is walked again at least this often while scraped


class Metrics:
    """All of the server's metrics, in a registry of their own (one per app)."""

    def __init__(self, model_name: str, max_adapters: int = 100, vllm_names: bool = False) -> None:
        # No `<name>_created` series beside each counter and histogram: dashboards never use
        # them and they double the families a scrape returns (vLLM turns them off too).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.max_adapters = max_adapters
        r, label = self.registry, ["model_name"]

        def gauge(name: str, doc: str, labels: list[str] = label) -> Gauge:
            return Gauge(f"loraplex_{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = label) -> Counter:
            return Counter(f"loraplex_{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"loraplex_{name}", doc, label, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of pool pages holding KV blocks.")
        self.pool_pages = gauge(
            "pool_pages",
            "Page pool pages by use (kv: held by requests, kv_cached: cached prefix blocks no "
            "request holds, adapter, free).",
            ["model_name", "kind"],
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Prompt tokens whose KV the prefix cache already held."
        )
        self.prefix_blocks = gauge(
            "prefix_cache_blocks", "KV blocks findable in the prefix cache (held or idle)."
        )
        self.prefix_reclaimed = counter(
            "prefix_cache_reclaimed_blocks",
            "Cached prefix blocks evicted for room, or dropped with their adapter version.",
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Sequences preempted for recompute.")
        self.request_success = counter(
            "request_success", "Finished requests.", ["model_name", "finished_reason"]
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.prompt_len = histogram(
            "request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS
        )
        self.gen_len = histogram(
            "request_generation_tokens", "Generated length of finished requests.", TOKEN_BUCKETS
        )
        self.adapters_registered = gauge("adapters_registered", "Adapters in the registry.")
        self.adapters_host = gauge("adapters_host_resident", "Adapters cached in host memory.")
        self.adapters_device = gauge("adapters_device_resident", "Adapters in the device pool.")
        self.adapter_loads = counter("adapter_loads", "Adapter loads into the device pool.")
        self.adapter_evictions = counter("adapter_evictions", "Adapters evicted from the pool.")
        self.adapter_disk_loads = counter("adapter_disk_loads", "Adapter reads from disk.")
        self.adapter_load_latency = histogram(
            "adapter_load_seconds", "Time to make an adapter resident.", LOAD_BUCKETS
        )
        self.adapter_requests = counter(
            "adapter_requests",
            f"Requests per adapter (past the first max_adapters names: {OTHER_ADAPTERS}).",
            ["model_name", "adapter"],
        )
        self.adapter_residency = gauge(
            "lora_adapter_residency",
            "1 per adapter at its level (gpu, cpu, disk); at most max_adapters series, gpu first.",
            ["model_name", "adapter", "level"],
        )
        self.cache_info = gauge(
            "cache_config_info",
            "Page pool and adapter cache configuration, in the labels (value 1).",
            ["model_name", *CACHE_INFO_LABELS],
        )
        self.lora_info = gauge(
            "lora_requests_info",
            "Running and waiting adapters (value: update time), for LoRA-aware routers.",
            ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        self._lora_info_labels: tuple[str, ...] | None = None
        self._last_counts = {"loads": 0, "evictions": 0, "disk": 0}
        self._last_prefix = {"queries": 0, "hits": 0, "reclaimed": 0}
        self._counted_adapters: set[str] = set()  # names with a request series of their own
        self._residency: dict[str, str] = {}  # adapter -> level, as exported
        self._residency_moved: tuple[int, ...] | None = None  # AdapterCounts.moves at the walk
        self._residency_at = 0.0  # monotonic time of the last walk
        self._cache_info_set = False
        # The step thread's hook and the event loop's scrapes both update the state above.
        self._lock = threading.Lock()
        if vllm_names:
            own = [v for v in vars(self).values() if isinstance(v, MetricWrapperBase)]
            r.register(VllmNames(own))

    def _adapter_label(self, name: str) -> str:
        """The name itself for the first max_adapters names seen, then OTHER_ADAPTERS."""
        if name not in self._counted_adapters:
            if len(self._counted_adapters) >= self.max_adapters:
                return OTHER_ADAPTERS
            self._counted_adapters.add(name)
        return name

    def watch_training(self, stats: Callable[[], TrainingStats]) -> None:
        """Report fine-tuning jobs from `stats()`, read at each scrape (once per registry)."""
        self.registry.register(TrainingCollector(self.model_name, stats))

    def observe_step(self, stats: StepStats, state: EngineSnapshot) -> None:
        """Step-thread hook: fold in what the last step did and the state it left."""
        m = self.model_name
        with self._lock:
            self.prompt_tokens.labels(m).inc(stats.num_prompt_tokens)
            self.generation_tokens.labels(m).inc(stats.num_generation_tokens)
            self.preemptions.labels(m).inc(stats.num_preemptions)
            for hist, values in (
                (self.ttft, stats.time_to_first_token),
                (self.itl, stats.inter_token_latency),
                (self.e2e, stats.e2e_latency),
                (self.queue, stats.queue_time),
                (self.prompt_len, stats.prompt_lengths),
                (self.gen_len, stats.generation_lengths),
                (self.adapter_load_latency, stats.adapter_load_seconds),
            ):
                for v in values:
                    hist.labels(m).observe(v)
            for reason, n in stats.finished.items():
                self.request_success.labels(m, reason).inc(n)
            for name, n in stats.adapter_requests.items():
                self.adapter_requests.labels(m, self._adapter_label(name)).inc(n)
            self._observe_state(state)

    def wants_levels(self, state: EngineSnapshot) -> bool:
        """Whether a scrape should walk every adapter's residency: too slow for each step with
        thousands registered, and endpoint pickers scrape many times a second, so the walk is
        skipped while nothing moved (for at most RESIDENCY_MAX_AGE_S)."""
        moved = state.adapters.moves if state.adapters is not None else ()
        with self._lock:
            stale = time.monotonic() - self._residency_at >= RESIDENCY_MAX_AGE_S
            return moved != self._residency_moved or stale

    def observe_scrape(self, state: EngineSnapshot, levels: dict[str, str] | None) -> None:
        """At a scrape: the gauges from a fresh snapshot, and each adapter's residency level
        when walked (wants_levels)."""
        with self._lock:
            self._observe_state(state)
            if levels is not None:
                self._set_residency(levels)
                self._residency_moved = state.adapters.moves if state.adapters else ()
                self._residency_at = time.monotonic()

    def _observe_state(self, state: EngineSnapshot) -> None:
        m = self.model_name
        self.running.labels(m).set(state.num_running)
        self.waiting.labels(m).set(state.num_waiting)
        pool = state.pool
        self.kv_usage.labels(m).set(pool.kv_usage)
        self.pool_pages.labels(m, "kv").set(pool.kv)
        self.pool_pages.labels(m, "kv_cached").set(pool.kv_cached)
        self.pool_pages.labels(m, "adapter").set(pool.adapter)
        self.pool_pages.labels(m, "free").set(pool.free)
        prefix = state.prefix
        if prefix is not None:
            self.prefix_blocks.labels(m).set(prefix.cached_blocks)
            counts = {
                "queries": prefix.queried_tokens,
                "hits": prefix.hit_tokens,
                "reclaimed": prefix.reclaimed_blocks,
            }
            # A scrape's snapshot may be observed after a newer one from a step hook: a
            # counter only moves forward, to the newest count seen.
            for key, metric in (
                ("queries", self.prefix_queries),
                ("hits", self.prefix_hits),
                ("reclaimed", self.prefix_reclaimed),
            ):
                last = self._last_prefix[key]
                series = metric.labels(m)  # exported from the first scrape, at 0 until it moves
                if counts[key] > last:
                    series.inc(counts[key] - last)
                    self._last_prefix[key] = counts[key]
        if not self._cache_info_set:
            self.cache_info.labels(m, *cache_info(state.facts)).set(1)
            self._cache_info_set = True
        adapters = state.adapters
        if adapters is None:
            return
        self.adapters_registered.labels(m).set(adapters.registered)
        self.adapters_host.labels(m).set(adapters.host_resident)
        self.adapters_device.labels(m).set(adapters.device_resident)
        counts = {
            "loads": adapters.loads,
            "evictions": adapters.evictions,
            "disk": adapters.disk_loads,
        }
        for key, metric in (
            ("loads", self.adapter_loads),
            ("evictions", self.adapter_evictions),
            ("disk", self.adapter_disk_loads),
        ):
            metric.labels(m).inc(counts[key] - self._last_counts[key])
        self._last_counts = counts
        labels = (
            m,
            str(state.facts.max_loras),
            ",".join(state.running_adapters),
            ",".join(state.waiting_adapters),
        )
        if labels != self._lora_info_labels:
            if self._lora_info_labels is not None:
                self.lora_info.remove(*self._lora_info_labels)
            self._lora_info_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def _set_residency(self, levels: dict[str, str]) -> None:
        """One series per adapter at its level, gpu first, at most max_adapters of them."""
        m = self.model_name
        ranked = sorted(levels.items(), key=lambda kv: (LEVELS.index(kv[1]), kv[0]))
        wanted = dict(ranked[: self.max_adapters])
        for name, level in self._residency.items():
            if wanted.get(name) != level:
                self.adapter_residency.remove(m, name, level)
        for name, level in wanted.items():
            self.adapter_residency.labels(m, name, level).set(1)
        self._residency = wanted


CACHE_INFO_LABELS = (
    "block_size",
    "num_gpu_blocks",
    "page_bytes",
    "cache_dtype",
    "max_loras",
    "max_lora_rank",
    "host_cache_mb",
)


def cache_info(facts: EngineFacts) -> tuple[str, ...]:
    """CACHE_INFO_LABELS' values. vLLM's names: a pool page holds one KV block (or adapter rows),
    so every page counts as a block; `num_gpu_blocks` is the pool's size on any device."""
    return tuple(
        str(v)
        for v in (
            facts.block_size,
            facts.num_pages,
            facts.page_bytes,
            facts.cache_dtype,
            facts.max_loras,
            facts.max_lora_rank,
            facts.host_cache_mb,
        )
    )


class TrainingCollector(Collector):
    """Fine-tuning gauges, built at scrape time so a finished job's series go with it."""

    def __init__(self, model_name: str, stats: Callable[[], TrainingStats]) -> None:
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m, stats = self.model_name, self.stats()
        jobs = GaugeMetricFamily(
            "loraplex_fine_tuning_jobs",
            "Fine-tuning jobs by status.",
            labels=["model_name", "status"],
        )
        for status, count in stats.jobs_by_status.items():
            jobs.add_metric([m, status], count)
        yield jobs
        queue = GaugeMetricFamily(
            "loraplex_fine_tuning_queue_length",
            "Fine-tuning jobs waiting to train (validating_files or queued).",
            labels=["model_name"],
        )
        queue.add_metric([m], stats.queue_length)
        yield queue
        per_job = {
            "step": "Optimizer steps done by the running job.",
            "total_steps": "Optimizer steps the running job will take.",
            "tokens_per_second": "Training tokens per second of the running job's latest step.",
            "train_loss": "The running job's latest step loss (per trained token).",
            "validation_loss": "The running job's latest validation loss.",
        }
        for name, doc in per_job.items():
            family = GaugeMetricFamily(
                f"loraplex_fine_tuning_{name}", doc, labels=["model_name", "job_id"]
            )
            for job in stats.running:
                value = getattr(job, "valid_loss" if name == "validation_loss" else name)
                if value is not None:
                    family.add_metric([m, job.job_id], value)
            yield family
