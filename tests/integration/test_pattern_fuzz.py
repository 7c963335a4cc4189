"""Hostile patterns and counts wherever a user's regex or schema reaches the grammar compilers:
`guided_regex` (completions and chat), a JSON schema's `pattern` (OpenAI response_format,
LoRAX response_format, tool parameters) and its length and item counts. Huge repetition
counts, deep group nesting, random regex syntax and deeply nested JSON, through the real
server: never a 5xx; a refusal is a 400 (LoRAX: 422) naming the field. Derandomized, so CI runs
are stable. The schemathesis fuzz (test_fuzz.py) covers every route's shape; it does not aim
at these classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL_NAME, adapter_name
from tests.integration.live_server import LiveServer

FUZZ = settings(
    max_examples=150,
    deadline=None,  # a slow example is not what this looks for (the client times out at 60 s)
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# The issue's reproducers: a count past 2**32 (Python's re: OverflowError; xgrammar: wrapped
# around), and groups 3000 deep (re: RecursionError).
HUGE_COUNT = "a{1,4294967296}"
DEEP_GROUPS = "(" * 3000 + "a" + ")" * 3000

REGEX_PARTS = [
    *"()[]{},|*+?\\^$.-ab09",
    "(?:",
    "(?P<x>",
    "[^",
    "\\d",
    "\\w",
    "\\p{L}",
    "\\u0041",
    "{2,1}",
    "{,3}",
    "{1048576}",
    "{1048577}",
    "{2147483648}",
    "{4294967296,}",
    "{99999999999999999999}",
]
huge_counts = st.builds(
    lambda atom, low, high, shape: shape.format(atom=atom, low=low, high=high),
    st.sampled_from(["a", "[a-z]", "(ab)", "\\d", "."]),
    st.integers(0, 2**70),
    st.integers(0, 2**70),
    st.sampled_from(["{atom}{{{low}}}", "{atom}{{{low},}}", "{atom}{{{low},{high}}}", "x{{{low}"]),
)
deep_groups = st.builds(
    lambda depth, opener: opener * depth + "a" + ")" * depth,
    st.integers(30, 5000),
    st.sampled_from(["(", "(?:", "(?P<g>", "(a|"]),
)
regex_soup = st.lists(st.sampled_from(REGEX_PARTS), min_size=1, max_size=16).map("".join)
patterns = st.one_of(
    st.just(HUGE_COUNT), st.just(DEEP_GROUPS), huge_counts, deep_groups, regex_soup
)
counts = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),  # what JSON can carry
    st.sampled_from([True, "3", None, 4294967296, 2**31, 1 << 20, (1 << 20) + 1]),
)


def deep_schema_body(depth: int) -> bytes:
    """A completion body whose schema nests `depth` arrays deep, written as text: too deep
    for Python's json module to encode (or the server's to decode) by recursion."""
    schema = '{"type": "array", "items": ' * depth + '{"type": "string"}' + "}" * depth
    fmt = f'{{"type": "json_schema", "json_schema": {{"name": "s", "schema": {schema}}}}}'
    body = f'"model": "{MODEL_NAME}", "prompt": "x", "max_tokens": 4, "response_format": {fmt}'
    return ("{" + body + "}").encode()


# ---- where a pattern reaches the compilers: (route, body builder, the field a 4xx names) ----


def _completion(pattern: str) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "guided_regex": pattern}


def _chat(pattern: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "x"}]
    return {
        "model": adapter_name(1),
        "messages": messages,
        "max_tokens": 4,
        "guided_regex": pattern,
    }


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _response_format(pattern: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": pattern}
    return {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, **_rf(schema)}


def _rf(schema: Any) -> dict[str, Any]:
    return {"response_format": _schema_format(schema)}


def _tool(pattern: str) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}}
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        "tool_choice": "required",
    }


def _lorax(pattern: str) -> dict[str, Any]:
    schema = {"type": "string", "pattern": pattern}
    fmt = {"type": "json_object", "schema": schema}
    return {"inputs": "x", "parameters": {"max_new_tokens": 4, "response_format": fmt}}


SURFACES: dict[str, tuple[str, Callable[[str], dict[str, Any]], str]] = {
    "guided_regex, completions": ("/v1/completions", _completion, "guided_regex"),
    "guided_regex, chat": ("/v1/chat/completions", _chat, "guided_regex"),
    "schema pattern, response_format": ("/v1/completions", _response_format, "response_format"),
    "schema pattern, tool parameters": ("/v1/chat/completions", _tool, "tools"),
    "schema pattern, LoRAX": ("/generate", _lorax, "parameters.response_format"),
}


def assert_refused_or_served(response: httpx.Response, field: str) -> None:
    """A 200, or a 4xx whose error names the field; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        return
    body = response.json()
    if "error_type" in body:  # LoRAX's shape: no param, the field in the message
        assert field in body["error"], body
    else:
        error = body["error"]
        assert error["param"] == field or field in error["message"], error


@pytest.fixture
def http(server: LiveServer) -> httpx.Client:
    with server.client() as client:
        yield client  # type: ignore[misc]


@pytest.mark.parametrize("surface", list(SURFACES))
@pytest.mark.parametrize("pattern", [HUGE_COUNT, DEEP_GROUPS], ids=["huge count", "deep groups"])
def test_the_issues_patterns_are_a_400_naming_the_field(
    http: httpx.Client, surface: str, pattern: str
) -> None:
    route, body, field = SURFACES[surface]
    response = http.post(route, json=body(pattern))
    assert response.status_code in (400, 422), response.text
    assert_refused_or_served(response, field)


@FUZZ
@given(surface=st.sampled_from(list(SURFACES)), pattern=patterns)
def test_no_pattern_anywhere_gets_a_server_error(
    http: httpx.Client, surface: str, pattern: str
) -> None:
    route, body, field = SURFACES[surface]
    assert_refused_or_served(http.post(route, json=body(pattern)), field)


@settings(FUZZ, max_examples=60)
@given(keyword=st.sampled_from(["minLength", "maxLength", "minItems", "maxItems"]), value=counts)
def test_no_schema_count_gets_a_server_error(http: httpx.Client, keyword: str, value: Any) -> None:
    kind = "string" if keyword.endswith("Length") else "array"
    schema = {"type": kind, keyword: value}
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, **_rf(schema)}
    assert_refused_or_served(http.post("/v1/completions", json=body), "response_format")


@pytest.mark.parametrize("depth", [40, 1000, 100_000])
def test_a_deeply_nested_schema_is_refused_not_a_server_error(
    http: httpx.Client, depth: int
) -> None:
    headers = {"content-type": "application/json"}
    response = http.post("/v1/completions", content=deep_schema_body(depth), headers=headers)
    assert 400 <= response.status_code < 500, response.text
