"""A Responses request in chat terms: input items -> chat messages, Responses tools, tool_choice
and text.format -> their chat completion forms. Anything this server cannot do is a 400 naming
the item or field, never silently dropped."""

from __future__ import annotations

from typing import Any

from server.api.errors import BadRequest
from server.api.schemas.openai import ChatMessage, FunctionCall, ToolCall
from server.api.schemas.responses import ResponsesRequest

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = ("user", "assistant", "system", "developer")


def chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """instructions (as the system message) then the input, as chat messages; function_call
    items join the assistant message before them (one message, several tool calls)."""
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
        return messages
    if not req.input:
        raise BadRequest("input is empty", "input")
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = ToolCall(
                id=_str(item, "call_id", where),
                function=FunctionCall(
                    name=_str(item, "name", where), arguments=_str(item, "arguments", where)
                ),
            )
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # its text, then its calls
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append(
                ChatMessage(role="tool", content=content, tool_call_id=_str(item, "call_id", where))
            )
        else:
            raise BadRequest(
                f"{where}: items of type {kind!r} are not supported (message, function_call "
                "and function_call_output are)",
                "input",
            )
    return messages


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    role = item.get("role")
    if role not in _ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", "input")
    content = item.get("content")
    text = content if isinstance(content, str) else _text(content, f"{where}.content")
    return ChatMessage(role=role, content=text)


def _text(parts: Any, where: str) -> str:
    """The text of a list of content parts; only text parts are supported."""
    if not isinstance(parts, list):
        raise BadRequest(f"{where} must be a string or a list of content parts", "input")
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise BadRequest(
                f"{where}[{j}]: only text parts are supported (input_text or output_text with "
                f"a 'text'), got {kind!r}",
                "input",
            )
        texts.append(part["text"])
    return "".join(texts)


def _str(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key} must be a string", "input")
    return value


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools ({type, name, parameters, ...}) in chat's nested form."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise BadRequest(
                f"tools[{i}]: only function tools are supported, got {tool.get('type')!r}",
                "tools",
            )
        function = {k: v for k, v in tool.items() if k != "type"}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """ "none" / "auto" / "required" as they are; {type: function, name} in chat's form."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise BadRequest(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
            "tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def chat_response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """text.format as chat's response_format (the same grammar engine constrains both)."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise BadRequest("text.format of type json_schema needs a 'schema'", "text.format")
        spec = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": spec}
    raise BadRequest(
        f"text.format.type must be 'text', 'json_object' or 'json_schema', got {fmt.type!r}",
        "text.format",
    )
