"""The console's server side: its pages and their headers, /v1/stats, and paged adapter
listings; and the stats history's arithmetic on its own."""

from __future__ import annotations

import httpx
import pytest

from server.api.stats_history import StatsHistory
from server.metrics import Metrics
from tests.integration.conftest import MODEL_NAME, NUM_ADAPTERS, adapter_name
from tests.integration.live_server import LiveServer, wait_until


def test_console_pages_are_served_with_a_strict_csp(server: LiveServer):
    for path in ("/console/", "/console/js/main.js", "/console/style.css", "/console/adapters"):
        response = httpx.get(f"{server.url}{path}", timeout=10)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    assert (
        httpx.get(f"{server.url}/console/js/main.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )


def test_the_console_has_no_inline_script():
    from server.api.routes.console import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    assert '<script type="module" src="js/main.js"></script>' in html
    assert html.count("<script") == 1
    scripts = "".join(p.read_text() for p in (STATIC_DIR / "js").glob("*.js"))
    assert "innerHTML" not in scripts and "eval(" not in scripts


def test_console_files_outside_the_static_folder_are_not_served(server: LiveServer):
    outside = ("..%2F..%2Fapi%2Fapp.py", "js/..%2F..%2F__init__.py", "a%00.js", "x" * 300 + ".js")
    for path in outside:
        response = httpx.get(f"{server.url}/console/{path}", timeout=10)
        assert response.status_code == 404, path
        assert "/server/" not in response.text  # no server path in the message


def test_the_landing_page_links_to_the_console(server: LiveServer):
    response = httpx.get(f"{server.url}/", timeout=10)
    assert response.status_code == 200
    assert 'href="/console/"' in response.text
    redirect = httpx.get(f"{server.url}/console", timeout=10)
    assert redirect.status_code == 307 and redirect.headers["location"] == "/console/"


def test_adapter_listing_without_parameters_is_unchanged(server: LiveServer):
    with server.client() as client:
        body = client.get("/v1/adapters").json()
    assert [a["id"] for a in body["data"]][:NUM_ADAPTERS] == [
        adapter_name(i) for i in range(NUM_ADAPTERS)
    ]
    assert all(a["residency"] is None for a in body["data"])


def test_adapter_pages_follow_after_and_carry_residency(server: LiveServer):
    with server.client() as client:
        first = client.get("/v1/adapters", params={"limit": 5}).json()
        second = client.get("/v1/adapters", params={"limit": 5, "after": "lora-04"}).json()
    assert [a["id"] for a in first["data"]] == [adapter_name(i) for i in range(5)]
    assert [a["id"] for a in second["data"]] == [adapter_name(i) for i in range(5, 10)]
    assert first["has_more"] and first["total"] >= NUM_ADAPTERS
    item = first["data"][0]
    assert item["residency"]["active_requests"] == 0
    assert isinstance(item["requests_served"], int)


def test_adapter_search_matches_names_case_insensitively(server: LiveServer):
    with server.client() as client:
        body = client.get("/v1/adapters", params={"search": "LORA-1", "limit": 100}).json()
    assert [a["id"] for a in body["data"]] == [adapter_name(i) for i in range(10, 20)]
    assert body["total"] == 10 and not body["has_more"]


def test_an_unknown_after_is_a_400_naming_it(server: LiveServer):
    with server.client() as client:
        response = client.get("/v1/adapters", params={"after": "no-such-adapter"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "after"


def test_requests_served_counts_an_adapters_requests(server: LiveServer):
    name = adapter_name(7)

    def served() -> int:
        with server.client() as client:
            page = client.get("/v1/adapters", params={"search": name, "limit": 1}).json()
        return page["data"][0]["requests_served"]

    before = served()
    with server.client() as client:
        body = {"model": name, "prompt": "hello", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert served() == before + 1


def test_stats_needs_a_key_and_reports_tokens_per_second(server: LiveServer):
    assert httpx.get(f"{server.url}/v1/stats", timeout=10).status_code == 401
    with server.client() as client:
        body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 8, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200

        def generated() -> bool:
            points = client.get("/v1/stats", params={"seconds": 60}).json()["data"]
            return any(p["generation_tokens_per_s"] > 0 for p in points)

        assert wait_until(generated, timeout=15, interval=0.5)
        stats = client.get("/v1/stats").json()
    last = stats["data"][-1]
    assert stats["interval_s"] > 0
    assert last["kv_pages"] + last["adapter_pages"] + last["free_pages"] > 0
    assert last["running"] >= 0 and last["waiting"] >= 0


def _metrics_with(tokens: float, ttft: list[float]) -> Metrics:
    metrics = Metrics("m")
    metrics.generation_tokens.labels("m").inc(tokens)
    for t in ttft:
        metrics.ttft.labels("m").observe(t)
    return metrics


def test_history_rates_are_differences_over_the_interval():
    metrics = _metrics_with(0, [])
    history = StatsHistory(metrics, interval_s=1, history_s=10)
    assert history.sample(now=100.0) is None  # the baseline
    metrics.generation_tokens.labels("m").inc(50)
    metrics.ttft.labels("m").observe(0.2)
    metrics.ttft.labels("m").observe(0.4)
    point = history.sample(now=102.0)
    assert point is not None
    assert point.generation_tokens_per_s == pytest.approx(25.0)
    assert point.mean_ttft_s == pytest.approx(0.3)
    assert point.mean_e2e_latency_s is None
    idle = history.sample(now=103.0)
    assert idle is not None and idle.generation_tokens_per_s == 0 and idle.mean_ttft_s is None


def test_history_keeps_only_its_window():
    history = StatsHistory(_metrics_with(0, []), interval_s=1, history_s=5)
    for t in range(20):
        history.sample(now=float(t))
    assert len(history.samples) == 6
    assert [p["time"] for p in history.since(2.5)] == [17.0, 18.0, 19.0]


def test_hot_adapters_rank_the_requests_of_the_window():
    metrics = _metrics_with(0, [])
    history = StatsHistory(metrics, interval_s=1, history_s=60)
    metrics.adapter_requests.labels("m", "old").inc(100)  # before the baseline: not counted
    history.sample(now=0.0)
    metrics.adapter_requests.labels("m", "a").inc(2)
    metrics.adapter_requests.labels("m", "b").inc(5)
    history.sample(now=1.0)
    metrics.adapter_requests.labels("m", "a").inc(4)
    history.sample(now=2.0)
    assert history.hot_adapters(seconds=60) == [
        {"adapter": "a", "requests": 6},
        {"adapter": "b", "requests": 5},
    ]
    assert history.hot_adapters(seconds=1) == [{"adapter": "a", "requests": 4}]
    assert "adapter_requests" not in history.since(60)[0]
