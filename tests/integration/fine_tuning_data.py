"""Training data for the fine-tuning tests, and helpers to run a job over HTTP."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")
# Hyperparameters that train on the tiny test model in seconds.
SMALL = {"r": 8, "batch_size": 2, "gradient_accumulation_steps": 1, "quantize": "none"}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def ordering_task(n: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion pairs: put a few small numbers in order (learnable in seconds)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums = rng.sample(range(10), 4)
        prompt = "Order: " + " ".join(map(str, nums)) + "\nAnswer:"
        rows.append({"prompt": prompt, "completion": " " + " ".join(map(str, sorted(nums)))})
    return rows


def upload(client: httpx.Client, name: str, data: bytes, purpose: str = "fine-tune") -> str:
    response = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 600.0) -> dict:
    """Poll until the job reaches a final status; the job object."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in FINAL:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, oldest first (following the pagination)."""
    events: list[dict] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after"] = after
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return list(reversed(events))
        after = page["data"][-1]["id"]


def job_files(data_dir: Path, job: dict) -> tuple[Path, Path, Path | None]:
    """(output dir, training file, validation file) of a job on the server's disk."""
    files = data_dir / "files"
    valid = job.get("validation_file")
    return (
        data_dir / "jobs" / job["id"],
        files / f"{job['training_file']}.jsonl",
        files / f"{valid}.jsonl" if valid else None,
    )
