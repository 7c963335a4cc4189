"""Typed API errors and the two wire shapes they take.

/v1 routes answer in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which
the openai SDK turns into typed exceptions; the LoRAX/TGI routes answer `{"error",
"error_type"}`, which the LoRAX client reads.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters import AdapterError, AdapterExistsError, AdapterNotFoundError
from adapters.faults import DiskFullError
from server.engine.async_engine import EngineDeadError, EngineStepError, RequestFailedError
from server.engine.errors import (
    AdapterBusyError,
    AdapterVersionGoneError,
    InvalidRequestError,
    UnknownAdapterError,
)
from server.redact import without_paths

logger = logging.getLogger(__name__)

LORAX_PATHS = ("/generate", "/generate_stream")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "bytes", "none"})


class APIError(Exception):
    """An error with an HTTP status, an OpenAI error type, and optionally the bad field."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
    lorax_type = "validation"

    def __init__(
        self, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers


class BadRequest(APIError):
    pass


class Unauthorized(APIError):
    status, type, code, lorax_type = 401, "authentication_error", "invalid_api_key", "unauthorized"


class Forbidden(APIError):
    status, type, code, lorax_type = 403, "permission_error", "forbidden", "forbidden"


class NotFound(APIError):
    status, type, code, lorax_type = 404, "not_found_error", "model_not_found", "not_found"


class Conflict(APIError):
    status, type, code, lorax_type = 409, "conflict_error", "conflict", "conflict"


class PayloadTooLarge(APIError):
    status, type, code, lorax_type = 413, "invalid_request_error", "payload_too_large", "validation"


class RequestTimeout(APIError):
    status, type, code, lorax_type = 408, "invalid_request_error", "request_timeout", "validation"


class InsufficientStorage(APIError):
    """A data-dir quota reached or a full disk (WebDAV's 507)."""

    status, type, code, lorax_type = 507, "server_error", "insufficient_storage", "storage"


class Overloaded(APIError):
    status, type, code, lorax_type = 429, "rate_limit_error", "overloaded", "overloaded"


class Unavailable(APIError):
    status, type, code, lorax_type = 503, "service_unavailable", "not_ready", "unavailable"


class ServerBusy(APIError):
    status, type, code, lorax_type = 503, "service_unavailable", "overloaded", "overloaded"


class GenerationError(APIError):
    status, type, code, lorax_type = 500, "server_error", "generation_failed", "generation"


class InternalError(APIError):
    status, type, code, lorax_type = 500, "server_error", "internal_error", "internal"


class RequestFailed(GenerationError):
    """The engine ended this request alone (e.g. its adapter produced non-finite values):
    a 4xx, since a retry would fail the same way (LoRAX: 424, as every generation error)."""

    status, type, code = 422, "invalid_request_error", "request_failed"


class ClientDisconnected(APIError):
    """The client went away; nobody reads the reply (499, nginx's code for this)."""

    status, type, code, lorax_type = 499, "client_closed_request", "client_closed", "client_closed"


class BodyRefused(StarletteHTTPException):
    """An APIError raised from a request's body stream (server/api/limits.py).

    An HTTPException because FastAPI lets those through its body parsing, where any other
    exception becomes a generic 400.
    """

    def __init__(self, error: APIError) -> None:
        super().__init__(error.status, error.message, error.headers)
        self.error = error


DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    InvalidRequestError,
    AdapterError,
    AdapterNotFoundError,
    AdapterBusyError,
    EngineDeadError,
    EngineStepError,
    RequestFailedError,
    ClientDisconnect,
    DiskFullError,
)


def _is_lorax(request: Request) -> bool:
    return request.url.path == "/" or request.url.path.startswith(LORAX_PATHS)


def error_body(err: APIError, lorax: bool) -> dict:
    if lorax:
        return {"error": err.message, "error_type": err.lorax_type}
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_response(request: Request, err: APIError) -> JSONResponse:
    lorax = _is_lorax(request)
    status = err.status
    if lorax and isinstance(err, BadRequest):
        status = 422  # LoRAX answers validation errors with 422
    if lorax and isinstance(err, GenerationError):
        status = 424
    return JSONResponse(error_body(err, lorax), status_code=status, headers=err.headers)


def translate(exc: Exception) -> APIError:
    """Domain exceptions from the engine and the adapter store, as API errors.

    Their messages may name files on the server, which clients never see; anything else is a
    bug, answered with a generic 500 whose id finds the traceback in the server log.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return NotFound(exc.message, exc.param)
    if isinstance(exc, AdapterVersionGoneError):
        return Conflict(exc.message, exc.param, headers={"Retry-After": "0"})
    if isinstance(exc, InvalidRequestError):
        return BadRequest(exc.message, exc.param)
    if isinstance(exc, AdapterBusyError):
        return Conflict(str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, AdapterExistsError):
        return Conflict(str(exc).strip("'\""), "name")
    if isinstance(exc, AdapterNotFoundError):  # deleted while a reload of it ran
        return NotFound(str(exc.args[0]), "name")
    if isinstance(exc, AdapterError):
        return BadRequest(without_paths(str(exc)))
    if isinstance(exc, EngineDeadError):
        return Unavailable(without_paths(str(exc)))
    if isinstance(exc, EngineStepError):
        return GenerationError(without_paths(str(exc)))
    if isinstance(exc, RequestFailedError):
        return RequestFailed(str(exc))
    if isinstance(exc, DiskFullError):
        return InsufficientStorage(str(exc))
    if isinstance(exc, ClientDisconnect):
        return ClientDisconnected("client disconnected")
    error_id = uuid.uuid4().hex[:16]
    logger.error("unexpected error %s", error_id, exc_info=exc)
    return InternalError(f"internal server error (id {error_id}; the server log has the details)")


def _is_union_branch(part: str) -> bool:
    # pydantic names the union member it tried in the loc ('str', 'list[int]'); not a field
    return part in _TYPE_NAMES or "[" in part


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [
        str(p)
        for p in first.get("loc", ())
        if p not in ("body", "query", "path") and not _is_union_branch(str(p))
    ]
    param = ".".join(loc) or None
    where = f" ({param})" if param else ""
    return f"{first.get('msg', 'invalid request')}{where}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        err = BadRequest(message, param)
        lorax = _is_lorax(request)
        return JSONResponse(error_body(err, lorax), status_code=422 if lorax else 400)

    # Domain errors get handlers of their own: the catch-all below runs in Starlette's
    # ServerErrorMiddleware, which answers but then re-raises (a traceback per bad request).
    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, translate(exc))

    for domain in DOMAIN_ERRORS:
        app.add_exception_handler(domain, _domain)

    @app.exception_handler(BodyRefused)
    async def _body_refused(request: Request, exc: BodyRefused) -> JSONResponse:
        return error_response(request, exc.error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail))
        err.status = exc.status_code
        err.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, translate(exc))
