"""What the engine reports per request per step, and the text state behind it."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.sequence import TokenLogprob
from server.model.tokenizer import IncrementalDecoder


@dataclass
class RequestOutput:
    """One step's news for one request: new tokens and text, and whether it has finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    token_ids: list[int]  # all output tokens so far
    text: str  # all released output text so far
    finished: bool
    num_prompt_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Every prompt token's (the first has none), on the request's first output, when asked.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    adapter_name: str | None = None
    error: str | None = None  # why the engine ended it, when finish_reason is "error"
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


class OutputText:
    """A sequence's decoded text, holding back a tail that could still start a stop string,
    so streamed text always equals the final text."""

    def __init__(self, decoder: IncrementalDecoder, stop: list[str]) -> None:
        self._decoder = decoder
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.released = 0

    def append(self, token_id: int) -> str | None:
        """Add a token's text; returns the stop string if one now appears (text cut before it)."""
        before = len(self.text)
        self.text += self._decoder.step(token_id)
        if not self._stop or len(self.text) == before:
            return None
        window = max(0, before - self._hold)
        hits = [(i, s) for s in self._stop if (i := self.text.find(s, window)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        return stop

    def take(self, finished: bool) -> str:
        """Text not yet released: all of it when finished, else all but the held-back tail."""
        end = len(self.text) if finished else max(self.released, len(self.text) - self._hold)
        delta = self.text[self.released : end]
        self.released = end
        return delta
