"""GET /metrics after real traffic, parsed by prometheus_client: the counters move by exactly
what was sent, and the gauges describe the pool, the adapters and the queues."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.conftest import MODEL_NAME, Oracle, adapter_name
from tests.integration.live_server import LiveServer, wait_until

M = {"model_name": MODEL_NAME}


def short_request(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "If", "max_tokens": 2}


def test_counters_and_histograms_move_by_the_traffic_sent(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(25)
    prompts = ["The quick brown fox", "Return a new list containing", "If"]
    max_tokens = [3, 7, 5]
    before = server.metrics()
    with server.client() as http:
        for prompt, n in zip(prompts, max_tokens, strict=True):
            body = {"model": adapter, "prompt": prompt, "max_tokens": n, "ignore_eos": True}
            assert http.post("/v1/completions", json=body).status_code == 200
    after = server.metrics()

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **M, **labels) - before.value(name, **M, **labels)

    prompt_tokens = sum(len(oracle.tokens(p)) for p in prompts)
    generated = sum(max_tokens)
    assert moved("loraplex_prompt_tokens_total") == prompt_tokens
    assert moved("loraplex_generation_tokens_total") == generated
    assert moved("loraplex_request_success_total", finished_reason="length") == 3
    assert moved("loraplex_adapter_requests_total", adapter=adapter) == 3
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert moved(f"loraplex_{histogram}_count") == 3, histogram
    assert moved("loraplex_inter_token_latency_seconds_count") == generated - 3
    assert moved("loraplex_request_prompt_tokens_sum") == prompt_tokens
    assert moved("loraplex_request_generation_tokens_sum") == generated


def test_a_stop_string_is_counted_under_finished_reason_stop(
    server: LiveServer, oracle: Oracle
) -> None:
    adapter = adapter_name(26)
    text = oracle.complete(adapter, "The quick", max_tokens=12, ignore_eos=True)
    stop = text[4:6]
    before = server.metrics().value("loraplex_request_success_total", **M, finished_reason="stop")
    body = {"model": adapter, "prompt": "The quick", "max_tokens": 12, "temperature": 0}
    body |= {"stop": stop, "ignore_eos": True}
    with server.client() as http:
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    after = server.metrics().value("loraplex_request_success_total", **M, finished_reason="stop")
    assert after == before + 1


def test_every_metric_is_under_the_loraplex_prefix(server: LiveServer) -> None:
    families = server.metrics().families
    assert families
    assert all(name.startswith("loraplex_") for name in families), sorted(families)


def test_pool_pages_by_kind_add_up_to_the_pool(server: LiveServer) -> None:
    with server.client() as http:
        assert http.post("/v1/completions", json=short_request(adapter_name(27))).is_success
        pool = http.get("/info").json()["pool"]
    m = server.metrics()
    pages = {
        k: m.value("loraplex_pool_pages", **M, kind=k)
        for k in ("kv", "kv_cached", "adapter", "free")
    }
    assert sum(pages.values()) == pool["pages"]
    assert pages["adapter"] > 0  # the adapters used so far stay resident while the pool has room
    assert 0 <= m.value("loraplex_kv_cache_usage_perc", **M) <= 1


def test_adapter_gauges_count_registered_and_resident_adapters_and_loads(
    server: LiveServer,
) -> None:
    with server.client() as http:
        registered = len(http.get("/v1/adapters").json()["data"])
        assert http.post("/v1/completions", json=short_request(adapter_name(28))).is_success
    m = server.metrics()
    assert m.value("loraplex_adapters_registered", **M) == registered
    assert m.value("loraplex_adapters_device_resident", **M) >= 1
    assert m.value("loraplex_adapters_host_resident", **M) >= 1
    assert m.value("loraplex_adapter_loads_total", **M) >= 1
    assert m.value("loraplex_adapter_disk_loads_total", **M) >= 1
    assert m.value("loraplex_adapter_load_seconds_count", **M) == m.value(
        "loraplex_adapter_loads_total", **M
    )
    assert "loraplex_adapter_evictions_total" in m.text


def test_an_upload_shows_in_the_registered_gauge_without_any_traffic(
    server: LiveServer, spare_adapters: Path
) -> None:
    before = server.metrics().value("loraplex_adapters_registered", **M)
    files = [
        ("files", (f, (spare_adapters / "spare-3" / f).read_bytes()))
        for f in ("adapter_config.json", "adapter_model.safetensors")
    ]
    with server.client(admin=True) as http:
        response = http.post("/v1/adapters", data={"name": "gauge-check"}, files=files)
    assert response.status_code == 201
    assert server.metrics().value("loraplex_adapters_registered", **M) == before + 1


def test_lora_requests_info_names_the_running_and_waiting_adapters(
    slow_server: LiveServer, adapter_dirs: dict[str, Path]
) -> None:
    name = "info-check"
    files = [
        ("files", (f, (adapter_dirs[adapter_name(29)] / f).read_bytes()))
        for f in ("adapter_config.json", "adapter_model.safetensors")
    ]
    with slow_server.client(admin=True) as http:
        assert http.post("/v1/adapters", data={"name": name}, files=files).status_code == 201
    endless = {"prompt": "If", "max_tokens": 4000, "ignore_eos": True, "stream": True}

    def info() -> dict[str, str]:
        series = slow_server.metrics().labels("loraplex_lora_requests_info")
        assert len(series) == 1  # the previous label set is removed, not left stale
        return series[0]

    with (
        slow_server.client() as http,
        http.stream("POST", "/v1/completions", json={**endless, "model": name}) as running,
        http.stream("POST", "/v1/completions", json={**endless, "model": MODEL_NAME}),
    ):
        lines = running.iter_lines()  # kept: dropping the iterator closes the connection
        assert next(line for line in lines if line.startswith("data:"))
        assert wait_until(lambda: info()["running_lora_adapters"] == name)
        assert info()["waiting_lora_adapters"] == ""  # the base model is no adapter
        assert info()["max_lora"] == "32"
    assert wait_until(lambda: info()["running_lora_adapters"] == "", timeout=10)


def test_metrics_need_the_inference_key_and_use_the_prometheus_content_type(
    server: LiveServer,
) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    response = httpx.get(f"{server.url}/metrics", headers=server.headers())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
