"""OpenAI-shaped files: upload training data (validated), list, get, delete, download."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from server.api.auth import require_admin_key
from server.api.errors import BadRequest, InsufficientStorage, NotFound, PayloadTooLarge
from server.api.multipart import stream_form
from server.api.schemas.fine_tuning import DeletedFile, FileList, FileObject
from server.training.data import DataError
from server.training.jobs import FileRecord, JobStore
from server.training.uploads import FileReceiver, FileTooLargeError, QuotaExceededError

router = APIRouter(tags=["files"])
PURPOSES = ("fine-tune", "batch", "user_data", "assistants", "evals")


def _store(request: Request) -> JobStore:
    return request.app.state.server.job_manager.store  # 503 until the server is ready


def _file(rec: FileRecord) -> FileObject:
    return FileObject(
        id=rec.id,
        bytes=rec.bytes,
        created_at=rec.created_at,
        filename=rec.filename,
        purpose=rec.purpose,
    )


def _get(store: JobStore, file_id: str) -> FileRecord:
    rec = store.get_file(file_id)
    if rec is None:
        raise NotFound(f"file {file_id!r} does not exist", "file_id")
    return rec


@router.post(
    "/v1/files",
    response_model=FileObject,
    dependencies=[Depends(require_admin_key)],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(PURPOSES)},
                        },
                    }
                }
            },
        }
    },
)
async def upload_file(request: Request) -> FileObject:
    """Store a file as it arrives; fine-tune files must be valid training JSONL (bad lines are
    named). 413 past --max-file-mb, 507 past --data-quota-mb or on a full disk."""
    store = _store(request)
    config = request.app.state.server.config
    quota = config.data_quota_mb * 2**20 if config.data_quota_mb is not None else None

    def open_receiver(filename: str, fields: dict[str, str]) -> FileReceiver:
        purpose = fields.get("purpose")
        if purpose is not None and purpose not in PURPOSES:
            raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        name = Path(filename or "upload.jsonl").name
        validate = purpose in (None, "fine-tune")  # the purpose may come after the file
        return FileReceiver(store, name, config.max_file_mb * 2**20, quota, validate)

    try:
        fields, receiver = await stream_form(request, "file", open_receiver)
    except FileTooLargeError as exc:
        raise PayloadTooLarge(str(exc), "file") from exc
    except QuotaExceededError as exc:
        raise InsufficientStorage(str(exc), "file") from exc
    if not isinstance(receiver, FileReceiver):
        raise BadRequest("the multipart field 'file' is required", "file")
    purpose = fields.get("purpose")
    try:
        if purpose not in PURPOSES:
            raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
        rec = await asyncio.to_thread(receiver.commit, purpose)
    except DataError as exc:
        raise BadRequest(str(exc), "file") from exc
    except QuotaExceededError as exc:
        raise InsufficientStorage(str(exc), "file") from exc
    finally:
        await asyncio.to_thread(receiver.abort)  # a no-op once committed
    return _file(rec)


@router.get("/v1/files", response_model=FileList, dependencies=[Depends(require_admin_key)])
async def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """Newest first by default; page with `after` (the last id of the previous page)."""
    store = _store(request)
    if after is not None and store.get_file(after) is None:
        raise BadRequest(f"after must be the id of an existing file, got {after!r}", "after")
    records, more = store.list_files(purpose, after, limit, order)
    return FileList(data=[_file(r) for r in records], has_more=more)


@router.get(
    "/v1/files/{file_id}", response_model=FileObject, dependencies=[Depends(require_admin_key)]
)
async def get_file(file_id: str, request: Request) -> FileObject:
    return _file(_get(_store(request), file_id))


@router.get("/v1/files/{file_id}/content", dependencies=[Depends(require_admin_key)])
async def file_content(file_id: str, request: Request) -> FileResponse:
    store = _store(request)
    rec = _get(store, file_id)
    return FileResponse(
        store.file_path(rec.id), filename=rec.filename, media_type="application/jsonl"
    )


@router.delete(
    "/v1/files/{file_id}", response_model=DeletedFile, dependencies=[Depends(require_admin_key)]
)
async def delete_file(file_id: str, request: Request) -> DeletedFile:
    store = _store(request)
    _get(store, file_id)
    await asyncio.to_thread(store.delete_file, file_id)
    return DeletedFile(id=file_id)
