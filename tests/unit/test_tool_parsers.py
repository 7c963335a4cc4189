"""Tool-call parsing per chat-template family, the streaming hold-back, and tool_choice checks."""

from __future__ import annotations

import json

import pytest

from server.api.errors import BadRequest
from server.api.tools import (
    Tool,
    ToolRequest,
    ToolStream,
    history_message,
    parse_tool_calls,
    parse_tool_request,
    template_family,
)

TOOLS = [Tool("get_weather", {"type": "object"}), Tool("add", {"type": "object"})]
TOOL_DICTS = [{"type": "function", "function": {"name": t.name}} for t in TOOLS]


def _pairs(calls):  # type: ignore[no-untyped-def]
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_template_family_follows_the_markers_the_template_teaches() -> None:
    assert template_family("...<tool_call>{{ tool_call | tojson }}</tool_call>") == "hermes"
    assert template_family("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert template_family("<|python_tag|>") == "llama3_json"
    assert template_family(None) == "llama3_json"


def test_hermes_calls_and_the_text_before_them() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    )
    content, calls = parse_tool_calls("hermes", text, TOOLS)
    assert content == "Let me check."
    assert _pairs(calls) == [("get_weather", {"city": "Oslo"}), ("add", {"a": 1})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_mistral_calls_after_the_marker() -> None:
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert _pairs(parse_tool_calls("mistral", text, TOOLS)[1]) == [("add", {"a": 1, "b": 2})]


def test_llama3_json_call_with_parameters_and_python_tag() -> None:
    text = '<|python_tag|>{"name": "add", "parameters": {"a": 3}}'
    content, calls = parse_tool_calls("llama3_json", text, TOOLS)
    assert content is None and _pairs(calls) == [("add", {"a": 3})]


@pytest.mark.parametrize(
    "text",
    [
        "just words",
        '{"name": "unknown", "arguments": {}}',
        '{"name": "add", "arguments": [1, 2]}',
        '{"name": "add", "arguments": {"a": 1}',  # cut off
    ],
)
def test_output_that_is_not_a_valid_call_stays_content(text: str) -> None:
    assert parse_tool_calls("llama3_json", text, TOOLS) == (text, [])


def test_stream_releases_text_before_a_hermes_call_and_holds_the_call() -> None:
    stream = ToolStream("hermes", ToolRequest(TOOLS, "auto"))
    sent = [stream.feed(piece) for piece in ["Sure", " thing <tool", "_call>", '{"name": "add"']]
    sent.append(stream.feed(', "arguments": {}}</tool_call>'))
    assert "".join(sent) == "Sure thing "
    rest, calls = stream.finish("stop")
    assert rest == "" and _pairs(calls) == [("add", {})]


def test_stream_releases_held_text_that_was_not_a_call() -> None:
    stream = ToolStream("llama3_json", ToolRequest(TOOLS, "auto"))
    assert stream.feed("{ not") == ""
    assert stream.finish("length") == ("{ not", [])
    plain = ToolStream("llama3_json", ToolRequest(TOOLS, "auto"))
    assert plain.feed("Hello") == "Hello"


def test_required_grammar_lists_each_tool_and_caps_calls_without_parallel() -> None:
    schema = ToolRequest(TOOLS, "required", parallel=False).grammar().spec  # type: ignore[union-attr]
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]]
    assert names == ["get_weather", "add"]
    parallel = ToolRequest(TOOLS, "required").grammar().spec  # type: ignore[union-attr]
    assert "maxItems" not in parallel


@pytest.mark.parametrize(
    ("tools", "choice", "fragment"),
    [
        (None, "required", "needs tools"),
        (TOOL_DICTS, {"type": "function", "function": {"name": "x"}}, "not in tools"),
        (TOOL_DICTS, "sometimes", "tool_choice must be"),
        ([*TOOL_DICTS, TOOL_DICTS[0]], "auto", "distinct"),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "letters, digits"),
    ],
)
def test_bad_tools_or_tool_choice_are_400s(tools, choice, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadRequest) as info:
        parse_tool_request(tools, choice, None)
    assert fragment in info.value.message


def test_an_unsupported_keyword_in_tool_parameters_names_the_tool() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]
    with pytest.raises(Exception) as info:
        parse_tool_request(tools, "auto", None)
    assert "'not'" in str(info.value) and "tools[0].function.parameters" in str(info.value)


def test_history_arguments_become_objects_for_the_template() -> None:
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": '{"a": 1}'}}],
    }
    assert history_message(message)["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_constrained_output_cut_short_gives_no_calls() -> None:
    for request in (ToolRequest(TOOLS, "required"), ToolRequest(TOOLS, "named", named="add")):
        assert request.calls_from_constrained('[{"name": "add", "parame') == []
        stream = ToolStream("llama3_json", request)
        assert stream.feed('{"a": 1') == ""
        assert stream.finish("stop") == ('{"a": 1', [])
