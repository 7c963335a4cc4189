"""Tool calls through the openai SDK against the real server: every tool_choice mode, whole and
streamed; constrained calls always parse and validate against their function's schema."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.conftest import (
    ENGINE_FLAGS,
    MODEL_NAME,
    Oracle,
    adapter_name,
    serve_flags,
)
from tests.integration.live_server import LiveServer

MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS: Any = [
    {"type": "function", "function": {"name": name, "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
NAMED: Any = {"type": "function", "function": {"name": "add"}}


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
        yield c


def _check_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed_calls(stream: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """Content, calls (accumulated by index as the SDK's users do) and the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("model", [MODEL_NAME, adapter_name(11)])
def test_required_returns_valid_calls_of_the_given_tools(sdk: openai.OpenAI, model: str) -> None:
    out = sdk.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=90,
        temperature=1.0,
        seed=3,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls, set(SCHEMAS))


def test_required_streamed_sends_the_calls_as_tool_call_deltas(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=adapter_name(12),
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=90,
        temperature=0,
        stream=True,
    )
    content, calls, finish = _streamed_calls(stream)
    assert (content, finish, len(calls)) == ("", "tool_calls", 1)
    assert calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS[calls[0]["name"]])


def test_a_named_function_is_called_whole_and_streamed(sdk: openai.OpenAI) -> None:
    args: Any = dict(
        model=adapter_name(13), messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=60
    )
    out = sdk.chat.completions.create(**args, temperature=1.0)
    calls = out.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["add"]
    _check_calls(calls, {"add"})
    _, streamed, finish = _streamed_calls(sdk.chat.completions.create(**args, stream=True))
    assert finish == "tool_calls" and [c["name"] for c in streamed] == ["add"]
    jsonschema.validate(json.loads(streamed[0]["arguments"]), ADD)


def test_none_answers_in_text_as_without_tools(sdk: openai.OpenAI, oracle: Oracle) -> None:
    out = sdk.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    choice = out.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason != "tool_calls"
    assert choice.message.content == oracle.chat(None, MESSAGES, max_tokens=8)


# The tiny model never writes a call by itself: a regex makes it write a Llama 3.1 JSON call
# (the template's family), which auto must parse.
CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_call_the_model_writes(sdk: openai.OpenAI, stream: bool) -> None:
    args: Any = dict(
        model=adapter_name(14),
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=90,
        temperature=0,
        extra_body={"guided_regex": re.escape(CALL_TEXT)},
    )
    if stream:
        content, calls, finish = _streamed_calls(sdk.chat.completions.create(**args, stream=True))
        names_args = [(c["name"], json.loads(c["arguments"])) for c in calls]
    else:
        choice = sdk.chat.completions.create(**args).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        calls = choice.message.tool_calls or []
        names_args = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert (content, finish) == ("", "tool_calls")
    assert names_args == [("get_weather", {"city": "Oslo", "unit": "c"})]


def test_auto_passes_plain_text_through_whole_and_streamed(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    args: Any = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=10, temperature=0)
    whole = sdk.chat.completions.create(**args).choices[0]
    content, calls, _ = _streamed_calls(sdk.chat.completions.create(**args, stream=True))
    assert whole.message.tool_calls is None and calls == []
    assert whole.message.content == content
    assert content == oracle.chat(None, MESSAGES, max_tokens=10)


def test_tool_results_and_earlier_calls_go_through_the_template(
    sdk: openai.OpenAI, oracle: Oracle
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    history: Any = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    out = sdk.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=4, temperature=0
    )
    rendered = [{"role": m["role"], "content": m["content"] or ""} for m in history]
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(oracle.chat_prompt(rendered))


def test_an_unknown_named_function_is_a_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "tool_choice"


# A Hermes / Qwen2.5-style template: tools shown in a system turn, calls in <tool_call> tags.
HERMES_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HERMES_CALL = '<tool_call>{"name": "add", "arguments": {"a": 4, "b": 5}}</tool_call>'


@pytest.fixture(scope="module")
def hermes_sdk(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    path = tmp_path_factory.mktemp("hermes") / MODEL_NAME
    shutil.copytree(model_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": HERMES_TEMPLATE})
    )
    flags = {**ENGINE_FLAGS, "max_model_len": 1024}
    args = serve_flags(**flags, served_model_name=MODEL_NAME)
    live = LiveServer(path, path.parent / "data", args).start()
    try:
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.api_key, max_retries=0) as c:
            yield c
    finally:
        live.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_hermes_calls_after_text(hermes_sdk: openai.OpenAI, stream: bool) -> None:
    args: Any = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS[1:],
        max_tokens=120,
        temperature=0,
        extra_body={"guided_regex": re.escape("Adding." + HERMES_CALL)},
    )
    if stream:
        content, calls, finish = _streamed_calls(
            hermes_sdk.chat.completions.create(**args, stream=True)
        )
        pairs = [(c["name"], json.loads(c["arguments"])) for c in calls]
    else:
        choice = hermes_sdk.chat.completions.create(**args).choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        pairs = [
            (c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls or []
        ]
    assert (content, finish) == ("Adding.", "tool_calls")
    assert pairs == [("add", {"a": 4, "b": 5})]


def test_tools_and_earlier_calls_reach_the_template(hermes_sdk: openai.OpenAI) -> None:
    def prompt_tokens(**extra: Any) -> int:
        out = hermes_sdk.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=1, **extra
        )
        assert out.usage is not None
        return out.usage.prompt_tokens

    bare = prompt_tokens()
    assert prompt_tokens(tools=TOOLS[1:]) > bare
    assert prompt_tokens(tools=TOOLS[1:], tool_choice="none") == bare
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with_call = hermes_sdk.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=1)
    plain = [*MESSAGES, {"role": "assistant", "content": ""}]
    without = hermes_sdk.chat.completions.create(model=MODEL_NAME, messages=plain, max_tokens=1)
    assert with_call.usage is not None and without.usage is not None
    assert with_call.usage.prompt_tokens > without.usage.prompt_tokens  # the call was rendered
