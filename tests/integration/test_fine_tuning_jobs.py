"""Fine-tuning job lifecycle over HTTP: cancel, a failing dataset, a restart mid-job, and
serving that keeps answering while a job trains."""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fine_tuning_data import (
    SMALL,
    all_events,
    jsonl,
    ordering_task,
    upload,
    wait_for_job,
)
from tests.integration.live_server import LiveServer, wait_until


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(model_dir, tmp_path / "data", args=["--max-lora-rank", "8"])
    live.start()
    yield live
    live.stop()


def _create(server: LiveServer, hyperparameters: dict, **body) -> dict:  # type: ignore[no-untyped-def]
    with server.client(admin=True) as admin:
        file_id = body.pop("training_file", None) or upload(
            admin, "train.jsonl", jsonl(ordering_task(64, seed=0))
        )
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": server.model_dir.name,
                "training_file": file_id,
                "method": {"type": "qlora", "hyperparameters": {**SMALL, **hyperparameters}},
                **body,
            },
        )
        assert response.status_code == 200, response.text
        return response.json()


def _step_events(server: LiveServer, job_id: str) -> list[dict]:
    with server.client(admin=True) as client:
        return [e for e in all_events(client, job_id) if (e["data"] or {}).get("learning_rate")]


def test_cancel_stops_a_running_job_within_a_step(server):
    job = _create(server, {"max_steps": 5000, "checkpoint_steps": 0})
    assert wait_until(lambda: len(_step_events(server, job["id"])) >= 2, timeout=120)
    with server.client(admin=True) as admin:
        assert admin.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        final = wait_for_job(admin, job["id"], timeout=60)
        events = [e["message"] for e in all_events(admin, job["id"])]
        models = [m["id"] for m in admin.get("/v1/models").json()["data"]]
    assert final["status"] == "cancelled"
    assert final["fine_tuned_model"] is None
    assert "Cancellation requested; stopping after this step" in events
    assert events[-1] == "The job was cancelled"
    assert len(_step_events(server, job["id"])) < 5000
    assert not any(m.startswith("ft:") for m in models)


def test_a_bad_dataset_fails_the_job_and_names_the_line(server):
    with server.client(admin=True) as admin:
        # Stored without checks (not purpose fine-tune), so the job's own validation meets it.
        bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "c"}\n'
        file_id = upload(admin, "bad.jsonl", bad, purpose="user_data")
    job = _create(server, {"max_steps": 5}, training_file=file_id)
    with server.client(admin=True) as client:
        final = wait_for_job(client, job["id"], timeout=60)
        events = all_events(client, job["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"] == "invalid_training_file"
    assert "line 2" in final["error"]["message"]
    assert events[-1]["level"] == "error"
    assert "line 2" in events[-1]["message"]


def test_a_restart_mid_job_resumes_from_the_last_checkpoint(server):
    # Eight micro-batches per step: the 55 steps after the first checkpoint take about 8 s
    # here, where the restart begins within a second of it (with one, some runs were at step
    # 30 of 60 by then, and a faster machine could finish before the restart).
    hyperparameters = {"max_steps": 60, "checkpoint_steps": 5, "gradient_accumulation_steps": 8}
    job = _create(server, hyperparameters, suffix="resumed")

    def checkpointed() -> bool:
        with server.client(admin=True) as client:
            return bool(client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"])

    assert wait_until(checkpointed, timeout=120)
    with server.client(admin=True) as client:
        running = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert running["status"] == "running", "the job ended before the restart"
    server.restart()
    with server.client(admin=True) as client:
        final = wait_for_job(client, job["id"], timeout=300)
        messages = [e["message"] for e in all_events(client, job["id"])]
        completion = client.post(
            "/v1/completions",
            json={
                "model": final["fine_tuned_model"],
                "prompt": "Order: 3 1 2 0\nAnswer:",
                "max_tokens": 4,
            },
        )
    assert final["status"] == "succeeded", final["error"]
    assert "Server restarted; resuming from the last checkpoint" in messages
    resumed = [m for m in messages if m.startswith("resumed from the checkpoint at step")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 5
    assert completion.status_code == 200


def test_serving_keeps_answering_while_a_job_trains(server):
    job = _create(server, {"max_steps": 5000, "checkpoint_steps": 0})
    assert wait_until(lambda: len(_step_events(server, job["id"])) >= 1, timeout=120)
    latencies = []
    with server.client() as client:
        for i in range(10):
            start = time.perf_counter()
            response = client.post(
                "/v1/completions",
                json={
                    "model": server.model_dir.name,
                    "prompt": f"Order: {i} 5\nAnswer:",
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
    with server.client(admin=True) as admin:
        still_running = admin.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
        admin.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert still_running == "running"
    assert max(latencies) < 30


def test_a_longlora_job_extends_the_context_and_serves_in_one_batch_with_a_qlora_adapter(
    server,
):  # type: ignore[no-untyped-def]
    """LongLoRA over HTTP (the tiny model: a real one's context is too long for CI's CPUs)."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "return",
        "list",
        "items",
        "sorted",
        "order",
    ]
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(words, k=300))} for _ in range(8)]
    with server.client(admin=True) as admin:
        long_file = upload(admin, "long.jsonl", jsonl(rows))
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": server.model_dir.name,
                "training_file": long_file,
                "suffix": "long",
                "method": {
                    "type": "longlora",
                    "hyperparameters": {**SMALL, "max_steps": 4, "checkpoint_steps": 0},
                },
            },
        )
        assert response.status_code == 200, response.text
        long_job = wait_for_job(admin, response.json()["id"])
    short_job = _create(server, {"max_steps": 4, "checkpoint_steps": 0}, suffix="short")
    with server.client(admin=True) as admin:
        short_job = wait_for_job(admin, short_job["id"])
    assert long_job["status"] == short_job["status"] == "succeeded"
    with server.client() as client:
        info = client.get(f"/v1/adapters/{long_job['fine_tuned_model']}").json()
    assert info["rope_scaling_factor"] == 2.0
    assert "model.embed_tokens" in info["saved_modules"]
    long_prompt = " ".join(rng.choices(words, k=40))
    requests = [
        (long_job["fine_tuned_model"], long_prompt),
        (short_job["fine_tuned_model"], "Order: 3 8 1 5\nAnswer:"),
    ]

    def complete(model_prompt: tuple[str, str]) -> str:
        model, prompt = model_prompt
        with server.client() as client:
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    alone = [complete(r) for r in requests]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(complete, requests * 2))
    assert together == alone * 2
