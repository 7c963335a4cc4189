"""OpenAI-shaped files and fine-tuning bodies."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, computed_field

ItemT = TypeVar("ItemT", bound=BaseModel)  # an item with an `id`


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class Page(BaseModel, Generic[ItemT]):
    """OpenAI's list body; page on with `after` set to the last item's id."""

    object: Literal["list"] = "list"
    data: list[ItemT]
    has_more: bool = False


class CursorPage(Page[ItemT]):
    """A page that also names its first and last ids (files, checkpoints)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def first_id(self) -> str | None:
        return self.data[0].id if self.data else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def last_id(self) -> str | None:
        return self.data[-1].id if self.data else None


class FileList(CursorPage[FileObject]):
    pass


class DeletedFile(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class FineTuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    method: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] | None = None  # OpenAI's legacy place for them


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str = "loraplex"
    status: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int | None = None
    suffix: str | None = None
    result_files: list[str] = []
    estimated_finish: int | None = None
    integrations: list[Any] = []


class FineTuningJobList(Page[FineTuningJob]):
    pass


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class FineTuningEventList(Page[FineTuningEvent]):
    pass


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str | None = None
    step_number: int
    metrics: dict[str, Any]


class FineTuningCheckpointList(CursorPage[FineTuningCheckpoint]):
    pass
