"""Checkpoints serve while their job runs, leave when the keep policy prunes them, and a
running job shows in /metrics."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fine_tuning_data import SMALL, jsonl, ordering_task, upload, wait_for_job
from tests.integration.live_server import LiveServer, wait_until

ENDLESS = 1_000_000  # max_steps of a job that runs until cancelled
PROMPT = "Order: 3 1 2 0\nAnswer:"


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("ft-checkpoints") / "data"
    live = LiveServer(model_dir, data_dir, args=["--max-lora-rank", "8"]).start()
    yield live
    live.stop()


def _start(server: LiveServer, suffix: str, **hyperparameters: int) -> dict:
    with server.client(admin=True) as admin:
        file_id = upload(admin, "train.jsonl", jsonl(ordering_task(64, seed=0)))
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": server.model_dir.name,
                "training_file": file_id,
                "suffix": suffix,
                "method": {
                    "type": "qlora",
                    "hyperparameters": {**SMALL, "max_steps": ENDLESS, **hyperparameters},
                },
            },
        )
    assert response.status_code == 200, response.text
    return response.json()


def _cancel(server: LiveServer, job_id: str) -> dict:
    with server.client(admin=True) as admin:
        admin.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        return wait_for_job(admin, job_id, timeout=60)


def _published(server: LiveServer, job_id: str) -> list[str]:
    """The job's checkpoint model names, newest first, once published."""
    with server.client(admin=True) as admin:
        page = admin.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    return [
        c["fine_tuned_model_checkpoint"] for c in page["data"] if c["fine_tuned_model_checkpoint"]
    ]


def _models(server: LiveServer) -> dict[str, dict]:
    with server.client() as client:
        return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def _complete(server: LiveServer, model: str) -> tuple[int, dict]:
    with server.client() as client:
        response = client.post(
            "/v1/completions",
            json={"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
        )
    return response.status_code, response.json()


def test_pruned_checkpoints_leave_the_model_list_and_kept_ones_outlive_the_job(server):
    job = _start(server, "pruned", checkpoint_steps=5, keep_checkpoints=1)
    seen: list[str] = []
    assert wait_until(lambda: bool(seen.extend(_published(server, job["id"])) or seen), 120)
    first = seen[0]
    prefix = f"ft:{job['model']}:pruned:{job['id'].removeprefix('ftjob-')[:8]}:ckpt-step-"
    assert first.startswith(prefix)
    assert wait_until(
        lambda: (
            first not in _models(server) and any(n != first for n in _published(server, job["id"]))
        ),
        timeout=120,
    )
    status, body = _complete(server, first)
    assert status == 404 and body["error"]["param"] == "model"
    final = _cancel(server, job["id"])
    assert final["status"] == "cancelled"
    kept = _published(server, job["id"])
    assert len(kept) == 1 and kept[0] in _models(server)  # the kept one stays servable
    assert _complete(server, kept[0])[0] == 200
    metrics = server.metrics()
    assert metrics.value("loraplex_fine_tuning_jobs", status="cancelled") >= 1
    assert metrics.value("loraplex_fine_tuning_step", job_id=job["id"]) == 0  # series gone


@pytest.fixture(scope="module")
def running_job(server: LiveServer) -> Iterator[dict]:
    """A job that keeps training (and keeps every checkpoint) while the tests below run."""
    job = _start(server, "live", checkpoint_steps=2, keep_checkpoints=1000)
    assert wait_until(lambda: bool(_published(server, job["id"])), timeout=120)
    yield job
    _cancel(server, job["id"])


def test_a_checkpoint_serves_while_its_job_still_runs(server, running_job):
    name = _published(server, running_job["id"])[0]  # the newest published
    short = running_job["id"].removeprefix("ftjob-")[:8]
    assert re.fullmatch(rf"ft:{server.model_dir.name}:live:{short}:ckpt-step-\d+", name)
    card = _models(server)[name]
    assert card["parent"] == server.model_dir.name
    status, body = _complete(server, name)
    assert status == 200, body
    assert body["model"] == name and body["choices"][0]["text"]
    with server.client(admin=True) as admin:
        job = admin.get(f"/v1/fine_tuning/jobs/{running_job['id']}").json()
    assert job["status"] == "running"


def test_metrics_show_the_running_job(server, running_job):
    job_id = running_job["id"]
    assert wait_until(
        lambda: server.metrics().value("loraplex_fine_tuning_validation_loss", job_id=job_id) > 0,
        timeout=60,
    )
    metrics = server.metrics()
    assert metrics.value("loraplex_fine_tuning_jobs", status="running") == 1
    assert metrics.value("loraplex_fine_tuning_queue_length") == 0
    assert metrics.value("loraplex_fine_tuning_step", job_id=job_id) >= 2
    assert metrics.value("loraplex_fine_tuning_total_steps", job_id=job_id) == ENDLESS
    assert metrics.value("loraplex_fine_tuning_tokens_per_second", job_id=job_id) > 0
    assert metrics.value("loraplex_fine_tuning_train_loss", job_id=job_id) > 0
