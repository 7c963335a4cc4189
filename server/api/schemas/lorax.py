"""LoRAX/TGI-compatible bodies: /generate, /generate_stream and the root route."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class MergedAdapters(BaseModel):
    """LoRAX's merged_adapters: adapters merged into one for this request (also a /v1 field)."""

    model_config = ConfigDict(extra="ignore")

    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None  # linear (default), ties, dare_linear, dare_ties
    density: float = 1.0  # fraction of values kept by ties and dare pruning, in (0, 1]
    majority_sign_method: str | None = None  # total (default) or frequency


class LoraxParameters(BaseModel):
    # The LoRAX client sends every field, with explicit nulls for those it does not use.
    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = None
    adapter_source: str | None = None
    adapter_parameters: dict[str, Any] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    max_new_tokens: Annotated[int, Field(ge=1)] | None = 20
    ignore_eos_token: bool = False
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    return_full_text: bool = False
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: list[str] | None = None
    temperature: Annotated[float, Field(gt=0)] | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    truncate: Annotated[int, Field(ge=1)] | None = None
    typical_p: float | None = None
    watermark: bool = False
    return_k_alternatives: int | None = None
    response_format: dict[str, Any] | None = None


class LoraxRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


class LoraxToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    skipped: bool = False


class LoraxBestOfSequence(BaseModel):
    """One of best_of's other candidates (TGI's BestOfSequence)."""

    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[LoraxToken] = Field(default_factory=list)
    tokens: list[LoraxToken] = Field(default_factory=list)


class LoraxDetails(BaseModel):
    finish_reason: str  # length | eos_token | stop_sequence
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[LoraxToken] = Field(default_factory=list)
    tokens: list[LoraxToken] = Field(default_factory=list)
    # With best_of > 1: the candidates not chosen, in the order they were sampled.
    best_of_sequences: list[LoraxBestOfSequence] | None = None


class LoraxResponse(BaseModel):
    generated_text: str
    details: LoraxDetails | None = None


class LoraxStreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class LoraxStreamResponse(BaseModel):
    token: LoraxToken
    generated_text: str | None = None
    details: LoraxStreamDetails | None = None
