"""Streaming multipart uploads straight into a job folder, with size caps enforced while the bytes arrive.

FastAPI's UploadFile would spool the whole body before the handler runs, so a cap could only be checked
after the disk had been filled; this parser writes each part to its server-chosen file as it streams
and stops at the first byte over the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError
from service.job_files import private_opener
from service.jobs import INPUT_FILES

__all__ = ["Upload", "receive_upload"]

_MAX_TEXT = 64 * 1024
_TEXT_FIELDS = frozenset({"plan"})
_MAX_PARTS = 8


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


async def receive_upload(
    content_type: str | None, stream: AsyncIterator[bytes], folder: Path, caps: dict[str, int], timeout_s: float
) -> Upload:
    """Parse a multipart/form-data body into `folder`; raise ApiError (4xx) on anything wrong."""
    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ApiError(415, "unsupported_media_type", "send the job as multipart/form-data")
    receiver = _Receiver(folder, caps)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in stream:
                parser.write(chunk)
        parser.finalize()
    except TimeoutError as e:
        raise ApiError(408, "upload_timeout", f"the upload took longer than {timeout_s:.0f} s") from e
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
