"""Every route's key, route by route, for each key configuration: the table in docs/api.md
("Authentication"), checked against real servers with no key, the inference key and the admin
key. A route the app serves that is missing from ROUTES fails the suite, so a new route cannot
slip in unprotected.

Requests are cheap: empty JSON bodies and ids that do not exist. Auth runs before validation and
lookups, so a refused request is a 401 and an allowed one anything else below 500."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import fastapi.routing
import httpx
import pytest

from server.api.app import create_app
from server.api.state import ServerState
from server.config import ServerConfig
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, serve_flags
from tests.integration.live_server import ADMIN_KEY, API_KEY, REPO_ROOT, LiveServer, free_port

# Access classes.
PROBE, PAGE, INFERENCE, ADMIN = "probe", "page", "inference", "admin"

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): PROBE,
    ("GET", "/ready"): PROBE,
    ("GET", "/"): PAGE,
    ("GET", "/console"): PAGE,
    ("GET", "/console/{path}"): PAGE,
    ("GET", "/v1/stats"): INFERENCE,
    ("GET", "/info"): INFERENCE,
    ("GET", "/metrics"): INFERENCE,
    ("GET", "/openapi.json"): INFERENCE,
    ("GET", "/docs"): INFERENCE,
    ("POST", "/v1/completions"): INFERENCE,
    ("POST", "/v1/chat/completions"): INFERENCE,
    ("GET", "/v1/models"): INFERENCE,
    ("GET", "/v1/models/{model_id}"): INFERENCE,
    ("POST", "/v1/responses"): INFERENCE,
    ("POST", "/generate"): INFERENCE,
    ("POST", "/generate_stream"): INFERENCE,
    ("POST", "/"): INFERENCE,
    ("GET", "/v1/adapters"): INFERENCE,
    ("GET", "/v1/adapters/{name}"): INFERENCE,
    ("POST", "/v1/adapters"): ADMIN,
    ("PUT", "/v1/adapters/{name}"): ADMIN,
    ("DELETE", "/v1/adapters/{name}"): ADMIN,
    ("POST", "/v1/load_lora_adapter"): ADMIN,
    ("POST", "/v1/unload_lora_adapter"): ADMIN,
    ("POST", "/v1/files"): ADMIN,
    ("GET", "/v1/files"): ADMIN,
    ("GET", "/v1/files/{file_id}"): ADMIN,
    ("GET", "/v1/files/{file_id}/content"): ADMIN,
    ("DELETE", "/v1/files/{file_id}"): ADMIN,
    ("POST", "/v1/fine_tuning/jobs"): ADMIN,
    ("GET", "/v1/fine_tuning/jobs"): ADMIN,
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): ADMIN,
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): ADMIN,
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): ADMIN,
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): ADMIN,
}

# What a request presents.
NO_KEY, THE_API_KEY, THE_ADMIN_KEY = "no key", "inference key", "admin key"
PRESENTED: dict[str, dict[str, str]] = {
    NO_KEY: {},
    THE_API_KEY: {"Authorization": f"Bearer {API_KEY}"},
    THE_ADMIN_KEY: {"Authorization": f"Bearer {ADMIN_KEY}"},
}
ANYONE = {NO_KEY, THE_API_KEY, THE_ADMIN_KEY}

# Configuration -> (--api-key, --admin-api-key), and who passes each access class there. A key
# that is not configured is a wrong key.
CONFIGS: dict[str, tuple[str | None, str | None]] = {
    "no keys": (None, None),
    "inference key only": (API_KEY, None),
    "admin key only": (None, ADMIN_KEY),
    "both keys": (API_KEY, ADMIN_KEY),
}
PASSES: dict[str, dict[str, set[str]]] = {
    "no keys": {PROBE: ANYONE, PAGE: ANYONE, INFERENCE: ANYONE, ADMIN: ANYONE},
    "inference key only": {
        PROBE: ANYONE,
        PAGE: ANYONE,
        INFERENCE: {THE_API_KEY},
        ADMIN: {THE_API_KEY},
    },
    "admin key only": {
        PROBE: ANYONE,
        PAGE: ANYONE,
        INFERENCE: {THE_ADMIN_KEY},
        ADMIN: {THE_ADMIN_KEY},
    },
    "both keys": {
        PROBE: ANYONE,
        PAGE: ANYONE,
        INFERENCE: {THE_API_KEY, THE_ADMIN_KEY},
        ADMIN: {THE_ADMIN_KEY},
    },
}
KEYLESS_HOSTS = ("127.0.0.1", "localhost")  # --allowed-hosts of the keyless server


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, from the app itself (not only OpenAPI's)."""

    def never_loads() -> LLMEngine:
        raise AssertionError("listing routes needs no engine")

    app = create_app(ServerState(ServerConfig(), never_loads, MODEL_NAME, Metrics(MODEL_NAME)))
    # FastAPI >= 0.12x keeps included routers unflattened; iter_route_contexts flattens them.
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(iter_contexts(app.routes)) if iter_contexts else app.routes
    return {
        (method, re.sub(r":\w+}", "}", route.path_format))  # {name:path} -> {name}
        for route in routes
        for method in (route.methods or ())
        if method != "HEAD"
    }


