"""Faults in the write paths, in-process: a full disk while storing an adapter or writing a
checkpoint leaves nothing half-written; start-up recovery of the file and job store; the
fault hook itself; the bounded job queue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapters import AdapterStore, AdapterWeights, read_adapter_spec
from adapters.faults import DiskFullError, fault_point, set_fault_points
from server.training import checkpoint as ckpt
from server.training.jobs import Job, JobStore
from server.training.manager import JobManager, JobQueueFullError
from tests.unit.adapter_fixtures import MAX_RANK, tiny_base, tiny_files

ROW = json.dumps({"prompt": "a", "completion": "b"}).encode()


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    yield
    set_fault_points(None)


def test_fault_points_are_inert_unless_armed():
    fault_point("store.write")  # nothing armed: no effect
    set_fault_points("files.write=enospc")
    fault_point("store.write")
    with pytest.raises(OSError, match="No space left"):
        fault_point("files.write")


def test_an_unknown_fault_action_is_refused():
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        set_fault_points("store.write=explode")


def test_a_full_disk_while_storing_an_adapter_stores_nothing(tmp_path):
    store = AdapterStore(tmp_path)
    base = tiny_base()
    set_fault_points("store.write=enospc")
    with pytest.raises(DiskFullError, match="no space left on the server's disk") as info:
        store.add(
            "a", "upload", lambda p: read_adapter_spec(p, base, MAX_RANK), files=tiny_files(4)
        )
    assert str(tmp_path) not in str(info.value)
    assert store.list() == []
    assert list(store.blobs.iterdir()) == []


def _save(root: Path, step: int) -> ckpt.CheckpointInfo:
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}
    return ckpt.save_checkpoint(
        root,
        step,
        {"w": torch.zeros(2)},
        {"rng": ckpt.rng_state()},
        (config, AdapterWeights(lora={(0, "q_proj"): (torch.zeros(2, 4), torch.zeros(4, 2))})),
        {"train_loss": 1.0, "valid_loss": None},
        keep=3,
    )


def test_a_full_disk_while_checkpointing_leaves_no_partial_checkpoint(tmp_path):
    set_fault_points("checkpoint.write=enospc")
    with pytest.raises(DiskFullError, match="writing a training checkpoint"):
        _save(tmp_path / "checkpoints", 5)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_recovery_removes_leftovers_and_indexes_unrecorded_checkpoints(tmp_path):
    store = JobStore(tmp_path)
    kept = store.add_file("train.jsonl", "fine-tune", ROW, 1)
    (store.files_dir / ".tmp-upload").write_bytes(b"half")  # killed mid-write
    (store.files_dir / "file-orphan.jsonl").write_bytes(ROW)  # killed before its row
    job_dir = store.job_dir("ftjob-1")
    recorded = _save(job_dir / "checkpoints", 5)
    store.add_checkpoint("ftjob-1", 5, {"step": 5}, str(recorded.path))
    store.add_checkpoint("ftjob-1", 1, {"step": 1}, str(job_dir / "checkpoints" / "gone"))
    _save(job_dir / "checkpoints", 10)  # killed before its row
    (job_dir / "checkpoints" / ".tmp-step-000015-99").mkdir()  # killed mid-checkpoint

    removed = store.recover()

    assert sorted(p.name for p in removed) == [
        ".tmp-step-000015-99",
        ".tmp-upload",
        "file-orphan.jsonl",
    ]
    assert [p.name for p in store.files_dir.iterdir()] == [f"{kept.id}.jsonl"]
    checkpoints = store.checkpoints("ftjob-1")
    assert [c.step for c in checkpoints] == [10, 5]
    assert checkpoints[0].metrics == {"step": 10, "train_loss": 1.0, "valid_loss": None}


def test_past_max_queued_jobs_a_new_job_is_refused(tmp_path):
    store = JobStore(tmp_path)
    file_id = store.add_file("train.jsonl", "fine-tune", ROW, 1).id
    registry = SimpleNamespace(max_lora_rank=64, base=tiny_base())
    manager = JobManager(store, registry, "base", tmp_path, "cpu", 1, max_queued=2)  # type: ignore[arg-type]
    body = {"model": "base", "training_file": file_id}
    first = manager.create(body)
    manager.create(body)
    with pytest.raises(JobQueueFullError, match="2 fine-tuning jobs are already waiting"):
        manager.create(body)
    store.update_job(first.id, status="running")  # a job that starts frees its place
    assert isinstance(manager.create(body), Job)


def test_a_failed_jobs_error_and_event_name_no_server_path(tmp_path):
    store = JobStore(tmp_path)
    file_id = store.add_file("train.jsonl", "fine-tune", ROW, 1).id
    registry = SimpleNamespace(max_lora_rank=64, base=tiny_base())
    manager = JobManager(store, registry, "base", tmp_path, "cpu", 1)  # type: ignore[arg-type]
    job = manager.create({"model": "base", "training_file": file_id})
    where = tmp_path / "jobs" / job.id / "step-5" / "optimizer.pt"
    manager._finish(
        job, "failed", error={"code": "boom", "message": f"cannot read {where}", "param": None}
    )
    failed = manager.get(job.id)
    events, _ = store.events(job.id, limit=100)
    assert failed.error is not None
    assert failed.error["message"] == "cannot read optimizer.pt"
    assert all(str(tmp_path) not in e.message for e in events)
