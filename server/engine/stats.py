"""What one engine step did, for metrics: token counts, latencies, finishes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.sequence import Sequence


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

    def record_token(self, seq: Sequence, now: float) -> None:
        """seq got a token at `now` (its first: time to first token; else the gap)."""
        self.num_generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.num_prompt_tokens += seq.num_prompt_tokens
            self.time_to_first_token.append(now - seq.arrival_time)
        else:
            assert seq.last_token_time is not None
            self.inter_token_latency.append(now - seq.last_token_time)
        seq.last_token_time = now

    def record_finish(self, seq: Sequence, now: float) -> None:
        self.finished[seq.finish_reason or "abort"] += 1
        self.e2e_latency.append(now - seq.arrival_time)
        if seq.first_scheduled_time is not None:
            self.queue_time.append(seq.first_scheduled_time - seq.arrival_time)
        self.prompt_lengths.append(seq.num_prompt_tokens)
        self.generation_lengths.append(seq.num_output_tokens)
