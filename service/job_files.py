"""Files of a job folder as the server reads and writes them: private, never through a link, size-capped.

A job's own process runs with the server's user and may be compromised by the model it parses: it can
replace any file of its folder (or the folder) with a symbolic link, a hard link, a FIFO or a huge file.
So the server opens job files only with O_NOFOLLOW under a folder opened with O_NOFOLLOW, checks with
fstat (after the open, on what was opened) that it got a regular file with a single link, and reads
records with a cap. Everything it creates there is private: folders 0700, files 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "JobFileError",
    "atomic_write",
    "make_private_folder",
    "open_job_file",
    "private_opener",
    "read_capped",
]

FILE_MODE, FOLDER_MODE = 0o600, 0o700
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class JobFileError(OSError):
    """A job file is missing, too large, or not a plain regular file of its folder (a link, FIFO, ...)."""


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """An `opener` for open(): the file is created 0600 and a symbolic link in its place is refused."""
    return os.open(path, flags | _NOFOLLOW, FILE_MODE)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name in the same folder, then rename: readers see the old or the new file, never half.

    The file is created 0600, exclusively (a link planted at the temp name is refused, not followed).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb", opener=private_opener) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_job_file(folder: Path, name: str) -> BinaryIO:
    """Open `name` of a job folder for reading; JobFileError unless it is a regular file of that folder.

    Neither the folder nor the file may be a symbolic link (O_NOFOLLOW on both, the file opened relative
    to the folder); the file must be a regular file (not a FIFO or a device: opened non-blocking, so a
    FIFO cannot hang the server) with at most one link (a hard link could name any file of the server's user;
    no link left means it was replaced since it was opened, and what is read is the older version).
    """
    if "/" in name or name in ("", ".", ".."):
        raise JobFileError(f"not a job file name: {name[:40]!r}")
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as e:
        raise JobFileError("the job folder cannot be opened") from e
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=folder_fd)
    except OSError as e:
        raise JobFileError(f"{name} cannot be opened") from e
    finally:
        os.close(folder_fd)
    try:
        info = os.fstat(fd)
        # nlink 0 is a record replaced (os.replace) after it was opened: what was read is the older version.
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise JobFileError(f"{name} is not a regular file of the job folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(folder: Path, name: str, max_bytes: int) -> bytes:
    """The whole content of a job file, read safely (see open_job_file); JobFileError past `max_bytes`."""
    with open_job_file(folder, name) as f:
        if os.fstat(f.fileno()).st_size > max_bytes:
            raise JobFileError(f"{name} is larger than {max_bytes} bytes")
        data = f.read(max_bytes + 1)  # the file may grow after fstat: never read more than the cap
    if len(data) > max_bytes:
        raise JobFileError(f"{name} is larger than {max_bytes} bytes")
    return data


def make_private_folder(path: Path) -> None:
    """Create a folder 0700 (whatever the umask), failing if it exists."""
    path.mkdir(mode=FOLDER_MODE)
    os.chmod(path, FOLDER_MODE)  # mkdir's mode is masked by the umask: only ever less, but say it exactly
