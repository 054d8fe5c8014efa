"""Reading an upload body as a byte stream: raw (``application/octet-stream``) or the ``file``
field of a multipart form, parsed as it streams; every byte of the request counts toward the
upload cap, the form's other parts and headers included."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import BadRequest, InvalidInput, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FILE_FIELD = b"file"
_UNSAFE_FILENAME = re.compile(r"[^\w.\- ]")


def clean_filename(raw: str | bytes | None) -> str | None:
    """A filename kept as metadata only (never a path): its last component, safe characters."""
    if not raw:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    name = _UNSAFE_FILENAME.sub("_", text.replace("\\", "/").rsplit("/", 1)[-1])[:255]
    return name or None


class UploadBody:
    """The bytes of the uploaded file, whichever way the client sent them."""

    def __init__(self, request: Request, filename: str | None, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.filename = clean_filename(filename)
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        self._boundary = params.get(b"boundary") if content_type == b"multipart/form-data" else None

    def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive."""
        if self._boundary is None:
            return self._request.stream()
        return self._multipart_file(self._boundary)

    async def _multipart_file(self, boundary: bytes) -> AsyncIterator[bytes]:
        form = _FilePart()
        parser = MultipartParser(boundary, form.callbacks())
        received = 0
        try:
            async for chunk in self._request.stream():
                received += len(chunk)
                if received > self._limit:
                    raise PayloadTooLarge(f"upload exceeds the limit of {self._limit} bytes")
                parser.write(chunk)
                if form.pending:
                    yield b"".join(form.pending)
                    form.pending.clear()
            parser.finalize()
        except MultipartParseError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from None
        if not form.found:
            raise InvalidInput("the multipart form has no 'file' field holding the weights")
        if form.pending:
            yield b"".join(form.pending)
        self.filename = self.filename or clean_filename(form.filename)


class _FilePart:
    """Callbacks that keep the data of the first part named ``file``."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.found = False
        self.filename: bytes | None = None
        self._reading = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if params.get(b"name") == FILE_FIELD and not self.found:
            self.found = self._reading = True
            self.filename = params.get(b"filename")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._reading:
            self.pending.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        self._reading = False
