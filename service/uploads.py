"""Streaming multipart uploads straight into a job folder, with size caps and a pace enforced as the bytes arrive.

FastAPI's UploadFile would spool the whole body before the handler runs, so a cap could only be checked
after the disk had been filled; this parser writes each part to its server-chosen file as it streams
and stops at the first byte over a cap: each file's, each text field's, and the whole body's (the bytes
before the first part and after the closing boundary included). A body that arrives too slowly (see
`Pace`) is cut off with 408, so a client trickling bytes cannot hold an upload slot for long.

The model's file lives only until the job has its own validated copy of it (service.job_upload.drop_upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header

from service.errors import ApiError
from service.job_files import private_opener
from service.jobs import INPUT_FILES
from service.settings import Settings

__all__ = ["Pace", "Upload", "body_cap", "file_caps", "receive_upload"]

_MAX_TEXT = 64 * 1024
_TEXT_FIELDS = frozenset({"plan"})
_MAX_PARTS = 8
_MAX_OUTSIDE = 64 * 1024  # bytes before the first part plus after the closing boundary (RFC 2046's pre/epilogue)
_OVERHEAD = 1 << 20  # the text fields, part headers and boundaries, on top of the files' caps


def file_caps(settings: Settings) -> dict[str, int]:
    """The largest upload, in bytes, of each file field."""
    return {
        "model": settings.max_model_mb << 20,
        "calibration": settings.max_data_mb << 20,
        "evaluation": settings.max_data_mb << 20,
    }


def body_cap(settings: Settings) -> int:
    """The largest whole multipart body: every file at its cap, plus room for the rest of the form."""
    return sum(file_caps(settings).values()) + _OVERHEAD


@dataclasses.dataclass(frozen=True)
class Pace:
    """How fast a body must arrive; past any of these the upload ends with 408 upload_timeout.

    Attributes:
        total_s: the whole body must arrive within this.
        idle_s: the longest gap without a byte.
        min_rate: bytes per second the body must average once `grace_s` has passed (0: no minimum); the
            deadline moves by one second for every `min_rate` bytes received, as Apache's mod_reqtimeout does.
        grace_s: time the body gets before its rate counts.
    """

    total_s: float
    idle_s: float
    min_rate: float
    grace_s: float

    @classmethod
    def of(cls, settings: Settings) -> Pace:
        """The pace the settings ask of uploads."""
        return cls(
            settings.upload_timeout_s, settings.upload_idle_s, settings.upload_min_kib_s * 1024, settings.upload_grace_s
        )


class Upload:
    """What one multipart request carried: the text fields and which files were written."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.files: dict[str, str] = {}  # field name -> the client's file name (display only)


