"""What the inference services (completions, chat, LoRAX generate) need, and nothing more.

A service is built once per server from an EngineClient (admission and generation: the
ServingClient), a ModelResolver (request model names -> adapters: the AdapterService) and the
ServedModel (tokenizer, grammar
compiler, limits), never from the whole server state: it cannot reach jobs, the store or
configuration, and a test can hand it stand-ins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from fastapi import Request

from server.engine.grammar import GrammarCompiler
from server.engine.outputs import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.model.generation_config import GenerationDefaults
from server.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from adapters import RegisteredAdapter
    from server.api.schemas.lorax import MergedAdapters
    from server.engine.llm_engine import LLMEngine, Prompt
    from server.serving.templates import ChatTemplates


class EngineClient(Protocol):
    def check_serving(self, num_requests: int = 1) -> None:
        """Raise the API error (503, 429, 400) when num_requests cannot be queued now."""
        ...

    def generate(
        self,
        request: Request,
        prompts: Sequence[Prompt],
        params: Sequence[SamplingParams],
        adapter: str | None,
        adapter_id: int | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the prompts as one API call: (index, output) as outputs arrive; adapter_id
        pins the adapter version the prompts were rendered for."""
        ...


class ModelResolver(Protocol):
    @property
    def model_name(self) -> str: ...

    def resolve_model(self, model: str | None) -> str | None:
        """None for the base model, else the adapter's name; 404 for neither."""
        ...

    async def resolve_merged(self, spec: MergedAdapters, field: str) -> str:
        """The internal name of the adapter serving a merge spec, merging it first if new."""
        ...

    def adapter(self, name: str) -> RegisteredAdapter | None:
        """A registered adapter's current version."""
        ...

    @property
    def templates(self) -> ChatTemplates:
        """Per adapter version: the tokenizer rendering its chats (server.serving.templates)."""
        ...


@dataclass(frozen=True)
class ServedModel:
    """The served model's facts the API layer needs: fixed once the engine is built."""

    tokenizer: Tokenizer
    grammars: GrammarCompiler
    max_model_len: int
    vocab_size: int
    # The model's sampling values for fields a request leaves out (--generation-config).
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)

    @classmethod
    def of(cls, llm: LLMEngine) -> ServedModel:
        return cls(
            llm.tokenizer,
            llm.grammars,
            llm.max_model_len,
            llm.model_config.vocab_size,
            llm.generation_defaults,
        )
