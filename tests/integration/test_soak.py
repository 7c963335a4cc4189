"""Soak: 64 streaming clients over 32 adapters while adapters are uploaded, served and deleted
and a fine-tuning job trains, all on one server. Zero 5xx, and every response equals what that
request gives alone. Bounded: a fixed number of rounds and a deadline for the churn."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    ENGINE_FLAGS,
    LORA_CONFIGS,
    MODEL_NAME,
    NUM_ADAPTERS,
    Oracle,
    adapter_name,
    serve_flags,
)
from tests.integration.fine_tuning_data import jsonl, ordering_task, upload, wait_for_job
from tests.integration.live_server import LiveServer, wait_until
from tests.integration.streams import Job, Stream, stream_once

logger = logging.getLogger(__name__)

NUM_CLIENTS = 64
ROUNDS = 8  # streamed requests per client
LENGTHS = (8, 12, 16)
PROMPTS = ["The quick brown fox", "Return a new list containing"]
CHURN_PROMPT = "Errors should never pass"
JOB_STEPS = 60
MIN_CHURNS = 3  # adapters uploaded, served and deleted at least this often
DEADLINE_S = 240.0  # churn and the job stop being waited for after this


@dataclass
class Churn:
    """What the uploader saw: every status it got, and each churned adapter's text."""

    statuses: list[tuple[str, int]] = field(default_factory=list)
    texts: list[tuple[str, int, str]] = field(default_factory=list)  # name, spare index, text
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def soak_server(
    model_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    args = serve_flags(**ENGINE_FLAGS, served_model_name=MODEL_NAME)
    args += ["--preload-adapters", str(next(iter(adapter_dirs.values())).parent)]
    live = LiveServer(model_dir, tmp_path_factory.mktemp("soak") / "data", args).start()
    yield live
    live.stop()


def _adapter_files(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    names = ("adapter_config.json", "adapter_model.safetensors")
    return [("files", (n, (path / n).read_bytes())) for n in names]


def churn_adapters(server: LiveServer, spare: Path, stop: threading.Event, seen: Churn) -> None:
    """Upload a spare adapter under a new name, serve one greedy request on it, delete it;
    again until told to stop."""
    spares = sorted(p for p in spare.iterdir() if p.name.startswith("spare-"))
    with server.client(admin=True, timeout=120) as admin:
        k = 0
        while not stop.is_set() or len(seen.texts) < MIN_CHURNS:
            index = k % len(spares)
            name = f"churn-{k}"
            k += 1
            r = admin.post("/v1/adapters", data={"name": name}, files=_adapter_files(spares[index]))
            seen.statuses.append(("upload", r.status_code))
            if r.status_code != 201:
                seen.errors.append(f"upload {name}: {r.status_code} {r.text[:200]}")
                continue
            body = {"model": name, "prompt": CHURN_PROMPT, "max_tokens": 8, "temperature": 0}
            r = admin.post("/v1/completions", json={**body, "ignore_eos": True})
            seen.statuses.append(("complete", r.status_code))
            if r.status_code == 200:
                seen.texts.append((name, index, r.json()["choices"][0]["text"]))
            else:
                seen.errors.append(f"complete {name}: {r.status_code} {r.text[:200]}")
            r = admin.delete(f"/v1/adapters/{name}")
            seen.statuses.append(("delete", r.status_code))
            if r.status_code != 200:
                seen.errors.append(f"delete {name}: {r.status_code} {r.text[:200]}")


def start_job(server: LiveServer) -> str:
    with server.client(admin=True) as admin:
        file_id = upload(admin, "soak.jsonl", jsonl(ordering_task(64, seed=1)))
        hyper = {"r": 8, "batch_size": 2, "quantize": "none", "max_steps": JOB_STEPS}
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": server.model_dir.name,
                "training_file": file_id,
                "method": {"type": "qlora", "hyperparameters": hyper},
            },
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]


def steps_logged(admin: httpx.Client, job_id: str) -> int:
    """How many training steps the job has logged so far."""
    page = admin.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return sum(1 for e in page["data"] if (e["data"] or {}).get("learning_rate"))


def stream_all(server: LiveServer, jobs: list[Job]) -> list[list[Stream]]:
    async def client(job: Job) -> list[Stream]:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers(), timeout=180
        ) as http:
            return [await stream_once(http, job) for _ in range(ROUNDS)]

    async def run() -> list[list[Stream]]:
        return await asyncio.gather(*(client(job) for job in jobs))

    return asyncio.run(run())


@pytest.mark.slow
def test_streams_stay_exact_while_adapters_churn_and_a_job_trains(
    soak_server: LiveServer, oracle: Oracle, spare_adapters: Path
) -> None:
    jobs: list[Job] = [
        (
            adapter_name(i % NUM_ADAPTERS),
            PROMPTS[i * len(PROMPTS) // NUM_CLIENTS],
            LENGTHS[i % len(LENGTHS)],
        )
        for i in range(NUM_CLIENTS)
    ]
    expected = {job: oracle.complete(*job[:2], max_tokens=job[2], ignore_eos=True) for job in jobs}
    for i in range(len(LORA_CONFIGS)):
        oracle.register(f"spare-{i}", spare_adapters / f"spare-{i}")
    churn_expected = {
        i: oracle.complete(f"spare-{i}", CHURN_PROMPT, max_tokens=8, ignore_eos=True)
        for i in range(len(LORA_CONFIGS))
    }

    job_id = start_job(soak_server)
    with soak_server.client(admin=True) as admin:
        # The clients start once the job trains, so the two overlap.
        assert wait_until(lambda: steps_logged(admin, job_id) > 0, timeout=DEADLINE_S)
        steps_at_start = steps_logged(admin, job_id)
    stop = threading.Event()
    churned = Churn()
    churner = threading.Thread(
        target=churn_adapters, args=(soak_server, spare_adapters, stop, churned), daemon=True
    )
    start = time.perf_counter()
    churner.start()
    try:
        results = stream_all(soak_server, jobs)
    finally:
        stop.set()
        churner.join(timeout=DEADLINE_S)
    wall = time.perf_counter() - start
    with soak_server.client(admin=True) as admin:
        status_after_streams = admin.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
        steps_at_end = steps_logged(admin, job_id)
        final = wait_for_job(admin, job_id, timeout=DEADLINE_S)
        served = admin.post(
            "/v1/completions",
            json={"model": final["fine_tuned_model"], "prompt": "Order: 3 1 2 0\nAnswer:"},
        )
        listed = {a["id"] for a in admin.get("/v1/adapters").json()["data"]}

    streams = [s for per_client in results for s in per_client]
    logger.info(
        "soak: %d streams, %d adapter churns in %.1f s; job %s when they ended, then %s",
        len(streams),
        len(churned.texts),
        wall,
        status_after_streams,
        final["status"],
    )
    assert not churner.is_alive()
    failed = [(s.status, s.errors) for s in streams if s.status != 200 or s.errors or not s.done]
    assert not failed, failed[:5]
    assert not churned.errors, churned.errors[:5]
    assert all(status < 500 for _, status in churned.statuses)
    assert len(churned.texts) >= MIN_CHURNS
    for name, index, text in churned.texts:
        assert text == churn_expected[index], name
    for job, per_client in zip(jobs, results, strict=True):
        for s in per_client:
            assert s.models == {job[0]} and s.finish_reason == "length"
            assert s.text == expected[job], job
    assert steps_at_end > steps_at_start, "the job should train while the clients stream"
    assert final["status"] == "succeeded", final
    assert served.status_code == 200, served.text
    assert not any(name.startswith("churn-") for name in listed)
