"""In-place reload over HTTP: PUT /v1/adapters/{name} and vLLM's load_inplace swap an adapter's
weights under its name while requests run; old requests keep the old weights token for token,
new requests get the new ones."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from server.engine.sampling_params import SamplingParams
from tests.integration.conftest import Oracle
from tests.integration.live_server import LiveServer
from tests.integration.test_adapters_api import PROMPT, complete, upload, upload_files

NUM_TOKENS = 24


def reload(server: LiveServer, name: str, adapter_dir: Path) -> httpx.Response:
    with server.client(admin=True) as http:
        return http.put(f"/v1/adapters/{name}", files=upload_files(adapter_dir))


def oracle_text(oracle: Oracle, name: str, adapter_dir: Path) -> str:
    oracle.register(name, adapter_dir)
    return oracle.complete(name, PROMPT, max_tokens=NUM_TOKENS, ignore_eos=True)


def oracle_tokens(oracle: Oracle, name: str, adapter_dir: Path) -> list[int]:
    oracle.register(name, adapter_dir)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    return oracle.engine.generate([PROMPT], params, [name])[0].token_ids


def stream_tokens(lines: Any, count: int) -> list[int]:
    """The next count token ids of a LoRAX token stream."""
    ids: list[int] = []
    for line in lines:
        if line.startswith("data:"):
            ids.append(json.loads(line[5:])["token"]["id"])
            if len(ids) == count:
                break
    return ids


def test_reload_under_load_keeps_old_requests_on_old_weights_and_new_ones_on_new(
    slow_server: LiveServer, spare_adapters: Path, oracle: Oracle
) -> None:
    old_tokens = oracle_tokens(oracle, "reload-old", spare_adapters / "spare-0")
    new_text = oracle_text(oracle, "reload-new", spare_adapters / "spare-1")
    assert new_text != oracle_text(oracle, "reload-old", spare_adapters / "spare-0")
    assert upload(slow_server, "hot", spare_adapters / "spare-0").status_code == 201
    endless = {"max_new_tokens": 4000, "ignore_eos_token": True, "adapter_id": "hot"}
    later: dict[str, httpx.Response] = {}
    stream_body = {"inputs": PROMPT, "parameters": endless}
    with (
        slow_server.client(admin=True) as http,
        http.stream("POST", "/generate_stream", json=stream_body) as stream,
    ):
        lines = stream.iter_lines()
        first = stream_tokens(lines, 1)
        reloaded = reload(slow_server, "hot", spare_adapters / "spare-1")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["version"] == 2
        # The running request holds the old version, not the new one.
        assert http.get("/v1/adapters/hot").json()["residency"]["active_requests"] == 0
        # One sequence at a time: the new request waits until the old stream is closed.
        waiter = threading.Thread(
            target=lambda: later.update(
                reply=complete(slow_server, "hot", max_tokens=NUM_TOKENS, ignore_eos=True)
            )
        )
        waiter.start()
        # The request runs on past the reload, on the old weights.
        assert first + stream_tokens(lines, NUM_TOKENS - 1) == old_tokens
    waiter.join(60)
    assert later["reply"].status_code == 200, later["reply"].text
    assert later["reply"].json()["choices"][0]["text"] == new_text
    again = complete(slow_server, "hot", max_tokens=NUM_TOKENS, ignore_eos=True)
    assert again.json()["choices"][0]["text"] == new_text


def test_a_bad_reload_keeps_serving_the_old_weights(
    server: LiveServer, spare_adapters: Path, oracle: Oracle
) -> None:
    old_text = oracle_text(oracle, "reload-old", spare_adapters / "spare-0")
    assert upload(server, "steady", spare_adapters / "spare-0").status_code == 201
    with server.client(admin=True) as http:
        bad = http.put("/v1/adapters/steady", files=[("files", ("notes.txt", b"x"))])
    assert bad.status_code == 400
    reply = complete(server, "steady", max_tokens=NUM_TOKENS, ignore_eos=True)
    assert reply.json()["choices"][0]["text"] == old_text
    with server.client() as http:
        assert http.get("/v1/adapters/steady").json()["version"] == 1


def test_reloading_an_unknown_adapter_is_404(server: LiveServer, spare_adapters: Path) -> None:
    response = reload(server, "never-uploaded", spare_adapters / "spare-1")
    assert response.status_code == 404
    assert "does not exist" in response.json()["error"]["message"]


def test_load_inplace_replaces_a_path_loaded_adapter(
    server: LiveServer, adapter_roots: Path, spare_adapters: Path, oracle: Oracle
) -> None:
    first = oracle_text(oracle, "reload-first", adapter_roots / "loadable-0")
    second = oracle_text(oracle, "reload-second", adapter_roots / "loadable-1")
    with server.client(admin=True) as http:
        body = {"lora_name": "inplace", "lora_path": str(adapter_roots / "loadable-0")}
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
        again = http.post("/v1/load_lora_adapter", json=body)
        assert again.status_code == 400  # without load_inplace the name is taken
        body = {**body, "lora_path": str(adapter_roots / "loadable-1"), "load_inplace": True}
        swapped = http.post("/v1/load_lora_adapter", json=body)
        assert swapped.status_code == 200, swapped.text
        assert swapped.text == "Success: LoRA adapter 'inplace' reloaded in place."
        assert http.get("/v1/adapters/inplace").json()["version"] == 2
    reply = complete(server, "inplace", max_tokens=NUM_TOKENS, ignore_eos=True)
    assert reply.json()["choices"][0]["text"] == second != first
