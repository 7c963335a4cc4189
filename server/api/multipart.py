"""multipart/form-data read as it arrives: small text fields kept, one file part streamed.

Starlette's request.form() spools files to a temporary directory and hands them over whole;
here the file's bytes go straight to a sink (the file store's FileReceiver), parsed and written
in a worker thread so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import python_multipart
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from server.api.errors import BadRequest

MAX_FIELD_BYTES = 64 << 10
MAX_FIELDS = 16


class FileSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


# (filename, the text fields read so far) -> where the file's bytes go
OpenSink = Callable[[str, dict[str, str]], FileSink]


class _Form:
    """python_multipart callbacks: collects text fields, passes file bytes to the sink."""

    def __init__(self, file_field: str, open_sink: OpenSink) -> None:
        self.file_field = file_field
        self.open_sink = open_sink
        self.fields: dict[str, str] = {}
        self.sink: FileSink | None = None
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._data = bytearray()
        self._in_file = False

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._data, self._in_file = b"", bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest("a multipart part has no name in its Content-Disposition")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise BadRequest(f"at most {MAX_FIELDS} form fields are accepted")
            return
        if self._name != self.file_field:
            raise BadRequest(
                f"unexpected file in the form field {self._name!r}; send it as {self.file_field!r}",
                self._name,
            )
        if self.sink is not None:
            raise BadRequest(f"send one file in the form field {self.file_field!r}", "file")
        filename = options[b"filename"].decode("utf-8", "replace")
        self.sink = self.open_sink(filename, dict(self.fields))
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            assert self.sink is not None
            self.sink.write(data[start:end])
            return
        self._data += data[start:end]
        if len(self._data) > MAX_FIELD_BYTES:
            raise BadRequest(f"the form field {self._name!r} is too long", self._name)

    def on_part_end(self) -> None:
        if not self._in_file:
            self.fields[self._name] = self._data.decode("utf-8", "replace")


async def stream_form(
    request: Request, file_field: str, open_sink: OpenSink
) -> tuple[dict[str, str], FileSink | None]:
    """The form's text fields and the sink its one file went to (None if it had none).

    If anything is refused (an error raised by the sink or here), the sink is aborted and the
    rest of the body is read and dropped, so the client gets the answer, not a reset.
    """
    content_type = request.headers.get("content-type", "")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise BadRequest("send the upload as multipart/form-data", file_field)
    form = _Form(file_field, open_sink)
    parser = python_multipart.MultipartParser(params[b"boundary"], form.callbacks())
    stream = request.stream()
    try:
        try:
            async for chunk in stream:
                await asyncio.to_thread(parser.write, chunk)
            await asyncio.to_thread(parser.finalize)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body: {exc}", file_field) from exc
    except BaseException as exc:
        if form.sink is not None:
            await asyncio.to_thread(form.sink.abort)
        if isinstance(exc, Exception) and not isinstance(exc, ClientDisconnect):
            with contextlib.suppress(ClientDisconnect):
                async for _ in stream:
                    pass
        raise
    return form.fields, form.sink
