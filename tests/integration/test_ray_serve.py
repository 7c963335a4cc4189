"""`loraplex serve-ray` on this CPU machine: 2 engine replicas behind Ray Serve's ingress.

One cluster start for the whole module (Ray is heavy on 2 cores): adapters uploaded through
the cluster serve from it with a plain server's completions; every request for an adapter
is served by the one replica that holds it (the x-loraplex-replica header); streaming passes
through; an adapter trained by a job through the cluster serves from every replica; a delete
is honoured by every replica.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.integration.conftest import ENGINE_FLAGS, LORA_CONFIGS, MODEL_NAME, serve_flags
from tests.integration.fine_tuning_data import jsonl, ordering_task, wait_for_job
from tests.integration.fine_tuning_data import upload as upload_file
from tests.integration.live_server import LiveServer, sse_events, wait_until
from tests.peft_reference import save_peft_adapter

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install '.[ray]'")

logger = logging.getLogger(__name__)

NUM_REPLICAS = 2
NUM_ADAPTERS = 6
POLL_S = 0.5
PROMPT = "The quick brown fox"
REPLICA_HEADER = "x-loraplex-replica"
# Replicas report what they hold every 0.1 s; it reaches Ray's routers through the controller.
ROUTING_LAG_S = 2.0


@dataclass
class RayServer(LiveServer):
    """`serve-ray --replicas 2`, started and stopped like a plain server."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("serve")] = "serve-ray"
        return [*cmd, "--replicas", str(NUM_REPLICAS), "--cpus-per-replica", "0.5"]


@pytest.fixture(scope="module")
def ray_adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-adapters")
    return {
        f"ray-{i}": save_peft_adapter(
            model_dir, root / f"ray-{i}", seed=300 + i, **LORA_CONFIGS[i % len(LORA_CONFIGS)]
        )
        for i in range(NUM_ADAPTERS)
    }


@pytest.fixture(scope="module")
def servers(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """A plain server (the reference) and the Ray cluster, same engine flags."""
    args = serve_flags(**ENGINE_FLAGS, served_model_name=MODEL_NAME)
    plain = LiveServer(model_dir, tmp_path_factory.mktemp("plain") / "data", args).start()
    env = {"RAY_USAGE_STATS_ENABLED": "0", "LORAPLEX_TEST_THREADS": "1"}
    cluster = RayServer(
        model_dir,
        tmp_path_factory.mktemp("ray") / "data",
        [*args, "--adapter-store-poll-s", str(POLL_S)],
        env=env,
    )
    try:
        cluster.start()
        yield plain, cluster
    finally:
        cluster.stop()
        plain.stop()


def upload(server: LiveServer, name: str, adapter_dir: Path) -> httpx.Response:
    files = [("files", (f, (adapter_dir / f).read_bytes())) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    with server.client(admin=True) as http:
        return http.post("/v1/adapters", data={"name": name}, files=files)


def complete(server: LiveServer, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    with server.client() as http:
        return http.post("/v1/completions", json=body)


def test_the_cluster_serves_uploaded_adapters_like_one_server_from_the_replica_holding_them(
    servers: tuple[LiveServer, LiveServer], ray_adapters: dict[str, Path]
) -> None:
    plain, cluster = servers
    for name, path in ray_adapters.items():
        assert upload(cluster, name, path).status_code == 201
        assert upload(plain, name, path).status_code == 201
    for name in ray_adapters:  # every replica has seen every upload (each polls the store)
        path = f"/v1/adapters/{name}"
        assert wait_until(lambda p=path: answered_by_every_replica(cluster, p, 200))
    expected = {n: complete(plain, n).json()["choices"][0]["text"] for n in ray_adapters}
    holders = {}
    for name in ray_adapters:  # the first request makes some replica load (hold) it
        response = complete(cluster, name)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[name]
        holders[name] = response.headers[REPLICA_HEADER]
    time.sleep(
        2.0
    )  # replicas report what they hold to Ray's routers every 0.1 s, via the controller
    for name in ray_adapters:
        for _ in range(3):
            response = complete(cluster, name)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == expected[name]
            assert response.headers[REPLICA_HEADER] == holders[name], f"{name} moved replicas"
    logger.info("adapter -> replica: %s", holders)
    base = complete(cluster, MODEL_NAME)
    assert (
        base.json()["choices"][0]["text"]
        == complete(plain, MODEL_NAME).json()["choices"][0]["text"]
    )


def test_streaming_passes_through_the_ingress(
    servers: tuple[LiveServer, LiveServer], ray_adapters: dict[str, Path]
) -> None:
    plain, cluster = servers
    name = next(iter(ray_adapters))
    body = {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with cluster.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == complete(plain, name).json()["choices"][0]["text"]


def test_an_adapter_trained_through_the_cluster_serves_from_every_replica(
    servers: tuple[LiveServer, LiveServer],
) -> None:
    _, cluster = servers
    with cluster.client(admin=True) as admin:  # files and jobs route to one replica
        file_id = upload_file(admin, "train.jsonl", jsonl(ordering_task(16, seed=0)))
        time.sleep(ROUTING_LAG_S)  # until Ray's routers know which replica holds the key
        hyper = {"r": 4, "batch_size": 2, "max_steps": 3, "quantize": "none"}
        method = {"type": "qlora", "hyperparameters": hyper}
        body = {"model": MODEL_NAME, "training_file": file_id, "method": method}
        created = admin.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job = wait_for_job(admin, created.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    name = job["fine_tuned_model"]
    assert wait_until(lambda: answered_by_every_replica(cluster, f"/v1/adapters/{name}", 200))
    assert complete(cluster, name).status_code == 200


def answered_by_every_replica(server: LiveServer, path: str, status: int) -> bool:
    """GET path until every replica has answered (it goes to any): whether all did with
    status (a replica whose store poll has not seen a change yet answers otherwise)."""
    answered_by = set()
    with server.client() as http:
        for _ in range(20):
            response = http.get(path)
            if response.status_code != status:
                return False
            answered_by.add(response.headers[REPLICA_HEADER])
            if len(answered_by) == NUM_REPLICAS:
                return True
    return False


def test_a_delete_through_the_cluster_is_honoured_by_every_replica(
    servers: tuple[LiveServer, LiveServer], ray_adapters: dict[str, Path]
) -> None:
    _, cluster = servers
    name = list(ray_adapters)[-1]
    with cluster.client(admin=True) as http:
        assert http.delete(f"/v1/adapters/{name}").status_code == 200
    assert wait_until(lambda: answered_by_every_replica(cluster, f"/v1/adapters/{name}", 404))
    assert complete(cluster, name).status_code == 404


def test_ray_overhead_per_request(servers: tuple[LiveServer, LiveServer]) -> None:
    """Median latency of a 1-token base completion, plain vs through Ray (docs/operations.md)."""
    plain, cluster = servers

    def median_ms(server: LiveServer) -> float:
        times = []
        for _ in range(10):
            start = time.perf_counter()
            assert complete(server, MODEL_NAME, max_tokens=1).status_code == 200
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    plain_ms, ray_ms = median_ms(plain), median_ms(cluster)
    logger.warning(
        "1-token completion, median of 10: plain %.1f ms, Ray Serve %.1f ms", plain_ms, ray_ms
    )
    assert ray_ms > 0 and plain_ms > 0
