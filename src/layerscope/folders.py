"""Output folders and stores on disk: checked before any work, locked while a run writes them, written atomically.

Every experiment folder and activation store goes through three rules:

- :func:`check_output` runs before a model is loaded or anything generated: the path must not be an existing file,
  and it must be creatable and writable (a probe file is written and removed), so a bad ``--out`` costs nothing;
- :func:`lock` holds an exclusive lock (``fcntl.flock`` on ``<folder>/.layerscope.lock``, holding the writer's pid)
  for the whole run: a second run on the same folder is refused with "in use by pid N", never interleaved; the
  kernel releases the lock when the process dies, so a killed run never leaves a stale lock;
- :func:`atomic_write` writes a file under a temporary name in the same folder and renames it into place, so a kill
  at any moment leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, LayerscopeError

LOCK_FILE = ".layerscope.lock"


class FolderInUseError(LayerscopeError, RuntimeError):
    """Another process holds the folder's lock (a run is writing it)."""


class DiskFullError(LayerscopeError, OSError):
    """A write failed because the disk (or the user's quota) is full."""


def check_output(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, in one sentence, a path that cannot take a run's output: an existing file, or a folder that cannot be
    created or written. Creates the folder (and its parents) when missing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the {what} {str(path)!r} is an existing file; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".layerscope-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"the {what} {str(path)!r} cannot be written ({exc.strerror or exc})") from None
    return path


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


@contextmanager
def lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold ``folder``'s exclusive lock for the ``with`` block; raise :class:`FolderInUseError` at once if another
    process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_FILE
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(
                f"the {what} {str(folder)!r} is in use by {_holder(lock_path)} (a run is writing it); "
                "wait for that run to finish or use another path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def disk_errors(where: str | Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into :class:`DiskFullError` naming ``where``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"the disk holding {str(where)!r} is full; free space and rerun the same command to resume "
                "(what was finished is kept)"
            ) from None
        raise


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the file at a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with disk_errors(path):
            write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def file_record(path: str | Path) -> dict[str, int]:
    """What a writer records of a file it finished: ``{"size": bytes, "crc32": checksum}``."""
    path = Path(path)
    crc = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def file_damage(path: str | Path, want: dict[str, int]) -> str | None:
    """Why the file at ``path`` is not the one :func:`file_record` described (None when it is)."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != want.get("size"):
        return f"{path.name} has {size} bytes, {want.get('size')} were written"
    if file_record(path)["crc32"] != want.get("crc32"):
        return f"{path.name} was changed after it was written (checksum)"
    return None
