"""Crashes and full disks against real servers: a server killed (SIGKILL) at named points of
its write paths (LORAPLEX_FAULT_POINTS) restarts with no half-written adapter, file or
checkpoint, listings that agree with the disk, and its interrupted job finished; a full disk
is a clear 507 (or a failed job), nothing half-written, and the server keeps serving. Also the
upload limits: --max-file-mb, --data-quota-mb, bounded memory, and --max-queued-jobs."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from adapters.faults import FAULT_POINTS_ENV
from server.training.jobs import JobStore
from tests.integration.fine_tuning_data import (
    SMALL,
    all_events,
    jsonl,
    ordering_task,
    upload,
    wait_for_job,
)
from tests.integration.live_server import LiveServer, wait_until

TRAIN_ROWS = jsonl(ordering_task(32, seed=0))


@pytest.fixture
def live(model_dir: Path, tmp_path: Path) -> Iterator[LiveServer]:
    """A server that tests start (with fault points in `env`), kill and restart."""
    server = LiveServer(model_dir, tmp_path / "data", args=["--max-lora-rank", "8"])
    yield server
    server.stop()


def _start_with_faults(live: LiveServer, points: str) -> LiveServer:
    live.env = {FAULT_POINTS_ENV: points} if points else {}
    return live.start()


def _restart_after_kill(live: LiveServer, points: str = "") -> None:
    """Wait for the fault point's SIGKILL, then start again with `points` armed."""
    assert live.wait_killed() == -signal.SIGKILL
    _start_with_faults(live, points)


def _adapter_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (name, (adapter_dir / name).read_bytes()))
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]


def _create_job(live: LiveServer, file_id: str, **hyperparameters: int) -> str:
    with live.client(admin=True) as admin:
        response = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": live.model_dir.name,
                "training_file": file_id,
                "method": {"type": "qlora", "hyperparameters": {**SMALL, **hyperparameters}},
            },
        )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def assert_listings_match_disk(live: LiveServer) -> None:
    """Files, adapters and checkpoints listed are exactly those on disk; no temporaries."""
    data = live.data_dir
    leftovers = list(data.rglob(".tmp-*"))
    assert not leftovers, leftovers
    with live.client(admin=True) as client:
        files = {f["id"] for f in client.get("/v1/files").json()["data"]}
        adapters = {a["id"] for a in client.get("/v1/adapters").json()["data"]}
        jobs = client.get("/v1/fine_tuning/jobs").json()["data"]
        listed_steps = {
            job["id"]: {
                c["step_number"]
                for c in client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
            }
            for job in jobs
        }
    assert files == {p.stem for p in (data / "files").iterdir()}
    assert adapters == {unquote(p.name) for p in (data / "adapters").iterdir()}
    for job_id, steps in listed_steps.items():
        on_disk = {int(p.name.split("-")[1]) for p in (data / "jobs" / job_id).glob("*/step-*")}
        assert steps == on_disk, job_id


def _upload_file(live: LiveServer) -> None:
    with live.client(admin=True) as admin:
        upload(admin, "train.jsonl", TRAIN_ROWS)


def _delete_file(live: LiveServer) -> None:
    with live.client(admin=True) as admin:
        file_id = upload(admin, "train.jsonl", TRAIN_ROWS)
        admin.delete(f"/v1/files/{file_id}")


def _upload_adapter(live: LiveServer, files: list, name: str = "half") -> None:
    with live.client(admin=True) as admin:
        response = admin.post("/v1/adapters", data={"name": name}, files=files)
    assert response.status_code == 201, response.text


def _delete_adapter(live: LiveServer, files: list) -> None:
    _upload_adapter(live, files, "kept")
    with live.client(admin=True) as admin:
        admin.delete("/v1/adapters/kept")


def test_a_server_killed_at_any_write_point_restarts_with_nothing_half_written(
    live, spare_adapters
):
    files = _adapter_files(spare_adapters / "spare-0")
    # Each step arms one point, does what reaches it, and checks the restarted server.
    steps = [
        ("files.write", _upload_file),  # part of the blob written, under its temp name
        ("files.before_index", _upload_file),  # renamed into place, no row yet
        ("files.delete", _delete_file),  # row deleted, blob not yet
        ("store.before_index", lambda live: _upload_adapter(live, files)),  # renamed, no row
        ("store.delete", lambda live: _delete_adapter(live, files)),  # row deleted, dir not
    ]
    _start_with_faults(live, steps[0][0])
    for i, (point, reach) in enumerate(steps):
        with pytest.raises(httpx.TransportError):
            reach(live)
        _restart_after_kill(live, steps[i + 1][0] if i + 1 < len(steps) else "")
        with live.client(admin=True) as client:
            assert client.get("/v1/files").json()["data"] == [], point
            assert client.get("/v1/adapters").json()["data"] == [], point
        assert_listings_match_disk(live)
    _upload_adapter(live, files)
    with live.client(admin=True) as admin, live.client(admin=True) as client:
        file_id = upload(admin, "train.jsonl", TRAIN_ROWS)
        content = client.get(f"/v1/files/{file_id}/content").content
        completion = client.post(
            "/v1/completions", json={"model": "half", "prompt": "Order: 2 1", "max_tokens": 2}
        )
    assert content == TRAIN_ROWS
    assert completion.status_code == 200, completion.text


