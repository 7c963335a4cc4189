"""SamplingParams: how one request's tokens are chosen and when it stops, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.engine.grammar import Grammar

MAX_LOGPROBS = 20
# The step thread checks every stop string and stop token after every token: bounded work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024  # entries; each is one indexed add per step
MAX_BIAS = 100.0  # OpenAI's bound: -100 bans a token, +100 all but forces it
# Temperatures below this are greedy (vLLM's rule): 1e-45 is 1.4e-45 in float32, and logits
# divided by it overflow; near 1e-5 sampling already differs from argmax only between logits
# closer than about 1e-4.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 (or below MIN_TEMPERATURE) is greedy; top_k <= 0
    and top_p 1 disable those."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Any = field(default_factory=list)
    stop_token_ids: Any = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many were made
    grammar: Grammar | None = None  # the output must match it

    def __post_init__(self) -> None:
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        _check(isinstance(self.max_tokens, int), "max_tokens must be an integer", "max_tokens")
        _check(
            self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens"
        )
        _check(
            self.temperature >= 0,
            f"temperature must be >= 0, got {self.temperature}",
            "temperature",
        )
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check(isinstance(self.top_k, int), "top_k must be an integer", "top_k")
        _check(
            -(2**63) <= self.top_k < 2**63,
            f"top_k must be below 2**63 (any value >= the vocabulary size keeps every token), "
            f"got {self.top_k}",
            "top_k",
        )
        _check(
            self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            "repetition_penalty",
        )
        _check(
            -2 <= self.presence_penalty <= 2,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            "presence_penalty",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            "frequency_penalty",
        )
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                "logprobs",
            )
        if self.seed is not None:
            _check(
                isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                f"seed must be an integer in [0, 2**63), got {self.seed!r}",
                "seed",
            )

        self._check_logits_options()

    def _check_logits_options(self) -> None:
        if self.logit_bias:
            _check(
                len(self.logit_bias) <= MAX_LOGIT_BIAS,
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}",
                "logit_bias",
            )
            for token, bias in self.logit_bias.items():
                # The upper bound, the vocabulary, is the engine's to check (LogitsState.build).
                _check(
                    isinstance(token, int) and token >= 0,
                    f"logit_bias keys must be token ids, got {token!r}",
                    "logit_bias",
                )
                _check(
                    -MAX_BIAS <= bias <= MAX_BIAS,
                    f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                    "logit_bias",
                )
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
            f"got {self.min_tokens!r}",
            "min_tokens",
        )
        if self.grammar is not None:
            # A grammar decides where the output ends: it allows only EOS once complete.
            _check(
                not self.min_tokens,
                "min_tokens cannot be combined with structured output or tool calls",
                "min_tokens",
            )
            _check(
                not self.ignore_eos,
                "ignore_eos cannot be combined with structured output or tool calls",
                "ignore_eos",
            )

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one below MIN_TEMPERATURE: taken as greedy."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param)


def _normalize_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        got = type(stop).__name__ if not isinstance(stop, list | tuple) else "a list with "
        if isinstance(stop, list | tuple):
            got += ", ".join(sorted({type(s).__name__ for s in stop if not isinstance(s, str)}))
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {got}", "stop")
    if any(s == "" for s in stop):
        raise InvalidRequestError("stop strings must not be empty", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop"
        )
    longest = max(len(s) for s in stop) if stop else 0
    if longest > MAX_STOP_CHARS:
        raise InvalidRequestError(
            f"stop strings may be at most {MAX_STOP_CHARS} characters, got one of {longest}",
            "stop",
        )
    return list(stop)


def _normalize_stop_token_ids(ids: Any) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, list | tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise InvalidRequestError("stop_token_ids must be a list of integers", "stop_token_ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
            "stop_token_ids",
        )
    return list(ids)
