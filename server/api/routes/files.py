"""OpenAI-shaped files: upload training data (validated), list, get, delete, download."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from server.api.auth import require_admin_key
from server.api.errors import BadRequest, NotFound
from server.api.schemas.fine_tuning import DeletedFile, FileList, FileObject
from server.training.data import DataError, parse_jsonl
from server.training.jobs import FileRecord, JobStore

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
    """Store a file; fine-tune files must be valid training JSONL (bad lines are named)."""
    store = _store(request)
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise BadRequest("the multipart field 'file' is required", "file")
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}", "purpose")
    data = await upload.read()
    filename = Path(upload.filename or "upload.jsonl").name
    num_examples = None
    if purpose == "fine-tune":
        try:
            examples = await asyncio.to_thread(parse_jsonl, data.splitlines(), filename)
        except DataError as exc:
            raise BadRequest(str(exc), "file") from exc
        if not examples:
            raise BadRequest(f"{filename} holds no training examples", "file")
        num_examples = len(examples)
    rec = await asyncio.to_thread(store.add_file, filename, purpose, data, num_examples)
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
