"""What monitoring needs of fine-tuning, read from the job store at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from server.training.jobs import ACTIVE, FINAL, JobStore

STATUSES = (*ACTIVE, *FINAL)
WAITING = ("validating_files", "queued")


@dataclass(frozen=True)
class JobProgress:
    """A running job's latest numbers (None until its first step or evaluation)."""

    job_id: str
    step: int | None
    total_steps: int | None
    train_loss: float | None  # the latest step's mean loss per trained token
    valid_loss: float | None  # the latest evaluation's
    tokens_per_second: float | None  # the latest step's


@dataclass(frozen=True)
class TrainingStats:
    jobs_by_status: dict[str, int]  # every status, 0 included
    queue_length: int  # jobs waiting to train (validating_files or queued)
    running: list[JobProgress]


def training_stats(store: JobStore) -> TrainingStats:
    counts = store.count_by_status()
    running = []
    for job in store.jobs_with_status("running"):
        m = store.latest_metrics(job.id)
        running.append(
            JobProgress(
                job.id,
                m.get("step"),
                m.get("total_steps"),
                m.get("train_loss"),
                m.get("valid_loss"),
                m.get("tokens_per_second"),
            )
        )
    return TrainingStats(
        {s: counts.get(s, 0) for s in STATUSES},
        sum(counts.get(s, 0) for s in WAITING),
        running,
    )
