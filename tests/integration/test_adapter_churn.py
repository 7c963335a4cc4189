"""Adapter churn under load, through the live server: uploads, in-place reloads, deletions and
merges of a few adapters race completions, chats and merged requests for them, while other
requests run on stable adapters. No request may get a 5xx, and the stable requests' tokens are
exactly what each adapter gives alone."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.integration.conftest import Oracle, adapter_name
from tests.integration.live_server import LiveServer
from tests.integration.test_adapters_api import PROMPT, upload_files

CHURNED = [f"churn-{i}" for i in range(3)]
STABLE = [adapter_name(i) for i in (1, 2, 5)]
ROUNDS = 6
MAX_TOKENS = 6
DELETE_TRIES = 200


def _churn(server: LiveServer, spare: Path, name: str, stop: threading.Event) -> Counter[int]:
    """Upload, reload twice and delete one adapter (again while requests use it), ROUNDS
    times over; the statuses seen."""
    seen: Counter[int] = Counter()
    sources = [spare / f"spare-{i}" for i in range(4)]
    try:
        with server.client(admin=True) as http:
            for r in range(ROUNDS):
                files = upload_files(sources[r % 4])
                seen[http.post("/v1/adapters", data={"name": name}, files=files).status_code] += 1
                for k in (1, 2):
                    files = upload_files(sources[(r + k) % 4])
                    seen[http.put(f"/v1/adapters/{name}", files=files).status_code] += 1
                for _ in range(DELETE_TRIES):
                    status = http.delete(f"/v1/adapters/{name}").status_code
                    seen[status] += 1
                    if status != 409:  # 409: in use by a request; it ends soon
                        break
                    time.sleep(0.05)
    finally:
        stop.set()
    return seen


def _use(server: LiveServer, stop: threading.Event) -> Counter[int]:
    """Completions, chats and merges of the churned adapters until the churn ends."""
    bodies: list[tuple[str, dict[str, Any]]] = []
    for name in CHURNED:
        bodies.append(("/v1/completions", {"model": name, "prompt": PROMPT}))
        messages = [{"role": "user", "content": "hello"}]
        bodies.append(("/v1/chat/completions", {"model": name, "messages": messages}))
        merge = {"ids": [name, STABLE[0]], "weights": [0.5, 0.5]}
        bodies.append(("/v1/completions", {"prompt": PROMPT, "merged_adapters": merge}))
    seen: Counter[int] = Counter()
    with server.client() as http:
        while not stop.is_set():
            for path, body in bodies:
                reply = http.post(path, json={**body, "max_tokens": MAX_TOKENS, "temperature": 0})
                seen[reply.status_code] += 1
    return seen


def _stable(server: LiveServer, oracle: Oracle, stop: threading.Event) -> list[str]:
    """Greedy completions of stable adapters until the churn ends: any mismatch, named."""
    wrong = []
    with server.client() as http:
        while not stop.is_set():
            for name in STABLE:
                body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
                reply = http.post("/v1/completions", json=body)
                text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else None
                if text != oracle.complete(name, PROMPT, max_tokens=MAX_TOKENS):
                    wrong.append(f"{name}: {reply.status_code} {reply.text[:200]}")
    return wrong


def test_adapter_churn_against_concurrent_requests_gives_no_5xx_and_leaves_others_exact(
    server: LiveServer, spare_adapters: Path, oracle: Oracle
) -> None:
    for name in STABLE:  # the oracle's answers first: the churn must not wait on them
        oracle.complete(name, PROMPT, max_tokens=MAX_TOKENS)
    stops = [threading.Event() for _ in CHURNED]
    done = threading.Event()
    with ThreadPoolExecutor(len(CHURNED) * 2 + 1) as pool:
        churns = [
            pool.submit(_churn, server, spare_adapters, n, s)
            for n, s in zip(CHURNED, stops, strict=True)
        ]
        users = [pool.submit(_use, server, s) for s in stops]
        stable = pool.submit(_stable, server, oracle, done)
        seen = sum((f.result(timeout=600) for f in churns + users), Counter())
        done.set()
        wrong = stable.result(timeout=120)
    assert not [s for s in seen if s >= 500], f"server errors: {dict(seen)}"
    assert seen[201] == len(CHURNED) * ROUNDS, dict(seen)  # every upload, after every delete
    assert seen[200] > 0, dict(seen)
    assert not wrong, wrong[:5]
    with server.client() as http:
        listed = {a["id"] for a in http.get("/v1/adapters").json()["data"]}
        for name in CHURNED:  # nothing a churned adapter left behind serves
            reply = http.post("/v1/completions", json={"model": name, "prompt": PROMPT})
            assert reply.status_code == 404, reply.text
    assert not listed & set(CHURNED)
    assert set(STABLE) <= listed
