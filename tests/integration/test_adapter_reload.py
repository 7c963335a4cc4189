"""In-place reload over HTTP: PUT /v1/adapters/{name} and vLLM's load_inplace swap an adapter's
weights under its name while requests run; old requests keep the old weights token for token,
new requests get the new ones. A reload's body is held to the upload limit, as an upload's."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine.sampling_params import SamplingParams
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, Oracle, serve_flags
from tests.integration.live_server import LiveServer
from tests.integration.test_adapters_api import PROMPT, complete, upload, upload_files
from tests.peft_reference import save_peft_adapter

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


# ---- body limits ---------------------------------------------------------------------------

BIG_RANK = 528  # all-linear on the tiny model: a 4.3 MB adapter, past --max-request-body-mb 4
UPLOAD_LIMIT_MB = 5


@pytest.fixture(scope="module")
def big_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big"
    save_peft_adapter(
        model_dir, path, seed=5, r=BIG_RANK, lora_alpha=16, target_modules="all-linear"
    )
    return path


@pytest.fixture(scope="module")
def upload_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """Default body limit (4 MB), uploads up to UPLOAD_LIMIT_MB, room for the big rank."""
    flags = {**ENGINE_FLAGS, "max_lora_rank": BIG_RANK}
    args = serve_flags(**flags, max_upload_mb=UPLOAD_LIMIT_MB, served_model_name=MODEL_NAME)
    live = LiveServer(model_dir, tmp_path_factory.mktemp("uploads") / "data", args).start()
    yield live
    live.stop()


def test_a_reload_gets_the_upload_limit_as_an_upload_does(
    upload_server: LiveServer, big_adapter: Path, spare_adapters: Path
) -> None:
    size = sum(len(data) for _, (_, data) in upload_files(big_adapter))
    assert 4 * 2**20 < size < UPLOAD_LIMIT_MB * 2**20
    assert upload(upload_server, "big", spare_adapters / "spare-0").status_code == 201
    response = reload(upload_server, "big", big_adapter)
    assert response.status_code == 200, response.text
    assert (response.json()["rank"], response.json()["version"]) == (BIG_RANK, 2)


def test_a_reload_past_the_upload_limit_is_413_naming_it(upload_server: LiveServer) -> None:
    body = [("files", ("adapter_model.safetensors", b"\0" * (UPLOAD_LIMIT_MB + 1) * 2**20))]
    with upload_server.client(admin=True) as http:
        response = http.put("/v1/adapters/anything", files=body)
    assert response.status_code == 413, response.text
    assert f"--max-upload-mb ({UPLOAD_LIMIT_MB} MB)" in response.json()["error"]["message"]