@pytest.fixture(scope="module", params=list(CONFIGS))
def configured(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, LiveServer]]:
    """One live server per configuration; the keyless one checks Host, the keyed one with both
    keys also serves --metrics-port."""
    name = request.param
    api_key, admin_key = CONFIGS[name]
    args = serve_flags(**ENGINE_FLAGS, served_model_name=MODEL_NAME)
    if name == "no keys":
        args += ["--allowed-hosts", *KEYLESS_HOSTS]
    if name == "both keys":
        args += ["--metrics-port", str(free_port())]
    data = tmp_path_factory.mktemp("auth") / "data"
    live = LiveServer(model_dir, data, args, api_key=api_key, admin_key=admin_key).start()
    yield name, live
    live.stop()


def status(live: LiveServer, method: str, path: str, presented: str) -> int:
    url = live.url + re.sub(r"\{\w+\}", "no-such-thing", path)
    body = {} if method == "POST" else None
    response = httpx.request(method, url, json=body, headers=PRESENTED[presented], timeout=60)
    return response.status_code


def test_every_route_the_app_serves_has_an_expected_access_class() -> None:
    served = app_routes()
    missing, gone = sorted(served - ROUTES.keys()), sorted(ROUTES.keys() - served)
    assert not missing, f"routes missing from ROUTES (and docs/api.md): {missing}"
    assert not gone, f"ROUTES lists routes the app does not serve: {gone}"


def test_the_table_in_the_api_docs_is_this_one() -> None:
    """docs/api.md's route-by-route table: cells are no key / API key / admin key, per config."""
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    table = text[text.index("Route by route") :].split("\n\n")[1]
    documented: dict[tuple[str, str], list[str]] = {}
    for row in table.splitlines()[2:]:
        first, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        for method, path in re.findall(r"`(GET|POST|PUT|DELETE) ([^`]+)`", first):
            documented[method, re.sub(r"\{\w+\}", "{}", path)] = cells
    expected = {
        (method, re.sub(r"\{\w+\}", "{}", path)): [
            " ".join("✓" if key in PASSES[config][access] else "✗" for key in PRESENTED)
            for config in CONFIGS
        ]
        for (method, path), access in ROUTES.items()
    }
    assert documented == expected


@pytest.mark.parametrize(("method", "path"), list(ROUTES))
def test_each_route_opens_to_exactly_the_keys_of_its_class(
    configured: tuple[str, LiveServer], method: str, path: str
) -> None:
    name, live = configured
    passes = PASSES[name][ROUTES[method, path]]
    got = {presented: status(live, method, path, presented) for presented in PRESENTED}
    wrong = {
        presented: code
        for presented, code in got.items()
        if (code == 401) == (presented in passes) or code >= 500
    }
    assert not wrong, f"{name}: {method} {path} answered {got}; passes: {sorted(passes)}"


def test_the_live_openapi_document_lists_only_expected_routes(
    configured: tuple[str, LiveServer],
) -> None:
    name, live = configured
    key = PRESENTED[min(PASSES[name][INFERENCE])]
    document = httpx.get(f"{live.url}/openapi.json", headers=key).json()
    listed = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert listed <= ROUTES.keys()


def test_server_paths_are_shown_only_to_admin_rights(configured: tuple[str, LiveServer]) -> None:
    name, live = configured
    for presented in PASSES[name][INFERENCE]:
        headers = PRESENTED[presented]
        info = httpx.get(f"{live.url}/info", headers=headers).json()
        models = httpx.get(f"{live.url}/v1/models", headers=headers).text
        admin = presented in PASSES[name][ADMIN]
        assert ("model_path" in info, "data_dir" in info) == (admin, admin), (name, presented)
        assert (str(live.model_dir) in str(info)) == admin, (name, presented)
        assert (str(live.model_dir) in models) == admin, (name, presented)


@pytest.mark.parametrize("configured", ["both keys"], indirect=True)  # has --metrics-port
def test_the_metrics_port_serves_metrics_without_a_key_and_nothing_else(
    configured: tuple[str, LiveServer],
) -> None:
    _, live = configured
    port = live.args[live.args.index("--metrics-port") + 1]
    scrape = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert scrape.status_code == 200
    assert "loraplex_num_requests_running" in scrape.text
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 404
    assert httpx.get(f"{live.url}/metrics").status_code == 401


@pytest.mark.parametrize("configured", ["no keys"], indirect=True)  # has --allowed-hosts
def test_the_keyless_server_refuses_hosts_not_allowed_but_not_probes(
    configured: tuple[str, LiveServer],
) -> None:
    _, live = configured
    rebound = {"Host": f"attacker.example:{live.port}"}
    response = httpx.get(f"{live.url}/v1/models", headers=rebound)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{live.url}/health", headers=rebound).status_code == 200
    local = {"Host": f"localhost:{live.port}"}
    assert httpx.get(f"{live.url}/v1/models", headers=local).status_code == 200
