"""Tool calls: the request's tools and tool_choice, the grammar that forces valid calls, and the
parsers that find calls in free output (one per chat-template family).

`required` and a named function are constrained: the model writes JSON that a grammar built
from the tools' schemas allows, so every call parses and validates. `auto` lets the model
write what it likes and parses calls out of it in the format its chat template teaches.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from server.api.errors import BadRequest
from server.engine.grammar import Grammar, check_schema

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Family = Literal["hermes", "mistral", "llama3_json"]


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; arguments is the JSON text of an object."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools and what it lets the model do with them."""

    tools: list[Tool]
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parses_free_text(self) -> bool:
        return self.choice == "auto" and bool(self.tools)

    def grammar(self) -> Grammar | None:
        """The grammar that output must match: None unless tool_choice forces a call."""
        if self.choice == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return Grammar("json_schema", tool.parameters, asked_by="tools")
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                "required": ["name", "parameters"],
            }
            for t in self.tools
        ]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            array["maxItems"] = 1
        return Grammar("json_schema", array, asked_by="tools")

    def calls_from_constrained(self, text: str) -> list[ToolCall]:
        """The calls in output the grammar produced; none when it was cut short (a stop
        string, or max_tokens), which leaves the text as content."""
        value = _loads(text)
        if self.choice == "named":
            assert self.named is not None
            return [ToolCall(self.named, json.dumps(value))] if isinstance(value, dict) else []
        if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
            return []
        return [ToolCall(c["name"], json.dumps(c["parameters"])) for c in value]


def parse_tool_request(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None
) -> ToolRequest:
    """Check tools and tool_choice (400 naming the field) and read them."""
    parsed = [_parse_tool(t, i) for i, t in enumerate(tools or [])]
    if len(parsed) > MAX_TOOLS:
        raise BadRequest(f"tools may hold at most {MAX_TOOLS} functions", "tools")
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise BadRequest("tools must have distinct function names", "tools")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None:
        return ToolRequest(parsed, "auto" if parsed else "none", parallel=parallel)
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not parsed:
            raise BadRequest(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return ToolRequest(parsed, tool_choice, parallel=parallel)
    name = _named_choice(tool_choice)
    if name not in names:
        raise BadRequest(
            f"tool_choice names function {name!r}, which is not in tools", "tool_choice"
        )
    return ToolRequest(parsed, "named", named=name, parallel=parallel)


def _named_choice(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(name, str)
    ):
        raise BadRequest(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    return name


def _parse_tool(tool: Any, index: int) -> Tool:
    where = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise BadRequest(f'{where} must be {{"type": "function", "function": {{...}}}}', "tools")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(
            f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'", "tools"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    check_schema(parameters, f"{where}.function.parameters", "tools")
    return Tool(name, parameters)


# ---- parsing free output ---------------------------------------------------------------------


def template_family(chat_template: str | None) -> Family:
    """Which tool-call format a chat template teaches; Llama 3.1's bare JSON by default."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    return "llama3_json"


_MARKERS: dict[Family, tuple[str, ...]] = {
    "hermes": ("<tool_call>",),
    "mistral": ("[TOOL_CALLS]",),
    "llama3_json": ("<|python_tag|>", "{", "["),
}


def may_be_tool_call(family: Family, text: str) -> bool:
    """Whether output that begins with text could still turn out to be a tool call (streaming
    holds such text back until it knows)."""
    head = text.lstrip()
    return any(m.startswith(head) or head.startswith(m) for m in _MARKERS[family])


def parse_tool_calls(
    family: Family, text: str, tools: list[Tool]
) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a model's whole output. Calls naming an unknown tool, or whose
    arguments are not a JSON object, leave the output as plain content."""
    known = {t.name for t in tools}
    if family == "hermes":
        found = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.DOTALL)
        content = text.split("<tool_call>", 1)[0].strip() or None
        payloads = [_loads(f) for f in found]
    elif family == "mistral":
        if "[TOOL_CALLS]" not in text:
            return text, []
        before, _, after = text.partition("[TOOL_CALLS]")
        content = before.strip() or None
        value = _loads(after.strip())
        payloads = value if isinstance(value, list) else [value]
    else:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        value = _loads(body)
        if value is None:
            value = [_loads(line) for line in body.split(";")]  # Llama 3.1's "; " separated calls
        content = None
        payloads = value if isinstance(value, list) else [value]
    calls = [_call(p, known) for p in payloads]
    if not calls or any(c is None for c in calls):
        return text, []
    return content, [c for c in calls if c is not None]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(payload: Any, known: set[str]) -> ToolCall | None:
    if not isinstance(payload, dict) or payload.get("name") not in known:
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(payload["name"], json.dumps(arguments))


class ToolStream:
    """Streams one choice's text, holding back what is (or may become) a tool call until the
    output ends; then the calls, or the held text when it was not one after all."""

    def __init__(self, family: Family, tools: ToolRequest) -> None:
        self.family = family
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of text released as content
        self.call_start: int | None = None  # where a tool call begins in text

    def feed(self, new_text: str) -> str:
        """Content that can be sent now."""
        self.text += new_text
        if self.tools.constrained or self.call_start is not None:
            return ""
        if not self.tools.parses_free_text:
            return self._release(len(self.text))
        if self.family == "llama3_json":  # a call is the whole output, so only at the start
            if self.sent == 0 and may_be_tool_call(self.family, self.text):
                head = self.text.lstrip()
                if head and any(head.startswith(m) for m in _MARKERS[self.family]):
                    self.call_start = 0
                return ""
            return self._release(len(self.text))
        (marker,) = _MARKERS[self.family]
        found = self.text.find(marker, self.sent)
        if found >= 0:
            self.call_start = found
            return self._release(found)
        keep = next((k for k in range(len(marker) - 1, 0, -1) if self.text.endswith(marker[:k])), 0)
        return self._release(len(self.text) - keep)

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self, finish_reason: str | None) -> tuple[str, list[ToolCall]]:
        """(content still to send, tool calls) once the output has ended."""
        calls = self.tools.calls_from_constrained(self.text) if self.tools.constrained else []
        if calls:
            return "", calls
        if self.call_start is not None:
            _, calls = parse_tool_calls(self.family, self.text[self.call_start :], self.tools.tools)
            if calls:
                return "", calls if self.tools.parallel else calls[:1]
        return self._release(len(self.text)), []


def history_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as templates expect it: assistant tool_calls with arguments as objects
    (Llama 3.1, Hermes/Qwen2.5 and Mistral templates write them with tojson)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    rendered = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            parsed = _loads(arguments)
            function["arguments"] = parsed if isinstance(parsed, dict) else arguments
        rendered.append({**call, "function": function})
    return {**message, "tool_calls": rendered}
