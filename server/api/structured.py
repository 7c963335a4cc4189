"""Request fields that shape the logits, read into engine terms: response_format (OpenAI and
LoRAX), the guided_regex / guided_choice extensions, and logit_bias."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.api.errors import BadRequest
from server.engine.grammar import Grammar, GrammarCompiler, check_schema

# Grammars compile on threads of their own: a large schema takes up to a second (its size is
# bounded: server.engine.grammar), and must not hold up the tokenizer threads every prompt
# goes through. One tenant holds at most one of them at a time, so another tenant's grammar
# starts at once, or behind at most one bounded compile of each other tenant compiling.
COMPILE_THREADS = 2
MAX_COMPILED = 128  # grammars kept compiled here: a repeat never queues for a thread
_compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="loraplex-grammar")


class CompileQueue:
    """Compiled grammars by (compiler, kind, spec), and each tenant's turn at the threads."""

    def __init__(self) -> None:
        self._compiled: OrderedDict[tuple[int, str, str], Any] = OrderedDict()  # LRU first
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}  # tenant -> (lock, users)

    async def compile(self, compiler: GrammarCompiler, grammar: Grammar, tenant: str) -> Grammar:
        key = (id(compiler), grammar.kind, json.dumps(grammar.spec, sort_keys=True))
        compiled = self._compiled.get(key)
        if compiled is None:
            lock, users = self._turns.get(tenant) or (asyncio.Lock(), 0)
            self._turns[tenant] = (lock, users + 1)
            try:
                async with lock:
                    loop = asyncio.get_running_loop()
                    done = await loop.run_in_executor(_compile_pool, compiler.compile, grammar)
            finally:
                lock, users = self._turns[tenant]
                if users == 1:
                    del self._turns[tenant]
                else:
                    self._turns[tenant] = (lock, users - 1)
            compiled = done.compiled
            self._compiled[key] = compiled
            if len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return dataclasses.replace(grammar, compiled=compiled)


_queue = CompileQueue()


async def compile_grammar(
    compiler: GrammarCompiler, grammar: Grammar | None, tenant: str = ""
) -> Grammar | None:
    """The grammar compiled off the event loop in the tenant's turn, or None."""
    if grammar is None or grammar.compiled is not None:
        return grammar
    return await _queue.compile(compiler, grammar, tenant)


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
