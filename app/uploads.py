"""Streams a multipart upload (`files` fields) straight to disk, chunk by chunk, with a size limit.

Starlette's form parser would first spool every file to its own temporary files; here each chunk
of the request body goes through python-multipart's push parser into the file we chose, so the
413 comes as soon as the limit is passed and nothing is ever held whole in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import ApiError, too_many_files
from app.filenames import refused_magic, safe_name
from worker.service.records import FileInfo

FIELD = "files"
# Room for multipart boundaries and headers on top of the files themselves.
OVERHEAD = 1 << 20


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the upload is larger than the limit of {limit} bytes "
                    "(DEALREC_MAX_UPLOAD_BYTES)", limit=limit, setting="DEALREC_MAX_UPLOAD_BYTES")


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str | None = None
    path: Path | None = None
    out: IO[bytes] | None = None
    size: int = 0
    head: bytes = b""


class _Receiver:
    """python-multipart callbacks writing each `files` part to `dest/<safe name>`."""

    def __init__(self, dest: Path, limit: int, max_files: int) -> None:
        self.dest = dest
        self.limit = limit
        self.max_files = max_files
        self.total = 0
        self.files: list[FileInfo] = []
        self.part: _Part | None = None
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_done, "on_part_data": self.data, "on_part_end": self.end}

    def begin(self) -> None:
        self.part = _Part()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        assert self.part is not None
        self.part.headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def headers_done(self) -> None:
        part = self.part
        assert part is not None
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        field_name = opts.get(b"name", b"").decode("latin-1")
        if field_name != FIELD:
            raise ApiError(400, "invalid_request", f"unexpected form field '{field_name[:64]}'; send files as 'files'",
                           field=field_name[:64])
        raw = opts.get(b"filename")
        if raw is None:
            raise ApiError(400, "invalid_request", "every 'files' part needs a file name", field=FIELD)
        name = safe_name(raw.decode("utf-8", "replace"), allow_archives=True)
        if len(self.files) >= self.max_files:  # before this one is written: the count, not the bytes, is past
            raise too_many_files("the upload", self.max_files, "DEALREC_MAX_UPLOAD_FILES")
        if any(f.name == name for f in self.files):
            raise ApiError(400, "duplicate_file", f"two files named '{name}'", file=name)
        part.name = name
        part.path = self.dest / name
        # Open across the parser's callbacks (closed in `part_end` or on error): no `with` can span them.
        # The name is ours: dest is a fresh private folder.
        part.out = open(part.path, "xb")  # noqa: SIM115

    def data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        assert part is not None and part.out is not None
        chunk = data[start:end]
        if len(part.head) < 8:
            part.head += chunk[: 8 - len(part.head)]
            if len(part.head) >= 8 and refused_magic(part.head):
                raise ApiError(415, "unsupported_file_type",
                               f"'{part.name}' is a NumPy or pickle file; those are refused", file=part.name)
        part.size += len(chunk)
        self.total += len(chunk)
        if self.total > self.limit:
            raise too_large(self.limit)
        part.out.write(chunk)

    def end(self) -> None:
        part = self.part
        assert part is not None and part.out is not None and part.name is not None
        part.out.close()
        if refused_magic(part.head):
            raise ApiError(415, "unsupported_file_type",
                           f"'{part.name}' is a NumPy or pickle file; those are refused", file=part.name)
        if part.size == 0:
            raise ApiError(400, "empty_file", f"'{part.name}' is empty", file=part.name)
        self.files.append(FileInfo(name=part.name, bytes=part.size))
        self.part = None

    def close(self) -> None:
        if self.part is not None and self.part.out is not None:
            self.part.out.close()


async def receive_files(request: Request, dest: Path, limit: int, max_files: int) -> list[FileInfo]:
    """Write every `files` part of the multipart body to `dest`; returns what was written. 413 past
    `limit` bytes or `max_files` files."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the files as multipart/form-data, field 'files'")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + OVERHEAD:
        raise too_large(limit)  # refuse before reading a byte
    receiver = _Receiver(dest, limit, max_files)
    parser = MultipartParser(boundary, receiver.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + OVERHEAD:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "invalid_request", f"malformed multipart body: {exc}") from None
    finally:
        receiver.close()
    if receiver.part is not None:
        raise ApiError(400, "invalid_request", "the multipart body ended in the middle of a file")
    if not receiver.files:
        raise ApiError(400, "invalid_request", "no files: send one or more 'files' fields", field=FIELD)
    return receiver.files
