"""Sequence: one request's tokens, cache pages, adapter, and progress through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.sampling_params import SamplingParams
from server.lora.batch import NO_ADAPTER

if TYPE_CHECKING:
    from server.engine.logits_processors import LogitsState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_name: str | None = None
    adapter_id: int = NO_ADAPTER
    adapter_pinned: bool = False  # adapter_id is the version the prompt was prepared for
    rope_scale: float = 1.0
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    # Prefix caching: hashes of the full blocks so far (tokens only grow, so they stay valid),
    # how many leading blocks of block_table are in the prefix cache, and how many prompt
    # tokens the first admission found cached.
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # set with finish_reason "error"
    seed: int = 0  # the sampler's noise is a function of (seed, position, token)
    logits: LogitsState | None = None  # bias, min_tokens, grammar; None when none apply
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted: forget the cache; prompt and output so far will be prefilled again."""
        self.num_computed_tokens = 0
        self.num_cached_blocks = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
