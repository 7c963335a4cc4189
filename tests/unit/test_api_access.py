"""Access settings without a model: /info redaction, --allowed-hosts, the metrics listener's
app, the 401 messages and the checks on the settings themselves. (Route by route, against
live servers: tests/integration/test_auth_matrix.py.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.hosts import host_allowed, host_name
from server.api.metrics_port import metrics_app
from server.api.state import ServerState
from server.config import ConfigError, ServerConfig
from server.engine.llm_engine import LLMEngine
from server.engine.snapshot import EngineFacts, EngineSnapshot, PoolUse
from server.metrics import Metrics

MODEL_PATH = "/srv/models/base-7b"
DATA_DIR = "/srv/loraplex-data"
API, ADMIN = "inference-key", "admin-key"


def _never_loads() -> LLMEngine:
    raise AssertionError("these tests load no model")


def _state(**config: Any) -> ServerState:
    return ServerState(ServerConfig(**config), _never_loads, "base-7b", Metrics("base-7b"))


def _with_engine(state: ServerState) -> ServerState:
    """Just enough of a loaded engine for /info and /v1/models."""
    facts = EngineFacts(
        model_path=MODEL_PATH,
        architecture="LlamaForCausalLM",
        num_layers=2,
        hidden_size=64,
        num_parameters=1000,
        quantize="none",
        dtype="float32",
        device="cpu",
        max_model_len=128,
        max_num_seqs=64,
        max_lora_rank=64,
        max_loras=32,
        host_cache_mb=2048,
        lora_backend=None,
        kernel_backend="torch",
        num_pages=4,
        page_bytes=8,
        block_size=16,
        cache_dtype="float32",
        prefix_caching=False,
    )
    pool = PoolUse(kv=1, kv_cached=0, adapter=0, free=3, kv_usage=0.25)
    now = EngineSnapshot(facts, 0, 0, pool, None, None, (), ())

    async def snapshot() -> EngineSnapshot:
        return now

    state.engine = SimpleNamespace(facts=facts, snapshot=snapshot, running=True)  # type: ignore[assignment]
    state._adapters = SimpleNamespace(list=lambda: [])  # type: ignore[assignment]
    return state


def _client(state: ServerState, key: str | None = None, host: str = "testserver") -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(create_app(state), headers=headers, base_url=f"http://{host}")


# ---- /info ------------------------------------------------------------------------------------


def test_info_shows_no_server_paths_to_the_inference_key() -> None:
    state = _with_engine(_state(api_key=API, admin_api_key=ADMIN, data_dir=DATA_DIR))
    response = _client(state, API).get("/info")
    assert response.status_code == 200
    info = response.json()
    assert "model_path" not in info and "data_dir" not in info
    assert "/srv" not in response.text
    assert info["model"] == "base-7b"


def test_info_shows_the_model_path_and_data_dir_to_the_admin_key() -> None:
    state = _with_engine(_state(api_key=API, admin_api_key=ADMIN, data_dir=DATA_DIR))
    info = _client(state, ADMIN).get("/info").json()
    assert (info["model_path"], info["data_dir"]) == (MODEL_PATH, DATA_DIR)


def test_info_shows_paths_to_the_only_key_which_holds_admin_rights() -> None:
    state = _with_engine(_state(api_key=API, data_dir=DATA_DIR))
    assert _client(state, API).get("/info").json()["model_path"] == MODEL_PATH


def test_models_root_is_the_model_path_for_the_admin_key_only() -> None:
    state = _with_engine(_state(api_key=API, admin_api_key=ADMIN))
    assert _client(state, API).get("/v1/models").json()["data"][0]["root"] == "base-7b"
    assert _client(state, ADMIN).get("/v1/models").json()["data"][0]["root"] == MODEL_PATH


def test_health_names_no_cause_of_a_failed_start() -> None:
    state = _state()
    state.load_error = FileNotFoundError(f"{MODEL_PATH}/config.json")
    response = _client(state).get("/health")
    assert response.status_code == 503
    assert response.json() == {"status": "failed", "error": "start-up failed"}


# ---- --allowed-hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [("a.example:8000", "a.example"), ("A.Example", "a.example"), ("[::1]:80", "[::1]")],
)
def test_the_host_name_drops_the_port_and_case(header: str, name: str) -> None:
    assert host_name(header) == name


def test_wildcards_match_subdomains_only() -> None:
    allowed = ("*.example.com", "localhost")
    assert host_allowed("api.example.com", allowed)
    assert not host_allowed("example.com", allowed)
    assert not host_allowed("evilexample.com", allowed)
    assert host_allowed("localhost", allowed)
    assert host_allowed("anything", ("*",))


def test_a_host_not_allowed_is_400_naming_it() -> None:
    http = _client(_state(allowed_hosts=("localhost",)), host="attacker.example:8000")
    response = http.get("/v1/models")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "host_not_allowed"
    assert error["message"] == "the Host header 'attacker.example' is not one of --allowed-hosts"


def test_an_allowed_host_reaches_the_route() -> None:
    http = _client(_state(allowed_hosts=("localhost",)), host="localhost:8000")
    assert http.get("/v1/models").status_code == 503  # the route itself: no model loaded


def test_probes_answer_any_host() -> None:
    http = _client(_state(allowed_hosts=("localhost",)), host="10.0.0.7:8000")
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 503


def test_without_allowed_hosts_any_host_is_served() -> None:
    assert _client(_state(), host="whatever.example").get("/v1/models").status_code == 503


@pytest.mark.parametrize("entry", ["localhost:8000", "api.*.com", "*example.com", "**", ""])
def test_an_allowed_hosts_entry_that_cannot_match_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="--allowed-hosts"):
        ServerConfig(allowed_hosts=(entry,))


# ---- keys and the metrics port -----------------------------------------------------------------


def test_the_same_key_for_inference_and_admin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        ServerConfig(api_key="k", admin_api_key="k")


def test_the_metrics_port_must_differ_from_the_api_port() -> None:
    with pytest.raises(ConfigError, match="--metrics-port"):
        ServerConfig(port=8000, metrics_port=8000)


def test_with_only_an_admin_key_inference_asks_for_the_admin_key() -> None:
    response = _client(_state(admin_api_key=ADMIN)).get("/v1/models")
    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert message == "missing API key: send 'Authorization: Bearer <admin API key>'"


def test_training_data_with_the_inference_key_is_401_naming_the_admin_key() -> None:
    response = _client(_state(api_key=API, admin_api_key=ADMIN), API).get("/v1/files")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        "invalid API key: this route needs the admin API key"
    )


def test_the_metrics_listener_serves_metrics_without_a_key_and_nothing_else() -> None:
    http = TestClient(metrics_app(_state(api_key=API, admin_api_key=ADMIN)))
    response = http.get("/metrics")
    assert response.status_code == 200
    assert "loraplex_num_requests_running" in response.text
    assert http.get("/v1/models").status_code == 404
    assert http.get("/info").status_code == 404


# ---- cross-site writes (server/api/csrf.py; in a real browser: test_cross_site.py) ----------

EVIL = "http://evil.example"
UPLOAD = {"files": ("adapter_config.json", b"{}")}


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": EVIL, "sec-fetch-site": "cross-site"},
        {"origin": "http://testserver:9999", "sec-fetch-site": "same-site"},  # another port
        {"sec-fetch-site": "cross-site"},  # a navigation with no Origin
        {"origin": EVIL},  # a browser without Sec-Fetch-Site
        {"origin": "null"},  # a sandboxed page or a file
    ],
)
@pytest.mark.parametrize("keys", [{}, {"api_key": API, "admin_api_key": ADMIN}])
def test_a_cross_site_write_is_refused_before_any_route(
    headers: dict[str, str], keys: dict[str, str]
) -> None:
    http = _client(_state(**keys), ADMIN if keys else None)
    for response in (
        http.post("/v1/adapters", data={"name": "x"}, files=UPLOAD, headers=headers),
        http.post("/v1/files", data={"purpose": "fine-tune"}, files=UPLOAD, headers=headers),
        http.delete("/v1/adapters/x", headers=headers),
    ):
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "cross_site_request"
        assert "--csrf-trusted-origins" in error["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, the SDKs, the LoRAX client: no browser headers at all
        {"origin": "http://testserver", "sec-fetch-site": "same-origin"},  # the console
        {"sec-fetch-site": "none"},  # typed by the user
        {"origin": "http://TestServer/"},  # same origin, a browser without Sec-Fetch-Site
    ],
)
def test_same_origin_and_non_browser_writes_reach_the_route(headers: dict[str, str]) -> None:
    response = _client(_state()).post("/v1/adapters", files=UPLOAD, headers=headers)
    assert response.status_code == 503  # the route: no model loaded here


def test_a_trusted_origin_may_write_and_reads_are_never_refused() -> None:
    http = _client(_state(csrf_trusted_origins=(f"{EVIL}/",)))
    headers = {"origin": EVIL, "sec-fetch-site": "cross-site"}
    assert http.post("/v1/adapters", files=UPLOAD, headers=headers).status_code == 503
    other = {"origin": "https://other.example", "sec-fetch-site": "cross-site"}
    assert http.get("/v1/models", headers=other).status_code == 503
    assert http.post("/v1/adapters", files=UPLOAD, headers=other).status_code == 403


@pytest.mark.parametrize("entry", ["evil.example", "ftp://evil.example", "http://a.b/path", ""])
def test_a_trusted_origin_that_is_not_an_origin_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="--csrf-trusted-origins"):
        ServerConfig(csrf_trusted_origins=(entry,))
