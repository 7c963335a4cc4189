"""A real Prometheus scrapes a live loraplex on its keyless --metrics-port while traffic runs,
and every PromQL expression of the Grafana dashboard returns data through Prometheus' HTTP API.

Needs the `prometheus` binary (Debian's `prometheus` package; .ci/run installs it) and skips,
saying so, without it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.metrics_vllm import VLLM_NAMES
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, serve_flags
from tests.integration.fine_tuning_data import jsonl, ordering_task, upload
from tests.integration.live_server import REPO_ROOT, LiveServer, free_port
from tests.integration.prometheus_server import PrometheusServer, prometheus_binary

pytestmark = pytest.mark.skipif(
    prometheus_binary() is None,
    reason="the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)",
)

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "loraplex.json"
ADAPTERS = ("spare-0", "spare-1", "spare-2")  # three adapters through two device slots
RATE_WINDOW = "20s"  # stands in for Grafana's $__rate_interval (4 scrapes at least)
CHECK_TIMEOUT_S = 40.0
MAX_ADAPTERS = 2  # --metrics-max-adapters: fewer than ADAPTERS, so the bound shows


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in."""
    return expr.replace("$model_name", MODEL_NAME).replace("$__rate_interval", RATE_WINDOW)


@pytest.fixture(scope="module")
def monitored(
    model_dir: Path, spare_adapters: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, PrometheusServer]]:
    """A server with a keyless metrics port and vLLM's names too, and a Prometheus scraping it
    every second."""
    metrics_port = free_port()
    args = serve_flags(**{**ENGINE_FLAGS, "max_loras": 2}, served_model_name=MODEL_NAME)
    args += ["--metrics-port", str(metrics_port), "--metrics-vllm-names"]
    args += ["--metrics-max-adapters", str(MAX_ADAPTERS), "--preload-adapters"]
    args += [str(spare_adapters / name) for name in ADAPTERS]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("monitored") / "data", args).start()
    prometheus = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{metrics_port}"]
    )
    try:
        prometheus.start()
        yield live, prometheus
    finally:
        prometheus.stop()
        live.stop()


def drive_traffic(server: LiveServer, stop: threading.Event, failures: list[str]) -> None:
    """Completions over the adapters and the base model until `stop`: loads, evictions, tokens.
    A refused request ends it, noted in `failures`."""
    with server.client() as http:
        for model in itertools.cycle((*ADAPTERS, MODEL_NAME)):
            if stop.is_set():
                return
            body = {"model": model, "prompt": "The quick brown", "max_tokens": 6}
            response = http.post("/v1/completions", json=body | {"ignore_eos": True})
            if response.status_code != 200:
                failures.append(f"{model}: {response.status_code} {response.text}")
                return


def start_training(server: LiveServer) -> str:
    """A long fine-tuning job that evaluates often, so the per-job series (tokens/s, progress,
    training and validation loss) exist while Prometheus scrapes; cancelled by the caller."""
    rows = jsonl(ordering_task(32, seed=3))
    with server.client(admin=True) as admin:
        train, valid = upload(admin, "train.jsonl", rows), upload(admin, "valid.jsonl", rows)
        hyper = {"r": 8, "batch_size": 2, "quantize": "none", "max_steps": 5000}
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": server.model_dir.name,
                "training_file": train,
                "validation_file": valid,
                "method": {
                    "type": "qlora",
                    "hyperparameters": {**hyper, "checkpoint_steps": 0, "eval_steps": 2},
                },
            },
        )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def without_data(prometheus: PrometheusServer, exprs: list[str]) -> dict[str, str]:
    """The expressions that return nothing (or NaN) now, with what they returned."""
    missing = {}
    for expr in exprs:
        result = prometheus.query(as_promql(expr))
        if not result or any(math.isnan(float(r["value"][1])) for r in result):
            missing[expr] = str(result)[:200]
    return missing


def test_every_dashboard_expression_returns_data_from_a_real_prometheus(
    monitored: tuple[LiveServer, PrometheusServer],
) -> None:
    server, prometheus = monitored
    exprs = dashboard_exprs()
    assert len(exprs) > 40
    stop, failures = threading.Event(), list[str]()
    job_id = start_training(server)
    traffic = threading.Thread(target=drive_traffic, args=(server, stop, failures), daemon=True)
    traffic.start()
    try:
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        missing = without_data(prometheus, exprs)
        while missing and time.monotonic() < deadline and traffic.is_alive():
            time.sleep(1.0)
            missing = without_data(prometheus, exprs)
    finally:
        stop.set()
        traffic.join(timeout=30)
        with server.client(admin=True) as admin:
            admin.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert not failures, failures
    assert not missing, json.dumps(missing, indent=1) + prometheus.log()


def test_the_dashboards_model_variable_lists_the_served_model(
    monitored: tuple[LiveServer, PrometheusServer],
) -> None:
    _, prometheus = monitored
    (variable,) = dashboard()["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()  # type: ignore[union-attr]

    def values() -> list[str]:
        return prometheus.api(f"label/{label}/values", **{"match[]": metric})

    deadline = time.monotonic() + 15
    while MODEL_NAME not in values() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert values() == [MODEL_NAME]


def test_prometheus_scrapes_without_a_key_while_the_api_port_wants_one(
    monitored: tuple[LiveServer, PrometheusServer],
) -> None:
    server, prometheus = monitored
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401
    deadline = time.monotonic() + 15
    while not prometheus.query('up{job="loraplex"} == 1') and time.monotonic() < deadline:
        time.sleep(0.5)
    (up,) = prometheus.query('up{job="loraplex"}')
    assert up["value"][1] == "1"


def test_tools_that_read_vllm_names_find_them_in_prometheus(
    monitored: tuple[LiveServer, PrometheusServer],
) -> None:
    _, prometheus = monitored
    names = [name for names in VLLM_NAMES.values() for name in names]
    deadline = time.monotonic() + 15
    missing = names
    while missing and time.monotonic() < deadline:
        missing = [n for n in names if not prometheus.query(f'{{__name__=~"{n}.*"}}')]
        time.sleep(0.5)
    assert not missing


def test_per_adapter_series_stay_within_the_bound(
    monitored: tuple[LiveServer, PrometheusServer],
) -> None:
    server, _ = monitored
    with server.client() as http:
        for name in ADAPTERS:
            body = {"model": name, "prompt": "If", "max_tokens": 1}
            assert http.post("/v1/completions", json=body).status_code == 200
    assert len(server.metrics().labels("loraplex_lora_adapter_residency")) == MAX_ADAPTERS
    assert len(server.metrics().labels("loraplex_adapter_requests_total")) == MAX_ADAPTERS + 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_compose_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(REPO_ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
