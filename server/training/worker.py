"""The job worker: a separate process that trains one job and reports through the database.

Serving keeps its own process (and GIL); the worker writes events and checkpoints as it goes
and records its outcome in the job's `result`, which the server's JobManager turns into the
job's final status. If the server dies, the worker stops at the next step without recording an
outcome, so the restarted server resumes the job from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from adapters.faults import DiskFullError
from server.training.data import DataError
from server.training.events import TrainingEvent
from server.training.hparams import hparams_for
from server.training.jobs import JobStore
from server.training.memory import cap_worker_memory

logger = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.5


def _event_message(ev: TrainingEvent) -> tuple[str, str, dict[str, Any] | None]:
    """(type, message, data) of a job event for a trainer event."""
    if ev.kind == "step":
        data = {
            "step": ev.step,
            "total_steps": ev.total_steps,
            "train_loss": ev.loss,
            "learning_rate": ev.learning_rate,
            "tokens_per_second": ev.tokens_per_second,
            "grad_norm": ev.grad_norm,
        }
        return "metrics", f"Step {ev.step}/{ev.total_steps}: training loss={ev.loss:.4f}", data
    if ev.kind in ("eval", "checkpoint"):
        data = {"step": ev.step, "train_loss": ev.train_loss, "valid_loss": ev.valid_loss}
        what = "Checkpoint saved" if ev.kind == "checkpoint" else "Evaluated"
        valid = f", validation loss={ev.valid_loss:.4f}" if ev.valid_loss is not None else ""
        return "metrics", f"{what} at step {ev.step}{valid}", data
    return "message", ev.message or "", None


def run_job(
    data_dir: str,
    job_id: str,
    model_dir: str,
    device: str,
    threads: int,
    memory_limit: int | None = None,
) -> None:
    """Process entry point: train `job_id` and record the outcome in its row; on CUDA the
    worker's allocator is capped at `memory_limit` bytes (server.training.memory)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(threads)
    cap_worker_memory(memory_limit)
    store = JobStore(data_dir)
    job = store.get_job(job_id)
    assert job is not None, f"job {job_id} vanished"
    parent = os.getppid()
    orphaned = False
    polled = {"at": 0.0, "stop": False}

    def should_stop() -> bool:
        nonlocal orphaned
        if os.getppid() != parent:
            orphaned = True  # the server died; its successor resumes this job
            return True
        now = time.monotonic()
        if now - polled["at"] >= CANCEL_POLL_SECONDS:
            polled["at"], polled["stop"] = now, store.cancel_requested(job_id)
        return polled["stop"]

    def on_event(ev: TrainingEvent) -> None:
        kind, message, data = _event_message(ev)
        store.add_event(job_id, message, type=kind, data=data)
        if ev.kind == "step" and ev.tokens:
            store.add_trained_tokens(job_id, ev.tokens)
        if ev.kind == "checkpoint" and ev.checkpoint_dir:
            store.add_checkpoint(job_id, ev.step, data or {}, ev.checkpoint_dir)
            store.prune_checkpoints(job_id)

    from server.training.trainer import Trainer

    try:
        overrides = dict(job.hyperparameters)
        if job.seed is not None:
            overrides["seed"] = job.seed
        trainer = Trainer(
            model_dir,
            store.job_dir(job_id),
            store.file_path(job.training_file),
            hparams_for(job.method, overrides),
            validation_data=store.file_path(job.validation_file) if job.validation_file else None,
            device=device,
            on_event=on_event,
            should_stop=should_stop,
            base_model_name=job.model,
        )
        result = trainer.train()
    except DataError as exc:
        if os.getppid() != parent:
            return  # an orphan's outcome is not the job's: the restarted server reruns it
        store.update_job(
            job_id,
            result={
                "status": "failed",
                "error": {
                    "code": "invalid_training_file",
                    "message": str(exc),
                    "param": "training_file",
                },
            },
        )
        return
    except DiskFullError as exc:
        logger.error("job %s failed: %s", job_id, exc)
        if os.getppid() != parent:
            return
        error = {"code": "disk_full", "message": str(exc), "param": None}
        store.update_job(job_id, result={"status": "failed", "error": error})
        return
    except torch.OutOfMemoryError as exc:
        logger.error("job %s ran out of device memory: %s", job_id, exc)
        if os.getppid() != parent:
            return
        budget = f" of {memory_limit / 2**20:.0f} MiB" if memory_limit is not None else ""
        message = (
            f"training ran out of its device memory budget{budget}; lower batch_size, "
            "max_seq_len or r"
        )
        error = {"code": "out_of_memory", "message": message, "param": None}
        store.update_job(job_id, result={"status": "failed", "error": error})
        return
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        if os.getppid() != parent:
            return
        store.update_job(
            job_id,
            result={
                "status": "failed",
                "error": {
                    "code": "training_failed",
                    "message": f"{type(exc).__name__}: {exc}",
                    "param": None,
                },
            },
        )
        return
    if orphaned:
        return
    store.update_job(
        job_id,
        result={
            "status": result.status,
            "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
            "initial_valid_loss": result.initial_valid_loss,
            "valid_loss": result.valid_loss,
            "train_loss": result.train_loss,
            "rope_scaling_factor": result.rope_scaling_factor,
            "tokens_per_second": result.tokens_per_second,
            "peak_memory_bytes": result.peak_memory_bytes,
            "steps": result.step,
        },
    )
