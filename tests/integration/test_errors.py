"""Bad input and bad moments: each gets its status code and a message that says what is wrong,
in OpenAI's error shape on /v1 and LoRAX's on the LoRAX routes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from server.api.app import build_state, create_app
from server.config import EngineConfig, ServerConfig
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, adapter_name
from tests.integration.live_server import LiveServer, free_port, wait_until

COMPLETION = {"model": MODEL_NAME, "prompt": "The quick", "max_tokens": 4, "temperature": 0}
# A request that outlives any test unless its client leaves (see the slow_server fixture):
# the reply-timeout test needs it to run past 1.5 s, and 4000 tokens took only 3.7 s here.
ENDLESS = {**COMPLETION, "max_tokens": 16000, "ignore_eos": True, "stream": True}


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error reply, after checking the status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def lorax_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}
    return body


# ---- auth -----------------------------------------------------------------------------------


def test_an_inference_route_without_a_key_is_401_saying_how_to_send_one(
    server: LiveServer,
) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=COMPLETION)
    err = openai_error(response, 401)
    assert err["message"] == "missing API key: send 'Authorization: Bearer <API key>'"
    assert err["type"] == "authentication_error"


def test_a_wrong_key_is_401_and_the_sdk_raises_authentication_error(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.completions.create(**COMPLETION)
    assert info.value.status_code == 401
    assert "invalid API key: this route needs the API key" in info.value.message


def test_the_x_api_key_header_is_accepted_too(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": server.api_key or ""})
    assert response.status_code == 200


def test_a_mutation_with_the_inference_key_is_401_naming_the_admin_key(server: LiveServer) -> None:
    with server.client() as http:
        response = http.delete(f"/v1/adapters/{adapter_name(0)}")
    err = openai_error(response, 401)
    assert err["message"] == "invalid API key: this route needs the admin API key"
    with server.client() as http:
        assert http.get(f"/v1/adapters/{adapter_name(0)}").status_code == 200  # still there


def test_the_admin_key_opens_inference_routes_too(server: LiveServer) -> None:
    with server.client(admin=True) as http:
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_the_probes_need_no_key(server: LiveServer) -> None:
    for path in ("/health", "/ready"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


# ---- unknown adapters -----------------------------------------------------------------------


def test_an_unknown_model_is_404_and_the_sdk_raises_not_found(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(**{**COMPLETION, "model": "no-such-adapter"})
    assert "the model 'no-such-adapter' does not exist" in info.value.message
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_an_unknown_model_in_chat_is_404(server: LiveServer) -> None:
    body = {"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}
    with server.client() as http:
        err = openai_error(http.post("/v1/chat/completions", json=body), 404)
    assert "'no-such-adapter' does not exist" in err["message"]


def test_an_unknown_adapter_id_on_generate_is_404_in_lorax_shape(server: LiveServer) -> None:
    body = {"inputs": "The quick", "parameters": {"adapter_id": "no-such-adapter"}}
    with server.client() as http:
        err = lorax_error(http.post("/generate", json=body), 404)
    assert "'no-such-adapter' does not exist" in err["error"]
    assert err["error_type"] == "not_found"


# ---- invalid parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"max_tokens": "many"}, "max_tokens", "valid integer"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"logprobs": 99}, "logprobs", "less than or equal to 20"),
        ({"model": None}, "model", "valid string"),
        ({"prompt": None}, "prompt", "valid"),
    ],
)
def test_a_field_out_of_its_schema_is_400_naming_the_field(
    server: LiveServer, change: dict[str, Any], param: str, message: str
) -> None:
    with server.client() as http:
        err = openai_error(http.post("/v1/completions", json={**COMPLETION, **change}), 400)
    assert err["param"] == param
    assert message in err["message"]
    assert f"({param})" in err["message"]
    assert err["type"] == "invalid_request_error"


def test_max_tokens_past_the_context_is_400_naming_max_tokens(server: LiveServer) -> None:
    with server.client() as http:
        response = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 500})
    err = openai_error(response, 400)
    assert err["param"] == "max_tokens"
    assert "maximum context length is 128 tokens" in err["message"]


def test_a_token_id_outside_the_vocabulary_is_400_naming_the_prompt(server: LiveServer) -> None:
    with server.client() as http:
        response = http.post("/v1/completions", json={**COMPLETION, "prompt": [1, 2, 99999]})
    err = openai_error(response, 400)
    assert err["param"] == "prompt"
    assert err["message"] == "prompt token ids must be integers in [0, 320); got 99999"


def test_an_empty_prompt_list_is_400(server: LiveServer) -> None:
    with server.client() as http:
        err = openai_error(http.post("/v1/completions", json={**COMPLETION, "prompt": []}), 400)
    assert (err["param"], err["message"]) == ("prompt", "prompt is empty")


def test_an_empty_stop_string_is_400_naming_stop(server: LiveServer) -> None:
    with server.client() as http:
        err = openai_error(http.post("/v1/completions", json={**COMPLETION, "stop": [""]}), 400)
    assert (err["param"], err["message"]) == ("stop", "stop strings must not be empty")


def test_a_logit_bias_key_that_is_not_a_token_id_is_400_naming_logit_bias(
    server: LiveServer,
) -> None:
    body = {**COMPLETION, "logit_bias": {"fox": 1.0}}
    with server.client() as http:
        err = openai_error(http.post("/v1/completions", json=body), 400)
    assert (err["param"], err["message"]) == (
        "logit_bias",
        "logit_bias keys must be token ids, got 'fox'",
    )


def test_a_body_that_is_not_json_is_400(server: LiveServer) -> None:
    with server.client() as http:
        response = http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    err = openai_error(response, 400)
    assert "JSON decode error" in err["message"]


def test_an_invalid_lorax_parameter_is_422_naming_it(server: LiveServer) -> None:
    body = {"inputs": "The quick", "parameters": {"max_new_tokens": 0}}
    with server.client() as http:
        err = lorax_error(http.post("/generate", json=body), 422)
    assert err["error_type"] == "validation"
    assert "parameters.max_new_tokens" in err["error"]
    assert "greater than or equal to 1" in err["error"]


def test_an_unsupported_lorax_parameter_is_422_naming_it(server: LiveServer) -> None:
    body = {"inputs": "The quick", "parameters": {"typical_p": 0.5}}
    with server.client() as http:
        err = lorax_error(http.post("/", json=body), 422)
    assert err == {"error": "parameters.typical_p is not supported", "error_type": "validation"}


# ---- uploads over the limit -----------------------------------------------------------------


def _big_upload() -> dict[str, Any]:
    return {
        "data": {"name": "too-large"},
        "files": [("files", ("adapter_model.safetensors", b"\0" * (3 * 2**20 // 2)))],
    }


def test_an_upload_declared_over_max_upload_mb_is_413(server: LiveServer) -> None:
    with server.client(admin=True) as http:
        err = openai_error(http.post("/v1/adapters", **_big_upload()), 413)
        assert err["message"] == "upload exceeds --max-upload-mb (1 MB)"
        assert err["code"] == "payload_too_large"
        assert http.get("/v1/adapters/too-large").status_code == 404


def test_a_chunked_upload_running_over_max_upload_mb_is_413(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="files"; '
            b'filename="adapter_model.safetensors"\r\n\r\n'
        )
        for _ in range(12):
            yield b"x" * 2**17

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    with server.client(admin=True) as http:
        response = http.post("/v1/adapters", content=chunks(), headers=headers)
        err = openai_error(response, 413)
        assert err["message"] == "upload exceeds --max-upload-mb (1 MB)"
        assert http.get("/v1/adapters/too-large").status_code == 404


# ---- overload, disconnects, readiness (a server that runs one sequence at a time) -----------


def _idle(server: LiveServer) -> bool:
    m = server.metrics()
    labels = {"model_name": MODEL_NAME}
    running = m.value("loraplex_num_requests_running", **labels)
    return running == 0 and m.value("loraplex_num_requests_waiting", **labels) == 0


@contextlib.contextmanager
def endless_stream(http: httpx.Client, path: str = "/v1/completions") -> Iterator[httpx.Response]:
    """A streaming request that is running (its first token arrived) until the block ends."""
    with http.stream("POST", path, json=ENDLESS) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        yield response


def test_a_full_waiting_queue_is_429_with_retry_after(slow_server: LiveServer) -> None:
    assert wait_until(lambda: _idle(slow_server))
    with (
        slow_server.client() as http,
        endless_stream(http),
        http.stream("POST", "/v1/completions", json=ENDLESS),
    ):
        labels = {"model_name": MODEL_NAME}
        assert wait_until(
            lambda: slow_server.metrics().value("loraplex_num_requests_waiting", **labels) == 1
        )
        response = http.post("/v1/completions", json=COMPLETION)
        err = openai_error(response, 429)
        assert response.headers["retry-after"] == "1"
        assert err["message"] == "too many requests waiting (1); retry shortly"
        assert err["type"] == "rate_limit_error"
        lorax = http.post("/generate", json={"inputs": "The quick"})
        assert lorax_error(lorax, 429)["error_type"] == "overloaded"
        assert lorax.headers["retry-after"] == "1"


def test_a_request_fanning_out_past_the_whole_queue_is_400_not_429(
    slow_server: LiveServer,
) -> None:
    with slow_server.client() as http:
        response = http.post("/v1/completions", json={**COMPLETION, "n": 2})
    err = openai_error(response, 400)
    assert err["param"] == "n"
    assert err["message"] == (
        "this request needs 2 sequences (prompts x n) but at most 1 can wait (--max-waiting)"
    )


def test_a_client_that_disconnects_mid_stream_frees_its_sequence(slow_server: LiveServer) -> None:
    assert wait_until(lambda: _idle(slow_server))
    aborted = {"model_name": MODEL_NAME, "finished_reason": "abort"}
    before = slow_server.metrics().value("loraplex_request_success_total", **aborted)
    with slow_server.client() as http, endless_stream(http):
        pass  # leaving the block closes the connection after the first token
    assert wait_until(lambda: _idle(slow_server), timeout=10)
    after = slow_server.metrics().value("loraplex_request_success_total", **aborted)
    assert after == before + 1


def test_a_client_that_gives_up_waiting_for_a_reply_frees_its_sequence(
    slow_server: LiveServer,
) -> None:
    assert wait_until(lambda: _idle(slow_server))
    aborted = {"model_name": MODEL_NAME, "finished_reason": "abort"}
    before = slow_server.metrics().value("loraplex_request_success_total", **aborted)
    body = {**ENDLESS, "stream": False}
    with slow_server.client(timeout=1.0) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    assert wait_until(lambda: _idle(slow_server), timeout=10)
    after = slow_server.metrics().value("loraplex_request_success_total", **aborted)
    assert after == before + 1


@contextlib.contextmanager
def in_thread(app: Any) -> Iterator[str]:
    """Serve app with uvicorn on a free port from a background thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def loading_server(model_dir: Path, data_dir: Path) -> Iterator[tuple[str, threading.Event]]:
    """The real app under uvicorn whose model load waits for the yielded event; yields its URL."""
    engine = EngineConfig(model=str(model_dir), **ENGINE_FLAGS)  # type: ignore[arg-type]
    state = build_state(ServerConfig(data_dir=str(data_dir)), engine)
    loaded = threading.Event()
    load = state.loader

    def gated_load():  # type: ignore[no-untyped-def]
        assert loaded.wait(timeout=60)
        return load()

    state.loader = gated_load
    with in_thread(create_app(state)) as url:
        try:
            yield url, loaded
        finally:
            loaded.set()  # before shutdown, which waits for the loading thread


