"""A job's result files as HTTP answers: streamed from the file opened and checked once, never read whole."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from fastapi.responses import StreamingResponse

from service.errors import ApiError
from service.job_files import JobFileError, open_job_file

__all__ = ["stream_job_file"]

_CHUNK = 1 << 20


def stream_job_file(folder: Path, name: str, media_type: str, filename: str | None = None) -> StreamingResponse:
    """Stream `name` of a job folder; 404 unless it is a regular file of that folder (see open_job_file).

    The answer is sent from the descriptor that was checked (a path reopened later could be a link by then),
    in chunks (a report or model is never held in memory whole). `filename`: sent as an attachment, with the
    Content-Disposition that starlette's FileResponse would send.
    """
    try:
        f = open_job_file(folder, name)
    except JobFileError as e:
        raise ApiError(404, "not_found", "the result is gone (deleted or expired) or is not a plain file") from e
    headers = {"Content-Length": str(os.fstat(f.fileno()).st_size)}
    if filename is not None:
        quoted = quote(filename)
        headers["Content-Disposition"] = (
            f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'
        )
    return StreamingResponse(_chunks(f), media_type=media_type, headers=headers)


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(_CHUNK):
            yield chunk
