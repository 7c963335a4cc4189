"""Adapter management: /v1/adapters, and vLLM's /v1/load_lora_adapter and unload."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import PlainTextResponse

# Starlette's class: what request.form() yields (fastapi.UploadFile is a subclass of it).
from starlette.datastructures import FormData, UploadFile

from adapters import AdapterError, RegisteredAdapter, extract_adapter_files, sources
from adapters.format import CONFIG_FILE, WEIGHTS_FILE
from server.api.auth import require_admin_key, require_api_key
from server.api.errors import BadRequest, Forbidden, NotFound
from server.api.schemas.admin import (
    AdapterInfo,
    AdapterList,
    DeletedAdapter,
    LoadLoraAdapterRequest,
    Residency,
    UnloadLoraAdapterRequest,
)
from server.api.state import ServerState
from server.serving.adapters import AdapterService

router = APIRouter(tags=["adapters"])
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
DEFAULT_PAGE = 50


def _state(request: Request) -> ServerState:
    return request.app.state.server


def adapter_info(
    reg: RegisteredAdapter, parent: str, residency: Residency | None = None
) -> AdapterInfo:
    spec, rec = reg.spec, reg.record
    return AdapterInfo(
        id=reg.name,
        rank=spec.rank,
        max_rank=spec.max_rank,
        alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        target_modules=list(spec.target_modules),
        saved_modules=list(spec.saved_modules),
        rope_scaling_factor=spec.rope_scaling_factor,
        size_bytes=rec.size_bytes,
        sha256=rec.sha256,
        created=int(rec.created_at),
        source=rec.source,
        parent=parent,
        version=reg.version,
        has_chat_template=spec.chat_template is not None,
        residency=residency,
    )


async def _with_residency(state: ServerState, regs: list[RegisteredAdapter]) -> list[AdapterInfo]:
    """Each adapter's info with where its weights are and how many requests use it now."""
    adapters = state.adapters
    usage = await adapters.usage(regs)
    return [
        adapter_info(
            reg,
            state.model_name,
            Residency(
                host=adapters.is_host_resident(reg),
                device=u.on_device,
                active_requests=u.active_requests,
            ),
        )
        for reg, u in zip(regs, usage, strict=True)
    ]


async def _files_from_form(form: FormData, max_bytes: int) -> dict[str, bytes]:
    # multi_items: several files may share one field name ("files"), which values() collapses.
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not uploads:
        raise BadRequest(
            f"upload {CONFIG_FILE} and {WEIGHTS_FILE} as files, or one .tar.gz/.zip archive",
            "files",
        )
    archives = [u for u in uploads if (u.filename or "").endswith(ARCHIVE_SUFFIXES)]
    if archives:
        if len(uploads) != 1:
            raise BadRequest("send either one archive or the adapter files, not both", "files")
        data = await archives[0].read()
        return await asyncio.to_thread(
            extract_adapter_files, data, archives[0].filename or "", max_bytes
        )
    files: dict[str, bytes] = {}
    for upload in uploads:
        name = Path(upload.filename or "").name
        files[name] = await upload.read()
    return files


def _multipart_body(required: list[str]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
    }
    if "name" in required:
        properties["name"] = {"type": "string"}
    schema = {"type": "object", "required": required, "properties": properties}
    return {
        "requestBody": {
            "content": {"multipart/form-data": {"schema": schema}},
            "required": True,
        }
    }


@router.post(
    "/v1/adapters",
    status_code=status.HTTP_201_CREATED,
    response_model=AdapterInfo,
    dependencies=[Depends(require_admin_key)],
    openapi_extra=_multipart_body(["name"]),
)
async def upload_adapter(request: Request) -> AdapterInfo:
    """Register an adapter from adapter_config.json + adapter_model.safetensors, or an archive."""
    state = _state(request)
    adapters = state.adapters  # 503 while the model loads, before reading the body
    form = await request.form()
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("the form field 'name' is required", "name")
    files = await _files_from_form(form, state.config.max_upload_mb * 2**20)
    return _fresh(adapters, await adapters.upload(name, files), state.model_name)


@router.put(
    "/v1/adapters/{name:path}",
    response_model=AdapterInfo,
    dependencies=[Depends(require_admin_key)],
    openapi_extra=_multipart_body([]),
)
async def reload_adapter(name: str, request: Request) -> AdapterInfo:
    """Replace an adapter's weights in place (files or an archive, as for POST): running
    requests finish on the old weights, new requests get the new ones."""
    state = _state(request)
    adapters = state.adapters  # 503 while the model loads, before reading the body
    adapters.check_reloadable(name)
    form = await request.form()
    files = await _files_from_form(form, state.config.max_upload_mb * 2**20)
    return _fresh(adapters, await adapters.reload(name, files), state.model_name)


