"""The OpenAI Responses API and models.retrieve through the openai SDK against the real server:
text, json_schema and a function-tool round trip, whole and streamed, equal to the same
conversation through chat completions (the one chat path serves both)."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from tests.integration.conftest import MODEL_NAME, adapter_name
from tests.integration.live_server import LiveServer

ADAPTER = adapter_name(6)
INSTRUCTIONS = "Answer briefly."
QUESTION = "Weather in Paris?"
WEATHER: Any = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOL: Any = {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
# The events of a text response, in order (deltas collapsed).
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: Literal["Paris", "Oslo"]
    unit: Literal["c", "f"]


def _chat(sdk: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    return sdk.chat.completions.create(
        model=ADAPTER,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        **kwargs,
    ).choices[0]


def _collapsed(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER])
def test_create_answers_as_chat_completions_do(sdk: openai.OpenAI, model: str) -> None:
    resp = sdk.responses.create(
        model=model, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=8, temperature=0
    )
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    chat = sdk.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.model == model and resp.store is False
    assert resp.output_text == chat.choices[0].message.content
    assert [item.type for item in resp.output] == ["message"]
    incomplete = chat.choices[0].finish_reason == "length"
    assert resp.status == ("incomplete" if incomplete else "completed")
    if incomplete:
        assert resp.incomplete_details is not None
        assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None and chat.usage is not None
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_stream_sends_the_event_sequence_and_the_same_text(sdk: openai.OpenAI) -> None:
    kwargs: Any = dict(model=ADAPTER, input=QUESTION, max_output_tokens=12, temperature=0)
    whole = sdk.responses.create(**kwargs)
    with sdk.responses.stream(**kwargs) as stream:
        events = list(stream)

    types = [e.type for e in events]
    assert _collapsed(types[:-1]) == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    # The last event carries the whole response: completed, or incomplete at the token limit.
    last: Any = events[-1]
    assert last.type == f"response.{whole.status}"
    assert last.response.output_text == whole.output_text
    assert last.response.usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]


def test_json_schema_output_parses_whole_and_streamed(sdk: openai.OpenAI) -> None:
    parsed = sdk.responses.parse(
        model=ADAPTER, input=QUESTION, text_format=City, max_output_tokens=40, temperature=0.8
    )
    assert isinstance(parsed.output_parsed, City)
    fmt: Any = {"format": {"type": "json_schema", "name": "city", "schema": WEATHER}}
    with sdk.responses.stream(
        model=MODEL_NAME, input=QUESTION, text=fmt, max_output_tokens=40
    ) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), WEATHER)


def test_a_function_tool_round_trip(sdk: openai.OpenAI) -> None:
    """A forced call comes back as a function_call item; sent back with its output, the next
    turn is what chat completions make of the same conversation."""
    # Greedy and one call: sampled, the random adapter runs out of tokens inside the call's
    # array in about 2 of 5 draws (an incomplete response, no function_call item).
    first = sdk.responses.create(
        model=ADAPTER,
        input=QUESTION,
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=90,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER)

    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 c"}
    turn: Any = [{"role": "user", "content": QUESTION}, call.model_dump(), output]
    second = sdk.responses.create(
        model=ADAPTER,
        input=turn,
        tools=[TOOL],
        tool_choice="none",
        max_output_tokens=8,
        temperature=0,
    )
    as_chat = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 c"},
    ]
    chat_tools: Any = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    ]
    expected = _chat(sdk, as_chat, tools=chat_tools, tool_choice="none", max_tokens=8)
    assert second.output_text == expected.message.content


def test_a_streamed_function_call_arrives_as_argument_events(sdk: openai.OpenAI) -> None:
    named: Any = {"type": "function", "name": "get_weather"}
    with sdk.responses.stream(
        model=ADAPTER, input=QUESTION, tools=[TOOL], tool_choice=named, max_output_tokens=40
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = _collapsed([e.type for e in events])
    assert types[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_previous_response_id_is_refused_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(model=ADAPTER, input=QUESTION, previous_response_id="resp_x")
    err: Any = info.value.body
    assert err["param"] == "previous_response_id" and "stores no responses" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"model": "no-such-model"}, "model"),
        ({"max_output_tokens": 500}, "max_output_tokens"),  # past the 128-token context
    ],
)
def test_what_cannot_be_served_is_a_clear_error(server: LiveServer, body: dict, param: str) -> None:
    with server.client() as http:
        reply = http.post("/v1/responses", json={"model": ADAPTER, "input": QUESTION, **body})
    assert reply.status_code in (400, 404)
    assert reply.json()["error"]["param"] == param


def test_models_retrieve_gives_the_listed_card_or_404(sdk: openai.OpenAI) -> None:
    listed = {m.id: m for m in sdk.models.list()}
    for name in (MODEL_NAME, ADAPTER):
        assert sdk.models.retrieve(name) == listed[name]
    assert sdk.models.retrieve(ADAPTER).parent == MODEL_NAME  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("no-such-model")
    err: Any = info.value.body
    assert err["type"] == "not_found_error" and err["param"] == "model"