def test_inference_is_503_until_the_model_has_loaded(model_dir: Path, tmp_path: Path) -> None:
    with loading_server(model_dir, tmp_path / "data") as (url, loaded):
        body = {**COMPLETION, "model": model_dir.name}
        err = openai_error(httpx.post(f"{url}/v1/completions", json=body), 503)
        assert err["message"] == "the model is still loading"
        ready = httpx.get(f"{url}/ready")
        assert (ready.status_code, ready.headers["retry-after"]) == (503, "5")
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        loaded.set()
        assert wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=60)
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200


def test_every_api_route_is_503_while_the_model_loads(model_dir: Path, tmp_path: Path) -> None:
    lorax = {"inputs": "The quick"}
    calls = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", {"model": "x", "messages": [{"role": "user"}]}),
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/adapters/x", None),
        ("DELETE", "/v1/adapters/x", None),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"}),
        ("GET", "/v1/files", None),
        ("GET", "/v1/fine_tuning/jobs", None),
        ("GET", "/info", None),
        ("POST", "/generate", lorax),
        ("POST", "/", lorax),
    ]
    with loading_server(model_dir, tmp_path / "data") as (url, _):
        for method, path, body in calls:
            response = httpx.request(method, f"{url}{path}", json=body)
            assert response.status_code == 503, (method, path, response.text)
