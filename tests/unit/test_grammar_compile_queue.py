"""Structured-output compilation is bounded: a schema past the size bound is refused at once,
a grammar compiled before never waits for a thread, and one tenant holds at most one of the
compile threads, so another tenant's json_object is not queued behind its huge schemas."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest

from server.api.structured import COMPILE_THREADS, compile_grammar
from server.engine.errors import InvalidRequestError
from server.engine.grammar import MAX_OBJECT_PROPERTIES, Grammar

COMPILE_S = 0.6  # the fake's time per schema compile


class SlowCompiler:
    """GrammarCompiler.compile's contract, taking COMPILE_S per JSON schema."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def compile(self, grammar: Grammar) -> Grammar:
        with self._lock:
            self.calls += 1
        if grammar.kind == "json_schema":
            time.sleep(COMPILE_S)
        return dataclasses.replace(grammar, compiled=object())


def schema(num_properties: int, tag: str = "") -> dict[str, Any]:
    props = {f"{tag}field_{i}": {"type": "string"} for i in range(num_properties)}
    return {"type": "object", "properties": props}


def test_the_issues_1400_property_schemas_are_refused_at_once() -> None:
    for tag in ("a", "b"):  # issue 22: two of these held both threads for 24 s
        start = time.monotonic()
        with pytest.raises(InvalidRequestError, match="1400 properties; at most 256") as err:
            Grammar("json_schema", schema(1400, tag))
        assert time.monotonic() - start < 0.5
        assert err.value.param == "response_format"
    Grammar("json_schema", schema(MAX_OBJECT_PROPERTIES))  # at the bound: accepted


def test_another_tenants_json_object_is_not_queued_behind_one_tenants_schemas() -> None:
    compiler = SlowCompiler()

    async def run() -> float:
        flood = [
            asyncio.create_task(
                compile_grammar(compiler, Grammar("json_schema", schema(4, f"s{i}")), "key:a")
            )
            for i in range(COMPILE_THREADS + 2)
        ]
        await asyncio.sleep(0.05)  # the flood has taken its turn at the threads
        start = time.monotonic()
        await compile_grammar(compiler, Grammar("json_object"), "key:b")  # type: ignore[arg-type]
        waited = time.monotonic() - start
        await asyncio.gather(*flood)
        return waited

    assert asyncio.run(run()) < COMPILE_S / 2


def test_a_grammar_compiled_before_does_not_compile_again() -> None:
    compiler = SlowCompiler()
    grammar = Grammar("json_schema", schema(3, "repeat"))
    first = asyncio.run(compile_grammar(compiler, grammar, "key:a"))  # type: ignore[arg-type]
    again = asyncio.run(compile_grammar(compiler, grammar, "key:b"))  # type: ignore[arg-type]
    assert compiler.calls == 1
    assert first is not None and again is not None and again.compiled is first.compiled
