"""Fine-tuning numbers for /metrics: jobs by status, the queue, running jobs' latest metrics."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from server.training.jobs import Job, JobStore
from server.training.stats import training_stats


def _job(store: JobStore, job_id: str, status: str) -> None:
    store.add_job(Job(job_id, 0, "base", "qlora", {}, "file-x", None, None, None, status))


def _store(tmp_path) -> JobStore:  # type: ignore[no-untyped-def]
    store = JobStore(tmp_path)
    for job_id, status in [("a", "queued"), ("b", "validating_files"), ("c", "running")]:
        _job(store, job_id, status)
    _job(store, "d", "failed")
    step = {"step": 3, "total_steps": 9, "train_loss": 2.5, "tokens_per_second": 100.0}
    store.add_event("c", "eval", type="metrics", data={"step": 2, "valid_loss": 2.75})
    store.add_event("c", "step 3", type="metrics", data=step)
    store.add_event("c", "a message")
    return store


def test_stats_count_every_status_and_the_queue(tmp_path):
    stats = training_stats(_store(tmp_path))
    assert stats.jobs_by_status == {
        "validating_files": 1,
        "queued": 1,
        "running": 1,
        "succeeded": 0,
        "failed": 1,
        "cancelled": 0,
    }
    assert stats.queue_length == 2


def test_a_running_job_reports_its_latest_step_and_evaluation(tmp_path):
    (job,) = training_stats(_store(tmp_path)).running
    assert (job.job_id, job.step, job.total_steps) == ("c", 3, 9)
    assert (job.train_loss, job.valid_loss, job.tokens_per_second) == (2.5, 2.75, 100.0)


def test_metrics_export_the_stats_at_scrape_time(tmp_path):
    store = _store(tmp_path)
    metrics = Metrics("base")
    metrics.watch_training(lambda: training_stats(store))
    store.update_job("c", status="succeeded")  # after registration: read when scraped
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, s.labels.get("status"), s.labels.get("job_id")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("loraplex_fine_tuning_jobs", "succeeded", None)] == 1
    assert samples[("loraplex_fine_tuning_jobs", "running", None)] == 0
    assert samples[("loraplex_fine_tuning_queue_length", None, None)] == 2
    assert not any(job_id for (_, _, job_id) in samples)  # no job runs: no per-job series