def _fresh(adapters: AdapterService, reg: RegisteredAdapter, parent: str) -> AdapterInfo:
    """A version just registered: no request uses it yet, nor is it on the device (a new
    adapter id never is)."""
    host = adapters.is_host_resident(reg)
    return adapter_info(reg, parent, Residency(host=host, device=False, active_requests=0))


@router.get("/v1/adapters", response_model=AdapterList, dependencies=[Depends(require_api_key)])
async def list_adapters(
    request: Request,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    after: str | None = None,
    search: Annotated[str | None, Query(max_length=128)] = None,
) -> AdapterList:
    """In registration order. Without parameters: every adapter, `residency` null. With any of
    `limit`, `after`, `search`: a page (default 50) whose items carry residency and requests."""
    state = _state(request)
    registered = state.adapters.list()
    if limit is None and after is None and search is None:
        return AdapterList(data=[adapter_info(r, state.model_name) for r in registered])
    if search:
        needle = search.lower()
        registered = [r for r in registered if needle in r.name.lower()]
    start = 0
    if after is not None:
        names = [r.name for r in registered]
        if after not in names:
            raise BadRequest(f"after must name an adapter in this listing, got {after!r}", "after")
        start = names.index(after) + 1
    limit = limit or DEFAULT_PAGE
    page = registered[start : start + limit]
    history = request.app.state.stats_history
    data = await _with_residency(state, page)
    for info in data:
        info.requests_served = history.requests_served(info.id)
    return AdapterList(data=data, has_more=start + limit < len(registered), total=len(registered))


@router.get(
    "/v1/adapters/{name:path}", response_model=AdapterInfo, dependencies=[Depends(require_api_key)]
)
async def get_adapter(name: str, request: Request) -> AdapterInfo:
    state = _state(request)
    reg = state.adapters.get(name)
    if reg is None:
        raise NotFound(f"adapter {name!r} does not exist", "name")
    (info,) = await _with_residency(state, [reg])
    return info


@router.delete(
    "/v1/adapters/{name:path}",
    response_model=DeletedAdapter,
    dependencies=[Depends(require_admin_key)],
)
async def delete_adapter(name: str, request: Request) -> DeletedAdapter:
    """Remove an adapter; 409 while requests use it."""
    await _state(request).adapters.remove(name)
    return DeletedAdapter(id=name)


@router.post(
    "/v1/load_lora_adapter",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_admin_key)],
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> str:
    """vLLM's route: register an adapter from a path, file://, s3:// or hf:// URI that falls
    under one of --adapter-roots."""
    state = _state(request)
    adapters = state.adapters  # 503 while the model loads
    roots = state.config.adapter_roots
    if not roots:
        raise Forbidden("loading adapters from paths is disabled: start with --adapter-roots")
    uri = body.lora_path
    try:
        kind = sources.scheme(uri)
        sources.check_allowed(uri, roots)
        is_dir = kind != "file" or sources.local_path(uri).is_dir()
    except sources.SourceForbidden as exc:
        raise Forbidden(f"lora_path: {exc}", "lora_path") from exc
    except AdapterError as exc:
        raise BadRequest(f"lora_path: {exc}", "lora_path") from exc
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a loop of links
        raise BadRequest(f"lora_path {uri!r} is not usable: {exc}", "lora_path") from exc
    if not is_dir:
        raise BadRequest(f"lora_path {uri!r} is not a directory", "lora_path")
    if body.load_inplace and adapters.get(body.lora_name) is not None:
        await adapters.reload_from(body.lora_name, uri)
        return f"Success: LoRA adapter '{body.lora_name}' reloaded in place."
    if adapters.get(body.lora_name) is not None:
        raise BadRequest(
            f"the lora adapter {body.lora_name!r} has already been loaded", "lora_name"
        )
    await adapters.load(body.lora_name, uri)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post(
    "/v1/unload_lora_adapter",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_admin_key)],
)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> str:
    adapters = _state(request).adapters
    if adapters.get(body.lora_name) is None:
        raise NotFound(f"the lora adapter {body.lora_name!r} cannot be found", "lora_name")
    await adapters.remove(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
