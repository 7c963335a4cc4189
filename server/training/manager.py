"""JobManager: moves fine-tuning jobs through their states in the server process.

validating_files -> queued -> running -> succeeded | failed | cancelled. Jobs run one at a time
by default, each in a worker process (server.training.worker); a finished job's adapter is
registered under its `fine_tuned_model` name at once, so the next request can use it. On start
the manager requeues jobs a previous server left running; their workers resume from the last
checkpoint. At most `max_queued` jobs wait (validating_files or queued); past that a new job
is refused with JobQueueFullError. A queued job starts only when its estimated device memory
is free beside serving (server.training.memory); while it runs, its kept checkpoints are
published as adapters (server.training.publish).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import re
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from adapters.faults import DiskFullError
from server.model.config import ModelConfig
from server.redact import without_paths
from server.training.data import DataError, count_examples
from server.training.hparams import HParams, HParamsError, canonical_overrides, hparams_for
from server.training.jobs import Job, JobStore, new_id
from server.training.lora import adapter_spec
from server.training.memory import (
    MemoryBudget,
    MemoryBudgetError,
    MemoryEstimate,
    cuda_memory,
    estimate,
    no_device_memory,
)
from server.training.publish import (
    CheckpointPublisher,
    RemoveAdapter,
    ServedAdapters,
    fine_tuned_name,
)
from server.training.worker import run_job

logger = logging.getLogger(__name__)

METHODS = ("qlora", "longlora")
SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,40}$")


class JobRequestError(ValueError):
    """A fine-tuning request that cannot run; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class JobNotFoundError(KeyError):
    """No job with that id."""


class JobQueueFullError(Exception):
    """As many jobs wait as --max-queued-jobs allows; retry when one has started."""


def _hyperparameters(method: dict[str, Any], legacy: dict[str, Any] | None) -> dict[str, Any]:
    """Overrides from `method.hyperparameters`, OpenAI's `method.<type>.hyperparameters`, or
    the legacy top-level `hyperparameters`, under our names (hparams.ALIASES)."""
    kind = method.get("type")
    raw = dict(legacy or {})
    raw.update(method.get("hyperparameters") or {})
    nested = method.get(kind) if isinstance(method.get(kind), dict) else {}
    raw.update(nested.get("hyperparameters") or {})
    return canonical_overrides(str(kind), raw)


