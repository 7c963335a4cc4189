"""Prompts to token ids for the API: cheap bounds first, then the tokenizer off the event loop.

A request's prompt is tokenized once, however many samples (n) it asks for; the engine gets
token ids and never tokenizes on the event loop itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from server.api.clients import ServedModel
from server.api.errors import BadRequest
from server.model.tokenizer import Tokenizer, TokenizerError

T = TypeVar("T")

# A few threads: tokenizing releases the GIL, and more at once would only queue on the cores.
TOKENIZER_THREADS = 2
_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="loraplex-tokenize")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the tokenizer threads (for work that grows with a prompt's length)."""
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


class PromptEncoder:
    """Token ids for one model's prompts, each checked against its context length."""

    def __init__(self, model: ServedModel) -> None:
        self.tok = model.tokenizer
        self.max_model_len = model.max_model_len
        self.vocab_size = model.vocab_size

    def check_chars(self, num_chars: int, param: str) -> None:
        """Refuse a text too long to fit in any tokenization, without tokenizing it."""
        per_token = self.tok.max_chars_per_token
        if per_token is not None and num_chars >= self.max_model_len * per_token:
            raise BadRequest(
                f"{param} is {num_chars} characters, which cannot fit this model's maximum "
                f"context length of {self.max_model_len} tokens (a token is at most "
                f"{per_token} characters)",
                param,
            )

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """A prompt's token ids: fewer than the context length, each in the vocabulary."""
        if len(ids) >= self.max_model_len:
            raise BadRequest(
                f"{param} is {len(ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens",
                param,
            )
        check_token_ids(ids, self.vocab_size, f"{param} token ids")
        return ids

    async def encode(self, text: str, param: str) -> list[int]:
        self.check_chars(len(text), param)
        return self.check_ids(await off_loop(self.tok.encode, text), param)

    async def encode_truncated(self, text: str, keep_last: int, param: str) -> list[int]:
        """Only the last keep_last tokens (TGI's truncate), so any length may come in."""
        ids = (await off_loop(self.tok.encode, text))[-keep_last:]
        return self.check_ids(ids, param)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        tok: Tokenizer | None = None,
    ) -> list[int]:
        """A chat's token ids through tok's template (an adapter's; default the base's)."""
        self.check_chars(sum(len(m["content"]) for m in messages), "messages")
        tok = tok or self.tok
        try:
            ids = await off_loop(tok.encode_chat, messages, add_generation_prompt, tools)
        except TokenizerError as exc:
            raise BadRequest(str(exc), "messages") from exc
        return self.check_ids(ids, "messages")


def check_token_ids(ids: list[int], vocab_size: int, what: str) -> None:
    """400 naming `what` (its first word is the field) unless every id is in the vocabulary."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise BadRequest(
            f"{what} must be integers in [0, {vocab_size}); got {bad}", what.split()[0]
        )
