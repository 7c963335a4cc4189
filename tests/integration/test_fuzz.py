"""schemathesis over the live server's OpenAPI schema: no generated request, valid or not,
gets a 5xx. Every operation is fuzzed; nothing is excluded."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.api.app import create_app
from server.api.state import ServerState
from server.config import ServerConfig
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, serve_flags
from tests.integration.live_server import LiveServer

MAX_EXAMPLES = 100  # per operation and generation mode (valid and invalid input)
REQUEST_TIMEOUT_S = 60
ADAPTER = "lora-00"


@pytest.fixture(scope="module")
def fuzz_server(
    model_dir: Path,
    adapter_dirs: dict[str, Path],
    adapter_roots: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """A server of its own (fuzzing uploads and deletes), with short outputs and a short
    queue so that generated fan-outs (n x prompts) are refused rather than run for long."""
    flags = {**ENGINE_FLAGS, "max_model_len": 48, "max_num_seqs": 8}
    args = serve_flags(**flags, max_waiting=8, max_upload_mb=1, served_model_name=MODEL_NAME)
    args += ["--preload-adapters", str(adapter_dirs[ADAPTER])]
    args += ["--adapter-roots", str(adapter_roots)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("fuzz") / "data", args).start()
    yield live
    live.stop()


def published_schema() -> dict[str, Any]:
    """The OpenAPI document the app serves at /openapi.json (building it needs no engine)."""

    def never_loads() -> LLMEngine:
        raise AssertionError("the schema needs no engine")

    state = ServerState(ServerConfig(), never_loads, MODEL_NAME, Metrics(MODEL_NAME))
    return create_app(state).openapi()


# Loaded at import: schemathesis's lazy from_fixture loader does not work under pytest 9.
schema = schemathesis.openapi.from_dict(published_schema())


def test_the_fuzzed_schema_is_the_one_the_server_publishes(fuzz_server: LiveServer) -> None:
    response = httpx.get(f"{fuzz_server.url}/openapi.json", headers=fuzz_server.headers())
    assert response.json() == published_schema()


def aim_at_real_models(case: schemathesis.Case) -> None:
    """Half the bodies name the base model or an adapter that exists (chosen by a hash of the
    body, so a case replays the same): a random model name stops every request at the 404."""
    body = case.body
    if not isinstance(body, dict):
        return
    pick = zlib.crc32(repr(body).encode()) % 4
    if pick >= 2:
        return
    if isinstance(body.get("model"), str):
        body["model"] = (MODEL_NAME, ADAPTER)[pick]
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and isinstance(parameters.get("adapter_id"), str):
        parameters["adapter_id"] = (MODEL_NAME, ADAPTER)[pick]


@schema.parametrize()
@settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    max_examples=MAX_EXAMPLES,
    database=None,  # no example database in the working tree; each run starts afresh
)
def test_no_generated_request_gets_a_server_error(
    case: schemathesis.Case, fuzz_server: LiveServer
) -> None:
    aim_at_real_models(case)
    response = case.call(
        base_url=fuzz_server.url,
        headers=fuzz_server.headers(admin=True),
        timeout=REQUEST_TIMEOUT_S,
    )
    case.validate_response(response, checks=[not_a_server_error])
