"""What one engine step did, for metrics: token counts, latencies, finishes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StepStats:
    num_prompt_tokens: int = 0  # prefill tokens computed (first time, not recompute)
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    e2e_latency: list[float] = field(default_factory=list)
    queue_time: list[float] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)  # of finished requests
    generation_lengths: list[int] = field(default_factory=list)
    finished: Counter[str] = field(default_factory=Counter)  # finish reason -> count
    adapter_requests: Counter[str] = field(default_factory=Counter)  # adapter name -> new
    adapter_load_seconds: list[float] = field(default_factory=list)
