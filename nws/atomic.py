"""Atomic file writes, shared by every writer of the suite (results, artifact store, job
records, phase checkpoints, decode caches, pools files, tables and figures).

A file is written under a hidden temporary name beside its target, flushed to disk and then
renamed over the target (``os.replace``), so a reader or a run killed at any moment sees the
old file or the new one, never half of one. When the write fails (a full disk, a read-only
file system, no permission), the temporary file is removed and :class:`StorageError` names the
file and what to do; CLIs report it with exit 2 (it is an ``OSError``).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# What to do, by the errno of a failed write (else: the OS's own words).
ADVICE: dict[int, str] = {
    errno.ENOSPC: "the disk is full: free space there (or point --out / the folder at a disk "
                  "with room) and launch the same command again",
    errno.EDQUOT: "the disk quota is exceeded: free space there (or point --out / the folder "
                  "at a disk with room) and launch the same command again",
    errno.EROFS: "the file system is read-only: copy the folder to a writable disk (or give "
                 "another --out) and launch the same command again",
    errno.EACCES: "no permission to write there: fix the folder's permissions or give another "
                  "folder",
    errno.EPERM: "no permission to write there: fix the folder's permissions or give another "
                 "folder",
}


class StorageError(OSError):
    """A file could not be written; the message names it and what to do (CLI exit 2)."""


def storage_error(path: Path, err: OSError, action: str = "cannot write") -> StorageError:
    """``err`` (from writing ``path``) as a :class:`StorageError` naming the path and what to
    do; a ``StorageError`` already is one and is returned as it is."""
    if isinstance(err, StorageError):
        return err
    advice = ADVICE.get(err.errno or 0, "check the disk and the folder, then launch again")
    out = StorageError(err.errno, f"{action} {path}: {err.strerror or err}; {advice}")
    out.filename = str(path)
    return out


def temporary_path(path: Path) -> Path:
    """A hidden, unique name beside ``path`` that keeps its suffix (``.x.png`` -> writers
    that infer the format from the name still can)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write the file ``tmp`` (any writer: ``torch.save``,
    ``np.save``, ``savefig``); on leaving the block it replaces ``p``. On any error the
    temporary file is removed, and an ``OSError`` becomes a :class:`StorageError` naming
    ``p``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.exists():  # fsync what the writer closed, then publish it
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise storage_error(path, err) from err
    finally:
        with suppress(OSError):  # nothing was written there (e.g. a read-only file system)
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half
    (errors: :class:`StorageError`, nothing partial left)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
