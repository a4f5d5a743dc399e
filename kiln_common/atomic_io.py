"""Atomic file writes: after a crash a reader finds the old file or the whole new one, never a part of it.

Each writer writes to a hidden temporary name in the same folder (`.<name>.tmp.<pid>.<random>`),
flushes and fsyncs it, renames it over the final name (`os.replace`, atomic on POSIX file systems)
and fsyncs the folder so that the rename itself survives a power cut. A writer that fails removes
its temporary file; one killed outright (kill -9) leaves it behind, under a name no reader looks at.
Every writer returns the file's size and sha256, computed while writing (no second read), for a
checkpoint manifest; `file_digest` computes the same of a file on disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """Size in bytes and sha256 (hex) of a file's contents."""

    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HashingWriter:
    """A write-only binary stream that hashes and counts what passes through it to `file`."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        return self.file.write(view)

    def flush(self) -> None:
        self.file.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.hash.hexdigest())


def temp_name(path: Path) -> Path:
    """The temporary name `atomic_write` writes `path` under before renaming it."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True for a name `temp_name` makes (what a killed writer leaves behind)."""
    return name.startswith(".") and ".tmp." in name


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename into it) durable; a no-op where the file system cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> FileDigest:
    """Call `write(stream)` to produce the contents of `path`, and put them there atomically; their digest."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            stream = _HashingWriter(f)
            write(stream)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return stream.digest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> FileDigest:
    """Write `data` to `path` atomically; its digest."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> FileDigest:
    """Write `text` (UTF-8) to `path` atomically; its digest."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> FileDigest:
    """Write `obj` as JSON to `path` atomically (indent=1 and default=str unless given); its digest."""
    dumps_kwargs = {"indent": 1, "default": str, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> FileDigest:
    """`torch.save(obj, path)`, atomically; the file's digest."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Size and sha256 of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileDigest(size, h.hexdigest())
