"""RequestFactory: a request checked and made into a Sequence on the caller's thread (the event
loop's tokenizer threads), before it is queued, so the step thread gets only sound work.

It reads what is fixed once the engine is built (tokenizer, limits, pool size) and the
registry, which is thread-safe; never the scheduler nor the adapter residency, which belong
to the step thread.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from server.engine.errors import AdapterVersionGoneError, InvalidRequestError, UnknownAdapterError
from server.engine.grammar import GrammarCompiler
from server.engine.logits_processors import LogitsState
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from server.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from adapters.config import AdapterSpec
    from adapters.registry import AdapterRegistry

Prompt = str | list[int]


class RequestFactory:
    """Validates requests and builds their sequences (any thread)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        grammars: GrammarCompiler,
        vocab_size: int,
        max_model_len: int,
        registry: AdapterRegistry | None,
        kv_pages: Callable[[int], int],
        adapter_pages: Callable[[AdapterSpec], int] | None,
        num_pages: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.registry = registry
        self.kv_pages = kv_pages  # KV pages a sequence of n tokens needs at most
        self.adapter_pages = adapter_pages  # pages an adapter takes in the pool
        self.num_pages = num_pages
        self.device = device
        self._seed_rng = random.Random(seed)

    def make(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        adapter_name: str | None = None,
        adapter_id: int | None = None,
    ) -> Sequence:
        """Validate a request and build its sequence, without queuing it.

        `adapter_id` pins the adapter's version the caller prepared the prompt for (its chat
        template): the request runs on that version even if a reload replaced it since, or
        fails if that version is gone, rather than run another version's weights."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.vocab_size
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab}); got {bad[0]!r}", "prompt"
                )
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens",
                "prompt",
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {len(ids)} and max_tokens asks for {params.max_tokens} more",
                "max_tokens",
            )
        seq = Sequence(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=ids,
            params=params,
            adapter_name=adapter_name,
        )
        if adapter_name is not None:
            reg = self.registry.get(adapter_name) if self.registry is not None else None
            if reg is None:
                raise UnknownAdapterError(f"adapter {adapter_name!r} does not exist", "model")
            if adapter_id is not None:
                if adapter_id != reg.adapter_id:
                    reg = self.registry.by_id(adapter_id)
                    if reg is None or reg.name != adapter_name:
                        raise AdapterVersionGoneError(adapter_name)
                seq.adapter_pinned = True
            seq.adapter_id = reg.adapter_id
            seq.rope_scale = reg.spec.rope_scaling_factor
            self._check_fits(seq, reg.spec, len(ids) + params.max_tokens)
        seq.logits = LogitsState.build(
            params, self.grammars, self.tokenizer.eos_token_ids, self.device
        )
        if not params.greedy:
            seq.seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        return seq

    def _check_fits(self, seq: Sequence, spec: AdapterSpec, max_tokens_total: int) -> None:
        """Refuse a request whose KV at its longest plus its adapter's pages exceed the whole
        pool: it could never run, and waiting for it would hold back its adapter's queue."""
        if self.adapter_pages is None:
            return
        kv_pages = self.kv_pages(max_tokens_total)
        adapter_pages = self.adapter_pages(spec)
        if kv_pages + adapter_pages > self.num_pages:
            raise InvalidRequestError(
                f"prompt plus max_tokens needs {kv_pages} KV pages and adapter "
                f"{seq.adapter_name!r} {adapter_pages} more, but the page pool has "
                f"{self.num_pages} in all; lower max_tokens or shorten the prompt",
                "max_tokens",
            )
