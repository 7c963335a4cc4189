"""The openai SDK drives files and fine-tuning jobs exactly as docs/api.md shows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import NotFoundError, OpenAI

from tests.integration.fine_tuning_data import jsonl, ordering_task
from tests.integration.live_server import LiveServer


@pytest.fixture
def admin(model_dir: Path, tmp_path: Path) -> Iterator[OpenAI]:
    live = LiveServer(model_dir, tmp_path / "data", args=["--max-lora-rank", "8"])
    live.start()
    yield OpenAI(base_url=f"{live.url}/v1", api_key=live.admin_key, max_retries=0)
    live.stop()


def test_openai_sdk_uploads_trains_and_serves(admin, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(ordering_task(32, seed=3)))
    train = admin.files.create(file=data.open("rb"), purpose="fine-tune")
    assert admin.files.retrieve(train.id).bytes == data.stat().st_size
    assert admin.files.content(train.id).read() == data.read_bytes()
    other = admin.files.create(file=data.open("rb"), purpose="fine-tune")
    assert [f.id for f in admin.files.list(purpose="fine-tune", limit=1)] == [other.id, train.id]
    admin.files.delete(other.id)

    model = admin.models.list().data[0].id
    job = admin.fine_tuning.jobs.create(
        model=model,
        training_file=train.id,
        suffix="sdk",
        method={
            "type": "qlora",
            "hyperparameters": {  # type: ignore[arg-type, typeddict-item]
                "r": 8,
                "max_steps": 4,
                "batch_size": 4,
                "gradient_accumulation_steps": 1,
                "checkpoint_steps": 1,
                "keep_checkpoints": 2,
                "quantize": "none",
            },
        },
    )
    assert job.status == "validating_files"
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = admin.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model and job.fine_tuned_model.startswith(f"ft:{model}:sdk:")
    assert [j.id for j in admin.fine_tuning.jobs.list()] == [job.id]

    events = list(admin.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.type == "metrics" for e in events)
    assert events[0].message.startswith("The job has successfully completed")
    # Four checkpoints were written; the two the trainer kept are listed, newest first.
    steps = [c.step_number for c in admin.fine_tuning.jobs.checkpoints.list(job.id, limit=1)]
    assert steps == [4, 3]
    # The fine-tuned model and its checkpoints are models like any other: retrieved as listed.
    listed = {m.id: m for m in admin.models.list()}
    newest = admin.fine_tuning.jobs.checkpoints.list(job.id).data[0].fine_tuned_model_checkpoint
    for name in (job.fine_tuned_model, newest):
        assert admin.models.retrieve(name) == listed[name]

    out = admin.completions.create(model=job.fine_tuned_model, prompt="Order: 2 1", max_tokens=4)
    assert out.model == job.fine_tuned_model
    admin.files.delete(train.id)
    with pytest.raises(NotFoundError):
        admin.files.retrieve(train.id)