def test_crashes_mid_checkpoint_resume_the_job_to_success(live):
    # `crash`: the worker kills the server, then itself, as a power loss would. First just
    # after the step-5 checkpoint is renamed into place (before it is recorded), then while
    # the step-10 one is half written.
    _start_with_faults(live, "checkpoint.renamed=crash")
    with live.client(admin=True) as admin:
        file_id = upload(admin, "train.jsonl", TRAIN_ROWS)
    job_id = _create_job(live, file_id, max_steps=12, checkpoint_steps=5)
    # Listings are checked once the job is done, not between restarts: a resumed job may be
    # writing a checkpoint (half-written on purpose before the second crash) at any moment.
    # A crash's leftover temporary has its own name and would still be there at the end had
    # start-up not removed it; the step-5 checkpoint being indexed after the first crash shows
    # in the "resumed ... at step 5" events.
    _restart_after_kill(live, "checkpoint.write=crash")
    _restart_after_kill(live)
    with live.client(admin=True) as client:
        final = wait_for_job(client, job_id, timeout=240)
        events = [e["message"] for e in all_events(client, job_id)]
        completion = client.post(
            "/v1/completions",
            json={"model": final["fine_tuned_model"], "prompt": "Order: 2 1", "max_tokens": 2},
        )
    assert final["status"] == "succeeded", final["error"]
    assert events.count("Server restarted; resuming from the last checkpoint") == 2
    assert events.count("resumed from the checkpoint at step 5") == 2
    assert completion.status_code == 200, completion.text
    assert_listings_match_disk(live)


def test_a_full_disk_is_a_clear_error_and_the_server_keeps_serving(live, spare_adapters):
    # The training file is put in the store directly: every upload meets the full disk.
    file_id = JobStore(live.data_dir).add_file("train.jsonl", "fine-tune", TRAIN_ROWS, 32).id
    _start_with_faults(live, "files.write=enospc,store.write=enospc,checkpoint.write=enospc")
    data = str(live.data_dir)
    with live.client(admin=True) as admin:
        file_upload = admin.post(
            "/v1/files", files={"file": ("train.jsonl", TRAIN_ROWS)}, data={"purpose": "fine-tune"}
        )
        adapter_upload = admin.post(
            "/v1/adapters",
            data={"name": "full"},
            files=_adapter_files(spare_adapters / "spare-0"),
        )
    job_id = _create_job(live, file_id, max_steps=10, checkpoint_steps=5)
    with live.client(admin=True) as client:
        final = wait_for_job(client, job_id, timeout=240)
        completion = client.post(
            "/v1/completions",
            json={"model": live.model_dir.name, "prompt": "Order: 2 1", "max_tokens": 2},
        )
        health = client.get("/health")
    for response in (file_upload, adapter_upload):
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert "no space left" in error["message"]
        assert data not in error["message"]
    assert final["status"] == "failed"
    assert final["error"]["code"] == "disk_full"
    assert "no space left" in final["error"]["message"]
    assert data not in final["error"]["message"]
    assert not list((live.data_dir / "jobs").rglob("step-*"))
    assert [p.stem for p in (live.data_dir / "files").iterdir()] == [file_id]
    assert_listings_match_disk(live)
    assert completion.status_code == 200 and health.status_code == 200


# ---- limits ------------------------------------------------------------------------------

QUOTA_MB = 48


