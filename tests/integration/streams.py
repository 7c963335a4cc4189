"""Streamed completions as a client sees them: what each stream carried, for load and soak tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

Job = tuple[str, str, int]  # adapter, prompt, max_tokens


@dataclass
class Stream:
    """What one client saw of one streamed completion."""

    status: int
    ids: set[str] = field(default_factory=set)  # completion ids across chunks
    models: set[str] = field(default_factory=set)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    errors: list[str] = field(default_factory=list)
    done: bool = False


async def stream_once(http: httpx.AsyncClient, job: Job) -> Stream:
    adapter, prompt, max_tokens = job
    body = {
        "model": adapter,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", "/v1/completions", json=body) as response:
        seen = Stream(response.status_code)
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                seen.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                seen.errors.append(chunk["error"]["message"])
                continue
            seen.ids.add(chunk["id"])
            seen.models.add(chunk["model"])
            if chunk.get("usage"):
                seen.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                seen.text += choice["text"]
                seen.finish_reason = choice["finish_reason"] or seen.finish_reason
    return seen