class JobManager:
    def __init__(
        self,
        store: JobStore,
        adapters: ServedAdapters,
        model_name: str,
        model_dir: str | Path,
        device: str,
        threads: int,
        max_concurrent: int = 1,
        max_queued: int = 64,
        remove_adapter: RemoveAdapter | None = None,
        memory_limit_mb: int | None = None,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.model_name = model_name
        self.model_dir = str(model_dir)
        self.device = device
        self.threads = threads
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.publisher = CheckpointPublisher(store, adapters, remove_adapter)
        device_memory = cuda_memory() if device == "cuda" else no_device_memory
        limit = memory_limit_mb * 2**20 if memory_limit_mb is not None else None
        self.memory = memory or MemoryBudget.at_start(limit, device_memory)
        self._waiting_for_memory: set[str] = set()  # jobs told so, once each
        self._grants: dict[str, int] = {}  # device bytes granted to running workers
        self._model_config: ModelConfig | None = None
        self._workers: dict[str, BaseProcess] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._watchers: set[asyncio.Task] = set()
        self._stopping = False

    async def start(self) -> None:
        await asyncio.to_thread(self.store.recover)  # before any upload or worker writes
        for job in self.store.jobs_with_status("running"):
            self.store.update_job(job.id, status="queued", result=None)
            self.store.add_event(job.id, "Server restarted; resuming from the last checkpoint")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop workers; their jobs stay `running` and resume when a server starts again."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        for proc in self._workers.values():
            proc.terminate()
        for proc in list(self._workers.values()):
            await asyncio.to_thread(proc.join, 10)
        for task in self._watchers:
            task.cancel()

    # ---- requests -----------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> Job:
        """Check a job request and record it as validating_files."""
        if body.get("model") != self.model_name:
            raise JobRequestError(
                f"fine-tuning is available for the served base model {self.model_name!r}, "
                f"not {body.get('model')!r}",
                "model",
            )
        method = body.get("method") or {"type": "qlora"}
        kind = method.get("type")
        if kind not in METHODS:
            raise JobRequestError(
                f"method.type must be one of {', '.join(METHODS)}; got {kind!r}", "method.type"
            )
        try:
            overrides = _hyperparameters(method, body.get("hyperparameters"))
            hp = hparams_for(kind, overrides)
        except (HParamsError, TypeError, ValueError) as exc:
            raise JobRequestError(str(exc), "method.hyperparameters") from exc
        if hp.r > self.adapters.max_lora_rank:
            raise JobRequestError(
                f"rank {hp.r} exceeds the server's --max-lora-rank "
                f"{self.adapters.max_lora_rank}; the adapter could not be served",
                "method.hyperparameters.r",
            )
        try:
            adapter_spec(hp, self.adapters.base)  # target_modules must match the served model
            if self.memory.limit_bytes is not None or self.memory.capacity_bytes is not None:
                self.memory.check_fits(self.estimate(hp))
        except (HParamsError, MemoryBudgetError) as exc:
            raise JobRequestError(str(exc), "method.hyperparameters") from exc
        for param in ("training_file", "validation_file"):
            file_id = body.get(param)
            if file_id is None and param == "validation_file":
                continue
            if not isinstance(file_id, str) or self.store.get_file(file_id) is None:
                raise JobRequestError(f"{param} {file_id!r} does not exist", param)
        suffix = body.get("suffix")
        if suffix is not None and not SUFFIX.match(str(suffix)):
            raise JobRequestError(
                "suffix must be 1-40 characters of letters, digits, '.', '_' or '-'", "suffix"
            )
        seed = body.get("seed")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**31):
            raise JobRequestError("seed must be an integer in [0, 2**31)", "seed")
        waiting = len(self.store.jobs_with_status("validating_files", "queued"))
        if waiting >= self.max_queued:
            raise JobQueueFullError(
                f"{waiting} fine-tuning jobs are already waiting (--max-queued-jobs "
                f"{self.max_queued}); retry when one has started"
            )
        job = Job(
            id=new_id("ftjob"),
            created_at=int(time.time()),
            model=self.model_name,
            method=kind,
            hyperparameters=overrides,
            training_file=body["training_file"],
            validation_file=body.get("validation_file"),
            suffix=suffix,
            seed=seed,
            status="validating_files",
        )
        self.store.add_job(job)
        self.store.add_event(job.id, f"Created fine-tuning job: {job.id}")
        self.store.add_event(job.id, f"Validating training file: {job.training_file}")
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in ("validating_files", "queued"):
            self._finish(job, "cancelled")
        elif job.status == "running":
            self.store.request_cancel(job_id)
            self.store.add_event(job_id, "Cancellation requested; stopping after this step")
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobNotFoundError(job_id)
        return job

    # ---- the loop -----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:
                logger.exception("fine-tuning job loop failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()

    async def _tick(self) -> None:
        for job in self.store.jobs_with_status("validating_files"):
            await asyncio.to_thread(self._validate, job)
        for job in self.store.jobs_with_status("queued"):
            if len(self._workers) >= self.max_concurrent:
                break
            try:
                grant, wait = self._memory_grant(job)
            except MemoryBudgetError as exc:  # the cap was lowered since the job was created
                error = {"code": "insufficient_memory", "message": str(exc), "param": None}
                self._finish(job, "failed", error=error)
                continue
            if wait is not None:
                if job.id not in self._waiting_for_memory:
                    self._waiting_for_memory.add(job.id)
                    self.store.add_event(job.id, wait)
                    logger.info("job %s is %s", job.id, wait)
                break  # first come, first served: no later job starts past it
            self._waiting_for_memory.discard(job.id)
            self._launch(job, grant)
        for job_id in list(self._workers):
            try:
                await self.publisher.sync(self.get(job_id))
            except Exception:  # one job's publishing must not stop the others' scheduling
                logger.exception("publishing the checkpoints of %s failed", job_id)

    def _validate(self, job: Job) -> None:
        try:
            for file_id in (job.training_file, job.validation_file):
                if file_id is not None:
                    count_examples(self.store.file_path(file_id))  # streamed, none kept
        except (DataError, OSError) as exc:
            self._finish(
                job,
                "failed",
                error={
                    "code": "invalid_training_file",
                    "message": str(exc),
                    "param": "training_file",
                },
            )
            return
        self.store.update_job(job.id, status="queued")
        self.store.add_event(job.id, "Files validated; job queued")

    def estimate(self, hp: HParams) -> MemoryEstimate:
        """The device memory a job with these hyperparameters needs on the served base."""
        if self._model_config is None:
            self._model_config = ModelConfig.from_dir(self.model_dir)
        cfg = self._model_config
        max_seq_len = hp.max_seq_len or hp.target_context(cfg.max_position_embeddings)
        spec = adapter_spec(hp, self.adapters.base)
        return estimate(cfg, hp, spec, max_seq_len, cuda=self.device == "cuda")

    def _memory_grant(self, job: Job) -> tuple[int | None, str | None]:
        """(bytes the worker may use, None), or (None, why the job waits)."""
        if self.memory.limit_bytes is None and self.memory.device_memory() is None:
            return None, None  # nothing to bound: CPU without --training-memory-mb
        hp = hparams_for(job.method, job.hyperparameters)
        return self.memory.grant(self.estimate(hp), sum(self._grants.values()))

    def _launch(self, job: Job, memory_limit: int | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(
            target=run_job,
            args=(
                str(self.store.data_dir),
                job.id,
                self.model_dir,
                self.device,
                self.threads,
                memory_limit,
            ),
            name=f"loraplex-job-{job.id}",
            daemon=True,
        )
        proc.start()
        self._workers[job.id] = proc
        if memory_limit is not None:
            self._grants[job.id] = memory_limit
        self.store.update_job(job.id, status="running", result=None)
        self.store.add_event(job.id, f"Fine-tuning job started ({job.method}, pid {proc.pid})")
        task = asyncio.create_task(self._watch(job.id, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, job_id: str, proc: BaseProcess) -> None:
        await asyncio.to_thread(proc.join)
        self._workers.pop(job_id, None)
        self._grants.pop(job_id, None)
        if self._stopping:
            return
        try:
            await self.publisher.sync(self.get(job_id))  # checkpoints written since the last tick
        except Exception:
            logger.exception("publishing the checkpoints of %s failed", job_id)
        await asyncio.to_thread(self._complete, job_id, proc.exitcode)
        self._wake.set()

    def _complete(self, job_id: str, exitcode: int | None) -> None:
        job = self.get(job_id)
        result = job.result
        if result is None:
            message = f"the training worker exited with code {exitcode} without a result"
            self._finish(
                job, "failed", error={"code": "worker_died", "message": message, "param": None}
            )
        elif result["status"] == "succeeded":
            self._publish(job, result)
        elif result["status"] == "cancelled":
            self._finish(job, "cancelled")
        else:
            self._finish(job, "failed", error=result.get("error"))

    def _publish(self, job: Job, result: dict[str, Any]) -> None:
        """Register the adapter under its fine_tuned_model name; then the job succeeded."""
        from adapters import AdapterError, AdapterExistsError

        name = fine_tuned_name(job)
        try:
            self.adapters.register_dir(name, Path(result["adapter_dir"]), source="training")
        except AdapterExistsError:
            logger.info("adapter %s was registered before a restart", name)
        except AdapterError as exc:
            self._finish(
                job, "failed", error={"code": "invalid_adapter", "message": str(exc), "param": None}
            )
            return
        except DiskFullError as exc:
            self._finish(
                job, "failed", error={"code": "disk_full", "message": str(exc), "param": None}
            )
            return
        valid = result.get("valid_loss")
        start = result.get("initial_valid_loss")
        summary = {
            k: result.get(k)
            for k in (
                "initial_valid_loss",
                "valid_loss",
                "train_loss",
                "tokens_per_second",
                "peak_memory_bytes",
                "steps",
            )
        }
        self.store.add_event(
            job.id, f"Validation loss {start} -> {valid}", type="metrics", data=summary
        )
        self._finish(job, "succeeded", fine_tuned_model=name)

    def _finish(self, job: Job, status: str, **fields: Any) -> None:
        error = fields.get("error")
        if error and error.get("message"):  # job errors are client-facing: no server paths
            fields["error"] = {**error, "message": without_paths(str(error["message"]))}
        self.store.update_job(job.id, status=status, finished_at=int(time.time()), **fields)
        if status == "succeeded":
            message = f"The job has successfully completed: {fields['fine_tuned_model']}"
            self.store.add_event(job.id, message)
        elif status == "cancelled":
            self.store.add_event(job.id, "The job was cancelled")
        else:
            error = fields.get("error") or {}
            self.store.add_event(job.id, f"The job failed: {error.get('message')}", level="error")
