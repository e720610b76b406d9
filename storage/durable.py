"""The one durable-write path: every file kdcache writes that must survive a crash goes here.

    write_durable(path, data)              bytes, or a function that writes into the open file
    write_json_durable(path, obj)          the same, as sorted JSON
    create_durable(path, data) -> bool     create-if-absent: exactly one of racing writers wins
    fsync_path(path)                       a file or a folder (a new directory entry)

A durable write goes to a temporary name next to the target (``.NAME.PID.tmp``: a dot-file,
which no listing of data counts), is fsync'd, renamed over the target and the folder fsync'd:
a kill leaves the old file or the new one, never a torn one. Readers still treat a torn file as
absent (``read_json``), so correctness never rests on the rename alone.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so a new directory entry is durable too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, tag: str | int | None = None) -> Path:
    """The temporary name a durable write of ``path`` uses (a dot-file in the same folder)."""
    return Path(path).with_name(f".{Path(path).name}.{os.getpid() if tag is None else tag}.tmp")


def _write_temp(tmp: Path, data: bytes | Callable[[IO[bytes]], object]) -> None:
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_durable(path: Path, data: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``data`` (bytes, or ``data(file)`` writing into the open file: torch.save, an
    Arrow IPC writer) to ``path`` durably: temp file, fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        _write_temp(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_json_durable(path: Path, obj: Any) -> None:
    write_durable(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def create_durable(path: Path, data: bytes, *, tag: str) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it already does.

    Of writers racing to create one path exactly one wins, and the file is whole from the moment
    it appears: a fully written temp file is hard-linked to the target (atomic and exclusive, on
    NFS too); where a file system has no hard links, ``O_CREAT | O_EXCL`` then a write. ``tag``
    names the temp file (a writer's own id)."""
    path = Path(path)
    tmp = temp_name(path, tag)
    _write_temp(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict | None:
    """The parsed object, or None if the file is missing or torn (not valid JSON)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None
