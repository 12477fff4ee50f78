"""The job folder's upload: the model a job loads from it, and its deletion once the job has its own copy.

A bundle (zip or tar) is unpacked into a folder of its own first (`model_of`); the upload (a single ``.onnx``
file, or a bundle's unpacked files) is deleted as soon as the job has validated its own copy of the model, and
again when the job ends or fails (`drop_upload`, called by service.job_process, and by service.worker when the
job's process was killed). Imports of onnx and the bundle code happen inside the functions: the job's process
sets its limits before any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx_ops.validate import Limits

__all__ = ["UPLOAD", "drop_upload", "model_of"]

# The uploaded model in a job folder; service.jobs.INPUT_FILES["model"] is this name. Defined here, not there: the
# job process imports this module before its limits are set, and service.jobs would bring pydantic with it.
UPLOAD = "input.onnx"
PARTIAL = "model.partial"  # a bundle being unpacked: renamed to service.bundles.UNPACKED once whole


def model_of(folder: Path, limits: Limits) -> tuple[Path, Limits]:
    """The model to load and its limits: a bundle (zip or tar) is unpacked into a folder of its own first.

    Only a bundle's model may read external data: its folder holds the bundle's files and nothing else, while
    a single uploaded file sits beside the job's other files, which a reference could otherwise name. Once
    unpacked (every member checked), the archive is deleted: nothing reads it again, and it is as large as
    the model (a tar's bytes are freed already as they are unpacked: `unpack(consume=True)`). The unpacked
    folder appears whole (unpacked under another name, then renamed), so a job run again without its archive
    takes the model from it, until the job has its own copy of the model: the unpacked files (or a single
    uploaded file) are deleted then (`drop_upload`), and a job run again after that has no model left.
    """
    from onnx_ops.errors import InvalidModelError
    from service.bundles import UNPACKED, BundleCaps, bundle_kind, unpack, unpacked_model

    upload, target = folder / UPLOAD, folder / UNPACKED
    if not upload.exists():
        if target.is_dir():
            return unpacked_model(target), _bundle_limits(limits)
        raise InvalidModelError(
            "the job's model is no longer here (an upload is deleted once a run of the job has copied the "
            "model): send it again as a new job"
        )
    if bundle_kind(upload) is None:
        return upload, dataclasses.replace(limits, allow_external_data=False)
    partial = folder / PARTIAL
    for stale in (target, partial):
        shutil.rmtree(stale, ignore_errors=True)  # a job run again with its archive unpacks it again
    # The model cap bounds the whole bundle (a single .onnx file inside it is capped at 2 GiB when it is loaded).
    caps = BundleCaps(max_total_bytes=limits.max_external_bytes, max_file_bytes=limits.max_external_bytes)
    try:
        model = unpack(upload, partial, caps, consume=True)  # the archive is deleted below
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a bundle refused half-way: its files go with it
        raise
    partial.rename(target)
    upload.unlink()
    return target / model.relative_to(partial), _bundle_limits(limits)


def _bundle_limits(limits: Limits) -> Limits:
    """A bundle's model reads its data files, which the job then moves into its own folder rather than copy.

    The files are the job's own: it unpacked them (every member checked) into a folder nothing else writes.
    They are checked as any data files are, then renamed, never copied (onnx_ops.external.move_external_data):
    a bundle's weights are on disk once while the job validates them, not twice.
    """
    return dataclasses.replace(limits, allow_external_data=True, move_external_data=True)


def drop_upload(folder: Path) -> None:
    """Delete the job folder's upload (`UPLOAD`, and a bundle's unpacked files): the job has its own copy.

    Called once the job's model is validated into its own copy (`compress(validated=...)`), and again when the
    job ends or fails, by the job's process and, when that process was killed or crashed, by the worker that
    reaped it (service.worker): nothing reads the upload after that (a job is never run again from it), and it
    is as large as the model. A bundle's half-unpacked files (a process killed while unpacking) go too. Only
    those names in the job folder go; a link there is removed, never followed. Best effort: a file that cannot
    be deleted stays until the job is purged.
    """
    from service.bundles import drop_unpacked

    with contextlib.suppress(OSError):  # gone already (a bundle's archive, once unpacked), or not a file
        (folder / UPLOAD).unlink()
    drop_unpacked(folder)
    partial = folder / PARTIAL  # left by a job process killed while it unpacked a bundle
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)  # rmtree follows no link inside it