@pytest.fixture(scope="module")
def limited(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Room for 48 MB of data, 32 MB per file, 40 MB per request, one job waiting at most."""
    args = ["--max-lora-rank", "8", "--max-upload-mb", "40", "--max-file-mb", "32"]
    args += ["--data-quota-mb", str(QUOTA_MB), "--max-queued-jobs", "1"]
    server = LiveServer(model_dir, tmp_path_factory.mktemp("limited") / "data", args).start()
    yield server
    server.stop()


def _big_jsonl(num_bytes: int) -> bytes:
    row = json.dumps({"prompt": "Order: 3 1 2\nAnswer:", "completion": " 1 2 3" + " " * 200})
    line = (row + "\n").encode()
    return line * (num_bytes // len(line))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _delete_all_files(server: LiveServer) -> None:
    with server.client(admin=True) as admin, server.client(admin=True) as client:
        for f in client.get("/v1/files").json()["data"]:
            admin.delete(f"/v1/files/{f['id']}")


def test_a_large_upload_streams_in_bounded_memory(limited):
    data = _big_jsonl(30 * 2**20)
    assert limited.proc is not None
    pid = limited.proc.pid
    before = _rss_bytes(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with limited.client(admin=True, timeout=120) as admin:
            response = admin.post(
                "/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "fine-tune"}
            )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(data)
    # Read whole, as before, the server grew by about 160 MB here; streamed, by about 2 MB.
    assert peak - before < 32 * 2**20, (before, peak)
    _delete_all_files(limited)


def test_a_file_over_max_file_mb_is_a_413_and_leaves_nothing(limited):
    with limited.client(admin=True, timeout=120) as admin:
        response = admin.post(
            "/v1/files",
            files={"file": ("big.jsonl", _big_jsonl(33 * 2**20))},
            data={"purpose": "fine-tune"},
        )
    assert response.status_code == 413, response.text
    assert "--max-file-mb" in response.json()["error"]["message"]
    assert not any((limited.data_dir / "files").iterdir())


def test_a_body_over_max_upload_mb_is_a_413_and_leaves_nothing(limited):
    # Sent without a Content-Length, so the limit is met while the file streams to disk.
    data = _big_jsonl(41 * 2**20)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with limited.client(admin=True, timeout=120) as admin:
        response = admin.post("/v1/files", content=body(), headers=headers)
    assert response.status_code == 413, response.text
    assert "--max-upload-mb" in response.json()["error"]["message"]
    assert not any((limited.data_dir / "files").iterdir())


def test_an_upload_past_the_data_quota_is_a_507_naming_it(limited):
    with limited.client(admin=True, timeout=120) as admin:
        first = admin.post(
            "/v1/files",
            files={"file": ("a.jsonl", _big_jsonl(30 * 2**20))},
            data={"purpose": "user_data"},
        )
        second = admin.post(
            "/v1/files",
            files={"file": ("b.jsonl", _big_jsonl(30 * 2**20))},
            data={"purpose": "user_data"},
        )
    with limited.client(admin=True) as client:
        listed = client.get("/v1/files").json()["data"]
    assert first.status_code == 200, first.text
    assert second.status_code == 507, second.text
    message = second.json()["error"]["message"]
    assert "--data-quota-mb" in message and f"{QUOTA_MB:.1f} MB" in message
    assert [f["id"] for f in listed] == [first.json()["id"]]
    assert [p.stem for p in (limited.data_dir / "files").iterdir()] == [first.json()["id"]]
    _delete_all_files(limited)


def test_a_bad_line_deep_in_a_streamed_file_is_named(limited):
    data = _big_jsonl(8 * 2**20)
    lines = data.count(b"\n")
    data += b'{"prompt": "a"}\n'
    with limited.client(admin=True, timeout=120) as admin:
        response = admin.post(
            "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
        )
    assert response.status_code == 400, response.text
    assert f"line {lines + 1}: missing key 'completion'" in response.json()["error"]["message"]
    assert not any((limited.data_dir / "files").iterdir())


def test_past_max_queued_jobs_a_new_job_is_a_429(limited):
    with limited.client(admin=True) as admin:
        file_id = upload(admin, "train.jsonl", TRAIN_ROWS)
    running = _create_job(limited, file_id, max_steps=5000, checkpoint_steps=0)
    with limited.client(admin=True) as admin, limited.client(admin=True) as client:

        def started() -> bool:
            return client.get(f"/v1/fine_tuning/jobs/{running}").json()["status"] == "running"

        assert wait_until(started, timeout=60)
        waiting = _create_job(limited, file_id, max_steps=5)
        refused = admin.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": limited.model_dir.name,
                "training_file": file_id,
                "method": {"type": "qlora", "hyperparameters": SMALL},
            },
        )
        for job_id in (waiting, running):
            admin.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"].isdigit()
    assert "--max-queued-jobs" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content", "status"), [(TRAIN_ROWS, 200), (b'{"prompt": "a"}\n', 400)], ids=["good", "bad"]
)
def test_a_purpose_sent_after_the_file_still_gets_the_file_checked(limited, content, status):
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n'
        f"Content-Type: application/jsonl\r\n\r\n".encode()
        + content
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        f"fine-tune\r\n--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    with limited.client(admin=True) as admin:
        response = admin.post("/v1/files", content=body, headers=headers)
    assert response.status_code == status, response.text
    if status == 400:
        assert "line 1: missing key 'completion'" in response.json()["error"]["message"]
    _delete_all_files(limited)
