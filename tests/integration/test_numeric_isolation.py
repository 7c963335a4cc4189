"""An adapter whose numbers overflow fails its own requests with a clear error; every other
request, before, during and after, gets exactly what it gets alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer, sse_events

PROMPT = "The quick brown fox"
# Longer than PROMPT plus its output: the failed request leaves NaN keys and values past
# where later requests' keys end, in the pages they reuse.
LONG_PROMPT = " ".join([PROMPT] * 6)
NAME = "overflows"
MESSAGE = f"adapter {NAME!r} produced non-finite values (inf or NaN) for this request"


@pytest.fixture(scope="module")
def overflowing(
    server: LiveServer, spare_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """An uploaded MLP adapter at the edge of what registration accepts (every weight 6e4,
    within float16's range; scaling 1000, under the bound of 1024): accepted, but through
    gate x up and then down its LoRA product overflows float32 to inf."""
    src = spare_adapters / "spare-1"  # gate_proj, up_proj, down_proj
    state = load_file(str(src / WEIGHTS_FILE))
    huge = {k: torch.full_like(v, 6e4) for k, v in state.items()}
    config = json.loads((src / CONFIG_FILE).read_text())
    config["lora_alpha"] = config["r"] * 1000
    weights = tmp_path_factory.mktemp("overflows") / WEIGHTS_FILE
    save_file(huge, weights)
    files = [
        ("files", (CONFIG_FILE, json.dumps(config).encode())),
        ("files", (WEIGHTS_FILE, weights.read_bytes())),
    ]
    with server.client(admin=True) as http:
        response = http.post("/v1/adapters", data={"name": NAME}, files=files)
    assert response.status_code == 201, response.text
    return NAME


def _complete(server: LiveServer, model: str, **extra) -> dict:  # type: ignore[no-untyped-def]
    prompt = LONG_PROMPT if model == NAME else PROMPT
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    with server.client() as http:
        response = http.post("/v1/completions", json=body)
    return {"status": response.status_code, **response.json()}


def _alone(oracle: Oracle, adapter: str | None) -> str:
    return oracle.complete(adapter, PROMPT, max_tokens=8)


def test_a_request_to_an_overflowing_adapter_is_an_error_naming_it(
    server: LiveServer, overflowing: str
) -> None:
    reply = _complete(server, overflowing)

    assert reply["status"] == 422
    assert reply["error"]["message"] == MESSAGE
    assert reply["error"]["code"] == "request_failed"


def test_requests_after_the_failure_get_their_alone_run_text(
    server: LiveServer, overflowing: str, oracle: Oracle
) -> None:
    assert _complete(server, overflowing)["status"] == 422

    for model in (None, adapter_name(1), adapter_name(2)):
        reply = _complete(server, model or MODEL_NAME)
        assert reply["status"] == 200
        assert reply["choices"][0]["text"] == _alone(oracle, model), model


def test_requests_batched_with_the_failing_one_get_their_alone_run_text(
    server: LiveServer, overflowing: str, oracle: Oracle
) -> None:
    models = [overflowing, MODEL_NAME, adapter_name(1), overflowing, adapter_name(3)]
    with ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(lambda m: _complete(server, m), models))

    for model, reply in zip(models, replies, strict=True):
        if model == overflowing:
            assert reply["status"] == 422
        else:
            adapter = None if model == MODEL_NAME else model
            assert reply["status"] == 200
            assert reply["choices"][0]["text"] == _alone(oracle, adapter), model


def test_a_streamed_request_ends_with_an_error_event_then_done(
    server: LiveServer, overflowing: str
) -> None:
    body = {"model": overflowing, "prompt": LONG_PROMPT, "max_tokens": 8, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
        events = list(sse_events(response.iter_lines()))

    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": MESSAGE,
            "type": "invalid_request_error",
            "param": None,
            "code": "request_failed",
        }
    }


def test_lorax_generate_answers_424_with_a_generation_error(
    server: LiveServer, overflowing: str
) -> None:
    body = {"inputs": LONG_PROMPT, "parameters": {"adapter_id": overflowing, "max_new_tokens": 8}}
    with server.client() as http:
        response = http.post("/generate", json=body)

    assert response.status_code == 424
    assert response.json() == {"error": MESSAGE, "error_type": "generation"}
