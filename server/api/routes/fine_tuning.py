"""OpenAI-shaped fine-tuning jobs: create, list, get, events, checkpoints, cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from server.api.auth import require_admin_key
from server.api.errors import BadRequest, NotFound, Overloaded
from server.api.schemas.fine_tuning import (
    FineTuningCheckpoint,
    FineTuningCheckpointList,
    FineTuningEvent,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    FineTuningJobRequest,
    JobError,
)
from server.training.hparams import hparams_for
from server.training.jobs import Job
from server.training.manager import (
    JobManager,
    JobNotFoundError,
    JobQueueFullError,
    JobRequestError,
)

router = APIRouter(tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]
QUEUE_RETRY_AFTER_S = 30  # a queued job waits for a whole training run to end


def _manager(request: Request) -> JobManager:
    return request.app.state.server.job_manager


def job_object(job: Job) -> FineTuningJob:
    hp = hparams_for(job.method, job.hyperparameters).to_dict()
    return FineTuningJob(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        status=job.status,
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=hp,
        method={"type": job.method, job.method: {"hyperparameters": hp}},
        trained_tokens=job.trained_tokens,
        error=JobError(**job.error) if job.error else None,
        seed=job.seed,
        suffix=job.suffix,
    )


def _job(manager: JobManager, job_id: str) -> Job:
    try:
        return manager.get(job_id)
    except JobNotFoundError:
        raise NotFound(f"fine-tuning job {job_id!r} does not exist", "fine_tuning_job_id") from None


@router.post(
    "/v1/fine_tuning/jobs", response_model=FineTuningJob, dependencies=[Depends(require_admin_key)]
)
async def create_job(body: FineTuningJobRequest, request: Request) -> FineTuningJob:
    try:
        job = _manager(request).create(body.model_dump())
    except JobRequestError as exc:
        raise BadRequest(exc.message, exc.param) from exc
    except JobQueueFullError as exc:
        raise Overloaded(str(exc), headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)}) from exc
    return job_object(job)


@router.get(
    "/v1/fine_tuning/jobs",
    response_model=FineTuningJobList,
    dependencies=[Depends(require_admin_key)],
)
async def list_jobs(
    request: Request, after: str | None = None, limit: Limit = 20
) -> FineTuningJobList:
    store = _manager(request).store
    if after is not None and store.get_job(after) is None:
        raise BadRequest(f"after must be the id of an existing job, got {after!r}", "after")
    jobs, more = store.list_jobs(after, limit)
    return FineTuningJobList(data=[job_object(j) for j in jobs], has_more=more)


@router.get(
    "/v1/fine_tuning/jobs/{job_id}",
    response_model=FineTuningJob,
    dependencies=[Depends(require_admin_key)],
)
async def get_job(job_id: str, request: Request) -> FineTuningJob:
    return job_object(_job(_manager(request), job_id))


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/events",
    response_model=FineTuningEventList,
    dependencies=[Depends(require_admin_key)],
)
async def job_events(
    job_id: str, request: Request, after: str | None = None, limit: Limit = 20
) -> FineTuningEventList:
    manager = _manager(request)
    _job(manager, job_id)
    after_seq = None
    if after is not None:
        seq = after.removeprefix("ftevent-")
        if not seq.isdigit():
            raise BadRequest(f"after must be an event id, got {after!r}", "after")
        after_seq = int(seq)
    events, more = manager.store.events(job_id, after_seq, limit)
    data = [
        FineTuningEvent(
            id=f"ftevent-{e.seq}",
            created_at=e.created_at,
            level=e.level,
            message=e.message,
            type=e.type,
            data=e.data,
        )
        for e in events
    ]
    return FineTuningEventList(data=data, has_more=more)


@router.get(
    "/v1/fine_tuning/jobs/{job_id}/checkpoints",
    response_model=FineTuningCheckpointList,
    dependencies=[Depends(require_admin_key)],
)
async def job_checkpoints(
    job_id: str, request: Request, after: str | None = None, limit: Limit = 10
) -> FineTuningCheckpointList:
    """Newest first; `after` is the id of the last checkpoint of the previous page."""
    manager = _manager(request)
    _job(manager, job_id)
    checkpoints = manager.store.checkpoints(job_id)
    start = 0
    if after is not None:
        ids = [c.id for c in checkpoints]
        if after not in ids:
            raise BadRequest(f"after must be a checkpoint id of {job_id}, got {after!r}", "after")
        start = ids.index(after) + 1
    page = checkpoints[start : start + limit]
    data = [
        FineTuningCheckpoint(
            id=c.id,
            created_at=c.created_at,
            fine_tuning_job_id=job_id,
            fine_tuned_model_checkpoint=c.fine_tuned_model_checkpoint,
            step_number=c.step,
            metrics=c.metrics,
        )
        for c in page
    ]
    return FineTuningCheckpointList(data=data, has_more=start + limit < len(checkpoints))


@router.post(
    "/v1/fine_tuning/jobs/{job_id}/cancel",
    response_model=FineTuningJob,
    dependencies=[Depends(require_admin_key)],
)
async def cancel_job(job_id: str, request: Request) -> FineTuningJob:
    manager = _manager(request)
    _job(manager, job_id)
    return job_object(manager.cancel(job_id))
