"""Request fields that shape the logits, read into engine terms: response_format (OpenAI and
LoRAX), the guided_regex / guided_choice extensions, and logit_bias."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.api.errors import BadRequest
from server.engine.grammar import Grammar, GrammarCompiler, check_schema

# Grammars compile on threads of their own: a large schema takes up to seconds, and must not
# hold up the tokenizer threads every prompt goes through.
COMPILE_THREADS = 2
_compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="loraplex-grammar")


async def compile_grammar(compiler: GrammarCompiler, grammar: Grammar | None) -> Grammar | None:
    """The grammar compiled off the event loop (cached by the compiler), or None."""
    if grammar is None:
        return None
    return await asyncio.get_running_loop().run_in_executor(
        _compile_pool, compiler.compile, grammar
    )


def openai_grammar(
    response_format: dict[str, Any] | None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
) -> Grammar | None:
    """The grammar an OpenAI-style body asks for (at most one of the three), or None."""
    asked = [
        name
        for name, value in (
            ("response_format", _constraining(response_format)),
            ("guided_regex", guided_regex),
            ("guided_choice", guided_choice),
        )
        if value is not None
    ]
    if len(asked) > 1:
        raise BadRequest(f"only one of {', '.join(asked)} may be given", asked[1])
    if guided_regex is not None:
        return Grammar("regex", guided_regex)
    if guided_choice is not None:
        return Grammar("choice", guided_choice)
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Grammar("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
            raise BadRequest(
                "response_format.json_schema must be an object with a 'schema'", "response_format"
            )
        return Grammar("json_schema", spec["schema"])
    raise BadRequest(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
        "response_format",
    )


def _constraining(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if response_format is None or response_format.get("type") in (None, "text"):
        return None
    return response_format


def lorax_grammar(response_format: dict[str, Any] | None) -> Grammar | None:
    """LoRAX's parameters.response_format: {"type": "json_object", "schema": ...} (a schema
    as an object or a JSON string; none for any object), or OpenAI's json_schema shape."""
    if response_format is None:
        return None
    param = "parameters.response_format"
    kind = response_format.get("type")
    if kind == "json_schema":
        grammar = openai_grammar(response_format)
        return None if grammar is None else dataclasses.replace(grammar, asked_by=param)
    if kind != "json_object":
        raise BadRequest(
            f"{param}.type must be 'json_object' or 'json_schema', got {kind!r}", param
        )
    schema = response_format.get("schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise BadRequest(f"{param}.schema is not valid JSON", param) from exc
    if schema is None:
        return Grammar("json_object")
    check_schema(schema, f"{param}.schema", param)
    return Grammar("json_schema", schema, asked_by=param)


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings) by token id. Only the wire format is read
    here: SamplingParams checks the size and the values, the engine the ids' range."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise BadRequest(
                f"logit_bias keys must be token ids, got {key[:32]!r}", "logit_bias"
            ) from None
    return out
