"""Hostile adapter configs against a real server: catastrophic-backtracking patterns are a 400
naming their field while /health keeps answering, a fine-tuning job's target_modules too,
and a bad folder under --preload-adapters is skipped while the rest serve."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import ENGINE_FLAGS, MODEL_NAME, serve_flags
from tests.integration.fine_tuning_data import jsonl, ordering_task, upload
from tests.integration.live_server import LiveServer

# Python's re needs exponential time to fail this on a module name (there is no "Z").
REDOS = "(.*)*(.*)*(.*)*(.*)*Z"
HEALTH_LIMIT_S = 1.0


def with_config(source: Path, dest: Path, **changes: object) -> Path:
    """A copy of an adapter folder with its adapter_config.json changed."""
    shutil.copytree(source, dest)
    config = json.loads((dest / CONFIG_FILE).read_text())
    (dest / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return dest


@pytest.fixture(scope="module")
def preload_root(spare_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good adapter folder and two bad ones (a ReDoS pattern, a config that is not JSON)."""
    root = tmp_path_factory.mktemp("hardening-preload")
    shutil.copytree(spare_adapters / "spare-0", root / "good")
    with_config(spare_adapters / "spare-0", root / "bad-pattern", rank_pattern={REDOS: 8})
    shutil.copytree(spare_adapters / "spare-0", root / "bad-json")
    (root / "bad-json" / CONFIG_FILE).write_text("{not json")
    return root


@pytest.fixture(scope="module")
def server(
    model_dir: Path, preload_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    args = serve_flags(**ENGINE_FLAGS, served_model_name=MODEL_NAME)
    args += ["--preload-adapters", str(preload_root)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("hardening") / "data", args).start()
    yield live
    live.stop()


@contextmanager
def health_poller(server: LiveServer) -> Iterator[list[float]]:
    """Poll /health from another thread for the duration; yields the latencies seen."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    ok = http.get("/health").status_code == 200
                except httpx.TimeoutException:
                    ok = False
                latencies.append(time.perf_counter() - start if ok else float("inf"))
                time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        time.sleep(0.1)  # a few polls before the request under test
        yield latencies
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join()


def upload_dir(server: LiveServer, name: str, adapter_dir: Path) -> httpx.Response:
    files = [("files", (f, (adapter_dir / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    with server.client(admin=True, timeout=30) as http:
        return http.post("/v1/adapters", data={"name": name}, files=files)


def test_a_bad_preload_folder_is_skipped_and_the_rest_serve(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/ready").status_code == 200
    with server.client() as http:
        names = [a["id"] for a in http.get("/v1/adapters").json()["data"]]
        body = {"model": "good", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        response = http.post("/v1/completions", json=body)
    assert names == ["good"]
    assert response.status_code == 200, response.text
    log = server.log_tail(200)
    assert "skipping preloaded adapter bad-pattern" in log
    assert "rank_pattern key" in log
    assert "skipping preloaded adapter bad-json" in log


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("rank_pattern", {"rank_pattern": {REDOS: 8}}),
        ("alpha_pattern", {"alpha_pattern": {REDOS: 8}}),
        ("target_modules", {"target_modules": REDOS}),
    ],
)
def test_a_catastrophic_pattern_is_400_naming_its_field_while_health_answers(
    server: LiveServer, spare_adapters: Path, tmp_path: Path, field: str, change: dict
) -> None:
    adapter = with_config(spare_adapters / "spare-0", tmp_path / "redos", **change)
    with health_poller(server) as latencies:
        response = upload_dir(server, f"redos-{field}", adapter)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]
    assert len(latencies) >= 5
    assert max(latencies) < HEALTH_LIMIT_S
    with server.client() as http:
        assert http.get(f"/v1/adapters/redos-{field}").status_code == 404


def test_a_fine_tuning_job_with_a_catastrophic_target_pattern_is_400(server: LiveServer) -> None:
    with server.client(admin=True, timeout=30) as admin:
        file_id = upload(admin, "train.jsonl", jsonl(ordering_task(8, seed=0)))
        body = {
            "model": MODEL_NAME,
            "training_file": file_id,
            "method": {"type": "qlora", "hyperparameters": {"r": 4, "target_modules": REDOS}},
        }
        with health_poller(server) as latencies:
            response = admin.post("/v1/fine_tuning/jobs", json=body)
        jobs = admin.get("/v1/fine_tuning/jobs").json()["data"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "target_modules" in error["message"]
    assert error["param"] == "method.hyperparameters"
    assert max(latencies) < HEALTH_LIMIT_S
    assert jobs == []