class _Receiver:
    def __init__(self, folder: Path, caps: dict[str, int]) -> None:
        self.folder, self.caps, self.upload = folder, caps, Upload()
        self.headers: dict[bytes, bytes] = {}
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.name: str | None = None
        self.filename = b""
        self.open_part = False
        self.sink: BinaryIO | None = None
        self.text = bytearray()
        self.size = 0
        self.parts = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, s, e: self.header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.header_value.extend(d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > _MAX_PARTS:
            raise ApiError(422, "invalid_request", f"too many form fields (at most {_MAX_PARTS})")
        self.headers, self.name, self.sink, self.text, self.size = {}, None, None, bytearray(), 0

    def header_end(self) -> None:
        self.headers[bytes(self.header_field).lower()] = bytes(self.header_value)
        self.header_field.clear()
        self.header_value.clear()

    def headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.filename = filename or b""
        if name in INPUT_FILES:
            if name in self.upload.files:
                raise ApiError(422, "invalid_request", f"the field {name!r} was sent twice")
            # The client's file name is kept for display only, never used as a path.
            shown = (filename or b"").decode("utf-8", "replace").replace("\x00", "")
            self.upload.files[name] = Path(shown.replace("\\", "/")).name[:200] or INPUT_FILES[name]
            self.sink = open(self.folder / INPUT_FILES[name], "xb", opener=private_opener)  # noqa: SIM115 - closed in part_end
        elif name not in _TEXT_FIELDS:
            raise ApiError(
                422,
                "invalid_request",
                f"unexpected form field {name[:40]!r}; expected model, plan, calibration, evaluation",
            )
        self.name = name
        self.open_part = True

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.sink is not None:
            cap = self.caps[self.name or ""]
            if self.size > cap:
                raise ApiError(413, "upload_too_large", f"the {self.name} file is larger than {cap >> 20} MB")
            self.sink.write(data[start:end])
        else:
            if self.size > _MAX_TEXT:
                raise ApiError(413, "upload_too_large", f"the {self.name} field is larger than {_MAX_TEXT} bytes")
            self.text.extend(data[start:end])

    def part_end(self) -> None:
        self.open_part = False
        if self.sink is not None:
            self.sink.close()
            self.sink = None
            if self.size == 0 and self.name in self.upload.files and not self.filename:
                # Browsers send an empty, unnamed part for an optional file input left empty: no upload.
                del self.upload.files[self.name]
                (self.folder / INPUT_FILES[self.name]).unlink(missing_ok=True)
        elif self.name:
            try:
                self.upload.fields[self.name] = self.text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ApiError(422, "invalid_request", f"the {self.name} field is not UTF-8 text") from e

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


class _Margins:
    """Counts the bytes before the first delimiter and after the closing one (RFC 2046's preamble, epilogue).

    The parser skips both without a word, so a body could go on for ever before or after its form. A
    delimiter is `--boundary` at the start of the body or after CRLF; part data cannot contain one (the
    parser ends the part there), so the first `CRLF--boundary--` (or a leading `--boundary--`) ends the form.
    """

    def __init__(self, boundary: bytes) -> None:
        self.first, self.last = b"--" + boundary, b"\r\n--" + boundary + b"--"
        self.seen = 0  # bytes fed so far
        self.tail = b""  # the last bytes fed, where a delimiter may have begun
        self.start: int | None = None  # offset of the first delimiter
        self.end: int | None = None  # offset just after the closing delimiter

    def feed(self, chunk: bytes) -> int:
        """Take the next chunk of the body; the number of bytes so far outside the form."""
        window, base = self.tail + chunk, self.seen - len(self.tail)
        self.seen += len(chunk)
        self.tail = window[-len(self.last) :]
        if self.start is None and (at := window.find(self.first)) >= 0:
            self.start = base + at
            if window.startswith(self.first + b"--", at):  # an empty form: "--boundary--"
                self.end = self.start + len(self.first) + 2
        if self.start is not None and self.end is None and (at := window.find(self.last)) >= 0:
            self.end = base + at + len(self.last)
        before = self.seen if self.start is None else self.start
        return before + (self.seen - self.end if self.end is not None else 0)


async def receive_upload(
    content_type: str | None, stream: AsyncIterator[bytes], folder: Path, settings: Settings
) -> Upload:
    """Parse a multipart/form-data body into `folder`; raise ApiError (4xx) on anything wrong."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the job as multipart/form-data")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise ApiError(400, "malformed_upload", f"the multipart boundary is longer than {MAX_BOUNDARY_LENGTH} bytes")
    receiver = _Receiver(folder, file_caps(settings))
    cap, total, margins = body_cap(settings), 0, _Margins(boundary)
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
        async for chunk in _paced(stream, Pace.of(settings)):
            total += len(chunk)
            if total > cap:
                raise ApiError(413, "upload_too_large", f"the upload is larger than {cap >> 20} MB in all")
            parser.write(chunk)  # first: a body that is not this form at all is malformed, not too large
            if margins.feed(chunk) > _MAX_OUTSIDE:
                raise ApiError(
                    413, "upload_too_large", f"more than {_MAX_OUTSIDE >> 10} KiB of the body lie outside its parts"
                )
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # python-multipart raises its own errors on malformed bodies
        raise ApiError(400, "malformed_upload", "the multipart body is malformed") from e
    finally:
        with contextlib.suppress(Exception):
            receiver.close()
    if receiver.open_part:
        raise ApiError(400, "malformed_upload", "the multipart body ended in the middle of a part")
    return receiver.upload


async def _paced(stream: AsyncIterator[bytes], pace: Pace) -> AsyncIterator[bytes]:
    """The chunks of `stream`, as long as they keep the pace; ApiError 408 upload_timeout when they do not."""
    loop = asyncio.get_running_loop()
    start = last = loop.time()
    received = 0
    chunks = aiter(stream)
    while True:
        deadlines = [
            (start + pace.total_s, f"the upload took longer than {pace.total_s:g} s"),
            (last + pace.idle_s, f"nothing of the upload arrived for {pace.idle_s:g} s"),
        ]
        if pace.min_rate > 0:
            deadlines.append(
                (
                    start + pace.grace_s + received / pace.min_rate,
                    f"the upload arrived slower than {pace.min_rate / 1024:g} KiB/s",
                )
            )
        deadline, why = min(deadlines)
        try:
            if loop.time() >= deadline:
                raise TimeoutError
            async with asyncio.timeout_at(deadline):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError as e:
            raise ApiError(408, "upload_timeout", why) from e
        received += len(chunk)
        last = loop.time()
        yield chunk
