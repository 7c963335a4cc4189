"""OpenAI Responses API bodies: the request, the response object and its output items, in the
shapes the openai SDK parses (openai.types.responses)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextFormat(BaseModel):
    """text.format: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")

    type: str = "text"  # "text" | "json_object" | "json_schema"
    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(BaseModel):
    """POST /v1/responses. Unknown fields are ignored, as for the other OpenAI routes."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]  # items are read by server.api.responses_input
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None  # accepted; nothing is stored (the response says store: false)
    previous_response_id: str | None = None  # refused: nothing is stored
    conversation: str | dict[str, Any] | None = None  # refused: nothing is stored
    background: bool | None = None  # refused when true
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None  # an extension, as on chat


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str  # a JSON object, as text
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the prefix cache held


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The response: its output items, status and usage, and the settings it ran with."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    text: TextConfig
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    store: bool = False  # never stored: previous_response_id is refused
    previous_response_id: None = None
    background: bool = False
    truncation: Literal["disabled"] = "disabled"
