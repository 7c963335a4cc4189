"""`--metrics-vllm-names`: the metrics routers and vLLM dashboards read, under vLLM's names too.

Some tools (gateway endpoint pickers with vLLM defaults, vLLM's Grafana dashboard) only know
`vllm:` names. This collector re-exports our families under those names at each scrape, from the
same metric objects, so the two sets never disagree. Off by default: it doubles those series.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Our family (the `loraplex_` name less the prefix) -> vLLM's names for it.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("vllm:num_requests_running",),
    "num_requests_waiting": ("vllm:num_requests_waiting",),
    # vLLM V1's name, and the V0 one older endpoint pickers still default to.
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "lora_requests_info": ("vllm:lora_requests_info",),
    "cache_config_info": ("vllm:cache_config_info",),
    "prompt_tokens": ("vllm:prompt_tokens",),
    "generation_tokens": ("vllm:generation_tokens",),
    "num_preemptions": ("vllm:num_preemptions",),
    "prefix_cache_queries": ("vllm:prefix_cache_queries",),
    "prefix_cache_hits": ("vllm:prefix_cache_hits",),
    "request_success": ("vllm:request_success",),
    "time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("vllm:inter_token_latency_seconds",),
    "e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "request_queue_time_seconds": ("vllm:request_queue_time_seconds",),
    "request_prompt_tokens": ("vllm:request_prompt_tokens",),
    "request_generation_tokens": ("vllm:request_generation_tokens",),
}


def renamed(family: Metric, name: str) -> Metric:
    """A copy of `family` under `name`; each sample's suffix (_total, _bucket, ...) is kept."""
    copy = Metric(name, family.documentation, family.type, family.unit)
    copy.samples = [s._replace(name=name + s.name[len(family.name) :]) for s in family.samples]
    return copy


class VllmNames(Collector):
    """Yields those of `metrics` named in VLLM_NAMES again, renamed, at each collection."""

    def __init__(self, metrics: Iterable[MetricWrapperBase]) -> None:
        by_family = {f"loraplex_{ours}": names for ours, names in VLLM_NAMES.items()}
        self._metrics = [m for m in metrics if m.describe()[0].name in by_family]
        self._by_family = by_family
        missing = set(by_family) - {m.describe()[0].name for m in self._metrics}
        assert not missing, f"VLLM_NAMES names families that do not exist: {sorted(missing)}"

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                for name in self._by_family[family.name]:
                    yield renamed(family, name)
